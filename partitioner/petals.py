"""The Petals baseline, written from its published description, for comparison only.

Petals 2.x (Borzunov et al., "Distributed Inference and Fine-tuning of Large Language Models Over The Internet",
NeurIPS 2023) as summarized in ``shared/anchors.md``:

* a server announces one throughput for all its blocks: ``min(forward tokens/s per block / ((k + 1) / 2), network
  tokens/s)``, and takes all the blocks its memory allows after reserving its attention cache;
* join: the window whose sorted per-block throughput sums are lexicographically smallest
  (:func:`partitioner.placement.choose_span`);
* rebalancing: a server re-simulates the swarm with itself moved to its best window and the other servers
  then moving greedily; it moves if the weakest block's throughput would grow by more than ``1 / 0.75``;
* routing: the lowest-latency chain for inference (:func:`partitioner.route.find_chain`), and for throughput, from
  each block, a span that holds it picked at random in proportion to its length, run to the span's end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .cost import ModelSpec, PeerSpec, max_blocks, network_tps
from .flow import Usage
from .placement import choose_span

PETALS_CACHE_SESSIONS = 8  # Petals reserves its attention cache up front; 8 sessions of the model's context
BALANCE_QUALITY = 0.75


def petals_length(peer: PeerSpec, model: ModelSpec) -> int:
    """Blocks a Petals server takes: all that fit next to its reserved attention cache (at least 1)."""
    return max(1, max_blocks(peer, model, PETALS_CACHE_SESSIONS))


def petals_throughput(peer: PeerSpec, model: ModelSpec, k: int) -> float:
    """The one throughput number a Petals server announces for each of its ``k`` blocks, tokens/s:
    ``min(block_tps / ((k + 1) / 2), bandwidth / hidden_bytes)``."""
    return min(peer.block_tps / ((k + 1) / 2.0), network_tps(peer, model))


def _block_sums(num_blocks: int, spans: Sequence[Tuple[int, int, float]]) -> np.ndarray:
    diff = np.zeros(num_blocks + 1)
    for s, e, t in spans:
        diff[s] += t
        diff[e] -= t
    return np.cumsum(diff[:-1])


def _best_start(per_block: np.ndarray, k: int) -> int:
    """Petals' window rule on a per-block throughput array (vectorized :func:`choose_span`)."""
    L = len(per_block)
    if k >= L:
        return 0
    windows = np.sort(np.lib.stride_tricks.sliding_window_view(per_block, k), axis=1)
    order = np.lexsort(windows.T[::-1])
    return int(order[0])


def petals_place(peers: Sequence[PeerSpec], model: ModelSpec) -> Dict[str, Tuple[int, int]]:
    """Spans of Petals servers joining one after another in the given order, each with the join rule."""
    L = model.num_blocks
    per_block = np.zeros(L)
    out: Dict[str, Tuple[int, int]] = {}
    for p in peers:
        k = min(petals_length(p, model), L)
        s = _best_start(per_block, k)
        out[p.peer_id] = (s, s + k)
        per_block[s:s + k] += max(petals_throughput(p, model, k), 1e-9)
    return out


def petals_join(peer: PeerSpec, model: ModelSpec, placement: Dict[str, Tuple[int, int]],
                peers: Dict[str, PeerSpec]) -> Tuple[int, int]:
    """The span a joining Petals server takes in a running swarm."""
    L = model.num_blocks
    spans = [(s, e, petals_throughput(peers[pid], model, e - s)) for pid, (s, e) in placement.items()]
    k = min(petals_length(peer, model), L)
    s = choose_span(L, k, spans) if len(spans) < 64 else _best_start(_block_sums(L, spans), k)
    return s, s + k


def petals_should_move(peer_id: str, model: ModelSpec, placement: Dict[str, Tuple[int, int]],
                       peers: Dict[str, PeerSpec], quality: float = BALANCE_QUALITY,
                       max_rounds: int = 3) -> Optional[int]:
    """Petals' rebalancing check for one server: the new start block if it should move, else None."""
    L = model.num_blocks
    tp = {pid: petals_throughput(peers[pid], model, e - s) for pid, (s, e) in placement.items()}
    per_block = _block_sums(L, [(s, e, tp[pid]) for pid, (s, e) in placement.items()])
    initial = per_block.min()
    s0, e0 = placement[peer_id]
    k = e0 - s0
    per_block[s0:e0] -= tp[peer_id]
    new_start = _best_start(per_block, k)
    if new_start == s0:
        return None
    per_block[new_start:new_start + k] += tp[peer_id]
    sim = dict(placement)
    sim[peer_id] = (new_start, new_start + k)
    for _ in range(max_rounds):
        moved = False
        for pid, (s, e) in sim.items():
            if pid == peer_id:
                continue
            per_block[s:e] -= tp[pid]
            s2 = _best_start(per_block, e - s)
            per_block[s2:s2 + e - s] += tp[pid]
            if s2 != s:
                sim[pid] = (s2, s2 + e - s)
                moved = True
        if not moved:
            break
    new = per_block.min()
    if new <= 0:
        return None
    return new_start if initial / new < quality - 1e-9 else None


@dataclass
class PetalsMove:
    """One server's move in the Petals process: ``peer_id`` goes from ``old`` to ``new`` (start, end)."""

    peer_id: str
    old: Tuple[int, int]
    new: Tuple[int, int]


def petals_rebalance(model: ModelSpec, placement: Dict[str, Tuple[int, int]], peers: Dict[str, PeerSpec],
                     rng: np.random.Generator, rounds: int = 3) -> List[PetalsMove]:
    """Petals' rebalancing as it happens in a swarm: servers wake up in random order (every 0–120 s), each runs
    :func:`petals_should_move` and moves at once if it says so. ``placement`` is updated in place."""
    moves: List[PetalsMove] = []
    for _ in range(rounds):
        any_move = False
        for pid in rng.permutation(sorted(placement)):
            pid = str(pid)
            ns = petals_should_move(pid, model, placement, peers)
            if ns is not None:
                s, e = placement[pid]
                placement[pid] = (ns, ns + e - s)
                moves.append(PetalsMove(pid, (s, e), placement[pid]))
                any_move = True
        if not any_move:
            break
    return moves


def petals_usage(placement: Dict[str, Tuple[int, int]], num_blocks: int) -> Usage:
    """Per-token usage of Petals' throughput routing (from each block, a span holding it picked in proportion to its
    length, run to its end), computed exactly over the random choices. Empty if some block is unserved."""
    L = num_blocks
    holders: List[List[Tuple[str, int, int]]] = [[] for _ in range(L)]
    for pid, (s, e) in placement.items():
        for b in range(max(s, 0), min(e, L)):
            holders[b].append((pid, s, e))
    prob = np.zeros(L + 1)
    prob[0] = 1.0
    use = Usage()
    for b in range(L):
        if prob[b] <= 0:
            continue
        cands = holders[b]
        if not cands:
            return Usage()
        total = float(sum(e - s for _, s, e in cands))
        for pid, s, e in cands:
            q = prob[b] * (e - s) / total
            use.add(pid, q * (e - b), q)
            prob[e] += q
    return use
