"""The cost model: what a peer holding a span of blocks can do, in time and throughput.

Plain numbers in, plain numbers out; every other partitioner module builds on these few functions.

Notation (units in brackets), for one peer and one model:

* ``W``  [bytes]      weights of one block (``ModelSpec.block_bytes``)
* ``H``  [bytes]      one token's hidden state on the wire (``ModelSpec.hidden_bytes``)
* ``C``  [bytes]      KV cache of one token in one block (``ModelSpec.cache_bytes_per_token``)
* ``T``  [tokens]     context a session reserves cache for (``ModelSpec.context_tokens``)
* ``M``  [bytes]      memory the peer gives to blocks and cache (``PeerSpec.memory_bytes``)
* ``t1 = 1 / block_tps``            [s] marginal time of one more token in a batch through one block
* ``t0 = 1 / decode_sps - t1``      [s] fixed time of one batched step through one block (reading the weights)
* ``bw`` [bytes/s]    the peer's link, each direction (``PeerSpec.bandwidth``); ``rtt`` [s] its round trip

A peer holding ``k`` blocks keeps ``M - k W`` bytes for KV cache, so each of its blocks holds
``B(k) = floor((M - k W) / (k T C))`` concurrent sessions (its batch). A batched step of ``B`` tokens through one
block takes ``t0 + B t1`` seconds (the usual roofline-style "weights once, activations per token" model), so the
peer computes at most

    c(k) = B(k) / (t0 + B(k) t1)                 [block-tokens/s: tokens/s through one block, shared by its k blocks]

and its link passes at most ``n = bw / H`` tokens/s into (and out of) its span. Each token that enters the span
runs at most ``k`` blocks there, so the work a peer can contribute to the swarm is

    w(k) = min(c(k), k n)                        [block-tokens/s]

Latency of one hop (the formula :func:`hop_time` implements), for ``tokens`` tokens entering at block ``a`` and
leaving after ``b - a = j`` blocks:

    prefill:      rtt + 2 tokens H / bw + j (t0 + tokens t1)      [s]
    decode step:  rtt + 2 H / bw + j / decode_sps                 [s]     (one token, batch 1)

(each hop moves one hidden state per token in, one out, and pays one round trip). This is the per-hop model of
Petals (Borzunov et al., "Petals: Collaborative Inference and Fine-tuning of Large Models", 2023) with the
batching roofline of "Efficiently Scaling Transformer Inference" (Pope et al., 2022) and the memory/throughput
trade-off of Helix (Mei et al., "Helix: Serving LLMs via max-flow on heterogeneous GPUs", 2025).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ModelSpec:
    """What the cost model needs to know about a model.

    :param num_blocks: transformer blocks ``L``
    :param block_bytes: weights of one block, bytes
    :param hidden_bytes: one token's hidden state as sent between peers, bytes
    :param cache_bytes_per_token: KV cache of one token in one block, bytes
    :param context_tokens: tokens of context one session reserves cache for
    """

    num_blocks: int
    block_bytes: float
    hidden_bytes: float
    cache_bytes_per_token: float
    context_tokens: int = 2048

    def session_bytes(self) -> float:
        """KV cache one session needs in one block, bytes."""
        return self.cache_bytes_per_token * self.context_tokens


@dataclass(frozen=True)
class PeerSpec:
    """A peer's measured capabilities (what its DHT record announces).

    :param peer_id: the peer's id
    :param block_tps: tokens/s through one block at a full batch (compute bound)
    :param decode_sps: decode steps/s through one block at batch 1 (weight-read bound)
    :param memory_bytes: memory given to blocks and KV cache, bytes
    :param bandwidth: link bandwidth each way, bytes/s
    :param rtt: round-trip time to the rest of the swarm, s
    :param max_batch: most sessions one batched step may hold (a device limit), sessions
    """

    peer_id: str
    block_tps: float
    decode_sps: float
    memory_bytes: float
    bandwidth: float
    rtt: float = 0.05
    max_batch: int = 512

    @property
    def t1(self) -> float:
        """Marginal seconds per token per block."""
        return 1.0 / max(self.block_tps, 1e-12)

    @property
    def t0(self) -> float:
        """Fixed seconds per batched step per block (never negative)."""
        return max(1.0 / max(self.decode_sps, 1e-12) - self.t1, 0.0)


def max_blocks(peer: PeerSpec, model: ModelSpec, min_sessions: int = 1) -> int:
    """Most blocks the peer can hold while keeping KV cache for ``min_sessions`` sessions in each block.

    ``floor(M / (W + min_sessions T C))``, capped at the model's ``L``; 0 if not even one block fits.
    """
    per_block = model.block_bytes + min_sessions * model.session_bytes()
    return int(max(0, min(model.num_blocks, math.floor(peer.memory_bytes / per_block + 1e-9))))


def batch_size(peer: PeerSpec, model: ModelSpec, k: int) -> int:
    """Concurrent sessions each of the peer's ``k`` blocks can hold: ``B(k) = floor((M - k W) / (k T C))``,
    capped at ``peer.max_batch``; 0 if the span does not fit."""
    if k <= 0:
        return 0
    free = peer.memory_bytes - k * model.block_bytes
    if free <= 0:
        return 0
    sessions = math.floor(free / (k * model.session_bytes()) + 1e-9)
    return int(max(0, min(sessions, peer.max_batch)))


def compute_tps(peer: PeerSpec, model: ModelSpec, k: int) -> float:
    """``c(k) = B / (t0 + B t1)``: block-tokens/s the peer computes when holding ``k`` blocks (0 if they don't fit)."""
    b = batch_size(peer, model, k)
    if b <= 0:
        return 0.0
    return b / (peer.t0 + b * peer.t1)


def network_tps(peer: PeerSpec, model: ModelSpec) -> float:
    """``n = bw / H``: tokens/s that can enter (and leave) the peer's span."""
    return peer.bandwidth / max(model.hidden_bytes, 1e-12)


def work_tps(peer: PeerSpec, model: ModelSpec, k: int) -> float:
    """``w(k) = min(c(k), k n)``: block-tokens/s the peer adds to the swarm when holding ``k`` blocks."""
    return min(compute_tps(peer, model, k), k * network_tps(peer, model))


def best_length(peer: PeerSpec, model: ModelSpec, tolerance: float = 0.01, max_k: Optional[int] = None) -> int:
    """The span length that maximizes :func:`work_tps`; among lengths within ``tolerance`` of the best, the
    longest (a longer span gives the router more room at no cost in throughput). 0 if no block fits."""
    top = max_k if max_k is not None else max_blocks(peer, model)
    if top <= 0:
        return 0
    works = [work_tps(peer, model, k) for k in range(1, top + 1)]
    best = max(works)
    if best <= 0:
        return 0
    return max(k for k, w in enumerate(works, start=1) if w >= (1 - tolerance) * best)


def hop_time(peer: PeerSpec, model: ModelSpec, blocks: int, tokens: int = 1, decode: bool = True) -> float:
    """Seconds for one hop through ``blocks`` of the peer's blocks (formula in the module docstring).

    :param blocks: blocks run on this peer in this hop
    :param tokens: tokens sent in this hop (1 for a decode step)
    :param decode: True for a batch-1 decode step, False for a prefill of ``tokens`` tokens
    """
    wire = peer.rtt + 2 * tokens * model.hidden_bytes / max(peer.bandwidth, 1e-12)
    if decode:
        return wire + blocks * tokens / max(peer.decode_sps, 1e-12)
    return wire + blocks * (peer.t0 + tokens * peer.t1)


def prefill_time(peer: PeerSpec, model: ModelSpec, blocks: int, tokens: int) -> float:
    """Seconds for a prefill of ``tokens`` tokens through ``blocks`` blocks of this peer, round trip included."""
    return hop_time(peer, model, blocks, tokens, decode=False)


def decode_step_time(peer: PeerSpec, model: ModelSpec, blocks: int) -> float:
    """Seconds for one batch-1 decode step through ``blocks`` blocks of this peer, round trip included."""
    return hop_time(peer, model, blocks, 1, decode=True)


def work_curve(peer: PeerSpec, model: ModelSpec, max_k: Optional[int] = None):
    """:func:`work_tps` for every span length ``k = 1..max_k`` at once (a numpy array, index ``k - 1``).

    ``max_k`` defaults to :func:`max_blocks`; lengths that do not fit give 0.
    """
    import numpy as np

    top = max_blocks(peer, model) if max_k is None else max_k
    if top <= 0:
        return np.zeros(0)
    k = np.arange(1, top + 1, dtype=np.float64)
    free = peer.memory_bytes - k * model.block_bytes
    batch = np.floor(np.maximum(free, 0.0) / (k * model.session_bytes()) + 1e-9)
    batch = np.minimum(batch, peer.max_batch)
    with np.errstate(divide="ignore", invalid="ignore"):
        comp = np.where(batch > 0, batch / (peer.t0 + batch * peer.t1), 0.0)
    return np.minimum(comp, k * network_tps(peer, model))


def compute_curve(peer: PeerSpec, model: ModelSpec, max_k: Optional[int] = None):
    """:func:`compute_tps` for every span length ``k = 1..max_k`` (numpy array, index ``k - 1``)."""
    import numpy as np

    top = max_blocks(peer, model) if max_k is None else max_k
    if top <= 0:
        return np.zeros(0)
    k = np.arange(1, top + 1, dtype=np.float64)
    free = peer.memory_bytes - k * model.block_bytes
    batch = np.minimum(np.floor(np.maximum(free, 0.0) / (k * model.session_bytes()) + 1e-9), peer.max_batch)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(batch > 0, batch / (peer.t0 + batch * peer.t1), 0.0)
