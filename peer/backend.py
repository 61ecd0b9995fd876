"""A span of transformer blocks, run with the model's own ``transformers`` decoder-layer classes.

:class:`SpanBackend` loads blocks ``[start, end)`` of a checkpoint (only their tensors are read) and runs
hidden states through any sub-range of them, exactly as the Hugging Face model's ``forward`` would: the same
causal/padding mask (``transformers.masking_utils.create_causal_mask``), the same rotary position embeddings
and the same per-layer KV cache, so distributed outputs equal the single-process ones.

On a CUDA device, an inference session's KV cache is a :class:`GraphCache`: a fixed-size cache (``transformers``
``StaticCache``, one slot per token of the session's ``max_length``) whose decode steps (one new token per row)
replay a CUDA graph of the span's layers, captured at the session's first decode step. A decode step of a small
batch is bound by kernel launches and Python, not by the GPU (an 8B model at batch 1 runs ~15 kernels per block),
and a graph replays all of them with one launch: the technique of vLLM's and TensorRT-LLM's decode loops and of
``transformers``' own static-cache ``generate``. The attention then covers all ``max_length`` slots, the unused
ones masked out, so the result equals the growing-cache one up to floating-point rounding of a different kernel.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import torch
import transformers
from torch import nn

from protocols.model_spec import Checkpoint, build_meta_model, check_transformers

check_transformers(transformers.__version__)  # a clear error rather than a TypeError in the first forward pass

from transformers import DynamicCache, StaticCache  # noqa: E402
from transformers.masking_utils import create_causal_mask  # noqa: E402

logger = logging.getLogger(__name__)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one, however spelled ("cpu" and "cpu:0"; "cuda" and "cuda:N" for the current N)."""
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return a.type == "cpu" or a.index == b.index
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


class SpanBackend:
    """Blocks ``[start, end)`` of a model, ready to run.

    :param checkpoint: the model's checkpoint
    :param start: first block (inclusive)
    :param end: last block (exclusive)
    :param device: torch device string
    :param dtype: parameter and activation dtype
    :param use_graphs: on a CUDA device, give sessions a :class:`GraphCache` (decode steps as CUDA graphs)
    :param reuse: a span of the same checkpoint, device and dtype that this one replaces (a peer's move): the blocks
        both hold are not read again, and share its parameter tensors (no second copy in memory while both spans
        are loaded, during a make-before-break move); each span keeps its own layer modules, as a layer's KV-cache
        index is relative to its span
    :raises ValueError: if the span is empty or outside the model
    """

    def __init__(self, checkpoint: Checkpoint, start: int, end: int, device: str = "cpu", dtype=torch.float32,
                 use_graphs: bool = True, reuse: Optional["SpanBackend"] = None):
        if not 0 <= start < end <= checkpoint.num_blocks:
            raise ValueError(f"span {start}:{end} is outside the model's {checkpoint.num_blocks} blocks")
        self.checkpoint, self.start, self.end = checkpoint, start, end
        self.device, self.dtype = torch.device(device), dtype
        self.use_graphs = use_graphs  # CUDA graphs for decode steps where supported (see graphs_supported)
        self.config = checkpoint.config
        self.span_config = checkpoint.span_config(start, end)
        self.hidden_size = int(self.config.hidden_size)

        meta = build_meta_model(self.config)
        base = meta.base_model
        self.layers = nn.ModuleList()
        if reuse is not None and not (reuse.checkpoint is checkpoint and _same_device(reuse.device, self.device)
                                      and reuse.dtype == dtype):
            reuse = None
        kept = range(max(start, reuse.start), min(end, reuse.end)) if reuse is not None else range(0)
        self.kept_blocks = len(kept)  # blocks taken from ``reuse`` rather than read
        t0 = time.perf_counter()
        read, to_read = 0, (end - start) - len(kept)
        if len(kept):
            logger.info("keeping blocks %d:%d of the current span (not read again)", kept.start, kept.stop)
        for i in range(start, end):
            layer = base.layers[i]
            if i in kept:  # the same tensors as the span it replaces, in a layer module of this span
                state = reuse.layers[i - reuse.start].state_dict()
            else:
                prefix = f"{meta.base_model_prefix}.layers.{i}."
                names = checkpoint.tensor_names([prefix])
                state = {n[len(prefix):]: t for n, t in checkpoint.read_tensors(names).items()}
            layer.load_state_dict(state, strict=True, assign=True)
            layer = layer.to(device=self.device, dtype=dtype)
            layer.self_attn.layer_idx = i - start  # index into this span's KV cache
            layer.eval().requires_grad_(False)
            self.layers.append(layer)
            if i not in kept:
                read += 1
                logger.info("loaded block %d (%d/%d) in %.2fs", i, read, to_read, time.perf_counter() - t0)
        with torch.device("cpu"):
            self.rotary_emb = type(base.rotary_emb)(config=self.config)
        self.rotary_emb.to(self.device)
        del meta

    @property
    def num_blocks(self) -> int:
        return self.end - self.start

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.layers.parameters())

    def cache_bytes_per_token(self) -> int:
        """KV-cache bytes one token takes in one block."""
        head_dim = getattr(self.config, "head_dim", None) or self.hidden_size // self.config.num_attention_heads
        kv_heads = getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads
        return 2 * kv_heads * head_dim * torch.tensor([], dtype=self.dtype).element_size()

    def graphs_supported(self) -> bool:
        """Whether sessions on this span can use :class:`GraphCache`: a CUDA device, graphs not turned off, SDPA
        attention, and only full-attention layers (sliding-window and linear-attention caches are not static here)."""
        types = getattr(self.span_config, "layer_types", None) or ["full_attention"]
        return (self.device.type == "cuda" and self.use_graphs and all(t == "full_attention" for t in types)
                and getattr(self.config, "_attn_implementation", "sdpa") == "sdpa")

    def new_cache(self, batch_size: int = 1, max_length: Optional[int] = None):
        """An empty KV cache for one inference session over this span.

        :param batch_size: rows of the session
        :param max_length: tokens (including padding) the session may hold; with it, on a CUDA device, a
            :class:`GraphCache` of that size (see the module docstring), else a growing ``DynamicCache``
        """
        if max_length is not None and self.graphs_supported():
            return GraphCache(self, batch_size, max_length)
        return DynamicCache(config=self.span_config)

    @torch.inference_mode()
    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        start: Optional[int] = None,
        end: Optional[int] = None,
        position_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[DynamicCache] = None,
    ) -> torch.Tensor:
        """Run ``hidden_states`` through blocks ``[start, end)`` (default: the whole span).

        :param hidden_states: ``[batch, new_tokens, hidden_size]``
        :param position_ids: ``[batch, new_tokens]`` positions of the new tokens
        :param attention_mask: ``[batch, past_tokens + new_tokens]`` with 0 for padding, or None (no padding)
        :param cache: the session's KV cache (updated in place), or None for a forward pass without cache
        :returns: ``[batch, new_tokens, hidden_size]``
        """
        start = self.start if start is None else start
        end = self.end if end is None else end
        hidden_states = hidden_states.to(device=self.device, dtype=self.dtype)
        position_ids = position_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        if isinstance(cache, GraphCache):
            return cache.forward(hidden_states, start - self.start, end - self.start, position_ids, attention_mask)
        mask = create_causal_mask(
            config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask, cache=cache,
            position_ids=position_ids, layer_idx=start - self.start,
        )
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for i in range(start - self.start, end - self.start):
            hidden_states = self.layers[i](
                hidden_states, attention_mask=mask, position_ids=position_ids, cache=cache,
                use_cache=cache is not None, position_embeddings=position_embeddings,
            )
        return hidden_states


class GraphCache(StaticCache):
    """A session's fixed-size KV cache on a CUDA device, whose decode steps replay a captured CUDA graph.

    Slots ``0 .. max_length - 1`` hold the session's tokens in arrival order (padding included), like the rows of
    a growing cache. ``valid[b, j]`` says whether slot ``j`` of row ``b`` is a real token; token ``i`` attends to
    slots ``j <= i`` that are valid (and to itself, so a padding token's row is never empty). Any step with more
    than one token (prefill, replay) runs eagerly; a one-token step replays the graph of its layer range,
    captured at its first use (one warm-up run on a side stream, then capture; about two eager steps' time).

    :param backend: the span
    :param batch_size: rows
    :param max_length: slots per row
    :raises ValueError: (from :meth:`forward`) if a step would go past ``max_length``
    """

    def __init__(self, backend: "SpanBackend", batch_size: int, max_length: int):
        super().__init__(config=backend.span_config, max_cache_len=max_length)
        self.backend, self.rows, self.max_length = backend, batch_size, max_length
        self.valid = torch.zeros(batch_size, max_length, dtype=torch.bool, device=backend.device)
        self.slots = torch.arange(max_length, device=backend.device)
        self.used = 0  # slots written
        self.graphs = {}  # (first, last) layer index -> (graph, static inputs, static output)
        self.replays = 0
        self.capture = backend.device.type == "cuda"  # elsewhere every step runs eagerly on the static slots

    def _mask(self, q: int) -> torch.Tensor:
        """``[batch, 1, q, max_length]`` bool: which slots each of the next ``q`` tokens attends to."""
        mine = self.slots[self.used:self.used + q]  # [q]
        causal = self.slots[None, :] <= mine[:, None]  # [q, max_length]
        own = self.slots[None, :] == mine[:, None]
        return (causal[None] & (self.valid[:, None, :] | own[None]))[:, None]

    def _run(self, hidden, first, last, mask, cos, sin, position_ids):
        layers = self.backend.layers
        for i in range(first, last):
            hidden = layers[i](hidden, attention_mask=mask, position_ids=position_ids, cache=self,
                               use_cache=True, position_embeddings=(cos, sin))
        return hidden

    def forward(self, hidden: torch.Tensor, first: int, last: int, position_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Run ``hidden`` ``[batch, q, hidden_size]`` through layers ``[first, last)`` of the span (indices within
        it), appending the ``q`` tokens to this cache; ``attention_mask`` is the session's ``[batch, past + q]``
        padding mask or None. :returns: ``[batch, q, hidden_size]``"""
        b, q, _ = hidden.shape
        if b != self.rows or self.used + q > self.max_length:
            raise ValueError(f"a step of {b} x {q} tokens does not fit a cache of {self.rows} x "
                             f"{self.max_length} slots holding {self.used}")
        new = attention_mask[:, -q:].bool() if attention_mask is not None else True
        self.valid[:, self.used:self.used + q] = new
        # a first chunk without padding is plainly causal: no mask lets SDPA run it as transformers does (is_causal,
        # keys cut to the chunk), so the cache holds the same values as the growing cache's
        mask = None if (q > 1 and self.used == 0 and attention_mask is None) else self._mask(q)
        cos, sin = self.backend.rotary_emb(hidden, position_ids=position_ids)
        if q > 1 or not self.capture or not all(self.layers[i].is_initialized for i in range(first, last)):
            out = self._run(hidden, first, last, mask, cos, sin, position_ids)  # prefill, or a first step of 1
        else:
            out = self._replay(hidden, first, last, mask, cos, sin, position_ids)
        self.used += q
        return out

    def _replay(self, hidden, first, last, mask, cos, sin, position_ids):
        entry = self.graphs.get((first, last))
        if entry is None:
            static = [t.clone() for t in (hidden, mask, cos, sin, position_ids)]
            used = [self.layers[i] for i in range(first, last)]
            lengths = [layer.cumulative_length.clone() for layer in used]
            stream = torch.cuda.Stream(device=self.backend.device)
            stream.wait_stream(torch.cuda.current_stream(self.backend.device))
            with torch.cuda.stream(stream):
                self._run(static[0], first, last, *static[1:])  # warm-up: lazy buffers, library handles
            torch.cuda.current_stream(self.backend.device).wait_stream(stream)
            for layer, n in zip(used, lengths):
                layer.cumulative_length.copy_(n)  # the warm-up wrote this step's slot; the replay rewrites it
            graph = torch.cuda.CUDAGraph()
            # thread_local: other threads (a prefill of another session in the compute pool) may allocate meanwhile
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                output = self._run(static[0], first, last, *static[1:])
            entry = self.graphs[(first, last)] = (graph, static, output)
        graph, static, output = entry
        for dst, src in zip(static, (hidden, mask, cos, sin, position_ids)):
            dst.copy_(src)
        graph.replay()
        self.replays += 1
        return output.clone()


def positions_for(mask_chunk: torch.Tensor, real_tokens_before: torch.Tensor) -> torch.Tensor:
    """Position ids of new tokens, as ``transformers`` ``generate`` computes them from the attention mask.

    :param mask_chunk: ``[batch, new_tokens]`` 1 for real tokens, 0 for (left) padding
    :param real_tokens_before: ``[batch]`` real tokens already in the session
    :returns: ``[batch, new_tokens]`` int64; padding positions get 0
    """
    mask_chunk = mask_chunk.long()
    pos = real_tokens_before[:, None] + mask_chunk.cumsum(-1) - 1
    return pos.masked_fill(mask_chunk == 0, 0)
