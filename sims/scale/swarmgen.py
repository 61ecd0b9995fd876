"""Random heterogeneous swarms for the simulator.

A model of ``L`` blocks (32–80) whose size grows with ``L`` from a 7B-class model (hidden 4096) to a 70B-class one
(hidden 8192, grouped-query attention), in 16-bit weights. Peers:

* compute: full-batch tokens/s through one block, log-uniform over a 30x range (about 3 to 90 TFLOP/s effective);
  the batch-1 decode rate follows from a FLOP-to-memory-bandwidth ratio of 20–200 (CPU boxes to datacenter GPUs);
* memory: room for 1 to ``L`` blocks (log-uniform), counted with Petals' default KV-cache reservation
  (8 sessions of 2048 tokens per block), so every peer can hold at least one block;
* network: 10 Mbit/s to 1 Gbit/s each way (log-uniform), round-trip time 1–150 ms (uniform).

Swarms are redrawn until their memory can hold every block at least once (otherwise nothing can be served).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List

import numpy as np

from partitioner.cost import ModelSpec, PeerSpec, max_blocks

PETALS_CACHE_SESSIONS = 8


def make_model(num_blocks: int) -> ModelSpec:
    """A Llama-like model of ``num_blocks`` blocks; hidden size from 4096 (32 blocks) to 8192 (80 blocks)."""
    frac = (num_blocks - 32) / 48.0
    hidden = int(round((4096 + frac * 4096) / 128) * 128)
    kv_dim = hidden // 8 if num_blocks > 40 else hidden  # GQA on the larger models
    return ModelSpec(
        num_blocks=num_blocks,
        block_bytes=12 * hidden * hidden * 2.0,  # 12 d^2 parameters, 2 bytes each
        hidden_bytes=hidden * 2.0,
        cache_bytes_per_token=2 * kv_dim * 2.0,  # K and V, 2 bytes each
        context_tokens=2048,
    )


def make_peer(rng: np.random.Generator, model: ModelSpec, peer_id: str) -> PeerSpec:
    """One random peer for ``model`` (distributions in the module docstring)."""
    L = model.num_blocks
    flops = math.exp(rng.uniform(math.log(3e12), math.log(90e12)))
    flop_per_byte = math.exp(rng.uniform(math.log(20), math.log(200)))
    flops_per_token = model.block_bytes  # 2 FLOPs per parameter, 2 bytes per parameter
    block_tps = flops / flops_per_token
    t1 = 1.0 / block_tps
    t0 = model.block_bytes / (flops / flop_per_byte)
    blocks = math.exp(rng.uniform(0.0, math.log(L)))
    memory = blocks * (model.block_bytes + PETALS_CACHE_SESSIONS * model.session_bytes()) * 1.0001
    bandwidth = math.exp(rng.uniform(math.log(10e6 / 8), math.log(1e9 / 8)))
    rtt = rng.uniform(0.001, 0.150)
    return PeerSpec(peer_id, block_tps=block_tps, decode_sps=1.0 / (t0 + t1), memory_bytes=memory,
                    bandwidth=bandwidth, rtt=rtt)


@dataclass
class Swarm:
    """A model and its peers."""

    model: ModelSpec
    peers: List[PeerSpec]


def make_swarm(rng: np.random.Generator, num_peers: int, num_blocks: int = 0, prefix: str = "p") -> Swarm:
    """A random swarm of ``num_peers`` peers whose memory covers every block; ``num_blocks`` 0 draws 32–80."""
    L = num_blocks or int(rng.integers(32, 81))
    model = make_model(L)
    while True:
        peers = [make_peer(rng, model, f"{prefix}{i}") for i in range(num_peers)]
        if sum(max_blocks(p, model, PETALS_CACHE_SESSIONS) for p in peers) >= L:
            return Swarm(model, peers)
