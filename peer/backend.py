"""A span of transformer blocks, run with the model's own ``transformers`` decoder-layer classes.

:class:`SpanBackend` loads blocks ``[start, end)`` of a checkpoint (only their tensors are read) and runs
hidden states through any sub-range of them, exactly as the Hugging Face model's ``forward`` would: the same
causal/padding mask (``transformers.masking_utils.create_causal_mask``), the same rotary position embeddings
and the same per-layer KV cache, so distributed outputs equal the single-process ones.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import torch
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from protocols.model_spec import Checkpoint, build_meta_model

logger = logging.getLogger(__name__)


class SpanBackend:
    """Blocks ``[start, end)`` of a model, ready to run.

    :param checkpoint: the model's checkpoint
    :param start: first block (inclusive)
    :param end: last block (exclusive)
    :param device: torch device string
    :param dtype: parameter and activation dtype
    :raises ValueError: if the span is empty or outside the model
    """

    def __init__(self, checkpoint: Checkpoint, start: int, end: int, device: str = "cpu", dtype=torch.float32):
        if not 0 <= start < end <= checkpoint.num_blocks:
            raise ValueError(f"span {start}:{end} is outside the model's {checkpoint.num_blocks} blocks")
        self.checkpoint, self.start, self.end = checkpoint, start, end
        self.device, self.dtype = torch.device(device), dtype
        self.config = checkpoint.config
        self.span_config = checkpoint.span_config(start, end)
        self.hidden_size = int(self.config.hidden_size)

        meta = build_meta_model(self.config)
        base = meta.base_model
        self.layers = nn.ModuleList()
        t0 = time.perf_counter()
        for i in range(start, end):
            layer = base.layers[i]
            prefix = f"{meta.base_model_prefix}.layers.{i}."
            names = checkpoint.tensor_names([prefix])
            state = {n[len(prefix):]: t for n, t in checkpoint.read_tensors(names).items()}
            layer.load_state_dict(state, strict=True, assign=True)
            layer = layer.to(device=self.device, dtype=dtype)
            layer.self_attn.layer_idx = i - start  # index into this span's KV cache
            layer.eval().requires_grad_(False)
            self.layers.append(layer)
            logger.info("loaded block %d (%d/%d) in %.2fs", i, i - start + 1, end - start, time.perf_counter() - t0)
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

    def new_cache(self) -> DynamicCache:
        """An empty KV cache for one inference session over this span."""
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


def positions_for(mask_chunk: torch.Tensor, real_tokens_before: torch.Tensor) -> torch.Tensor:
    """Position ids of new tokens, as ``transformers`` ``generate`` computes them from the attention mask.

    :param mask_chunk: ``[batch, new_tokens]`` 1 for real tokens, 0 for (left) padding
    :param real_tokens_before: ``[batch]`` real tokens already in the session
    :returns: ``[batch, new_tokens]`` int64; padding positions get 0
    """
    mask_chunk = mask_chunk.long()
    pos = real_tokens_before[:, None] + mask_chunk.cumsum(-1) - 1
    return pos.masked_fill(mask_chunk == 0, 0)
