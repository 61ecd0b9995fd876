"""An upper bound on the throughput any placement of a set of peers can serve (a contiguity relaxation).

For any placement and any routing at throughput ``lam`` tokens/s, peer ``i`` holding ``k_i`` blocks runs at most

* ``c_i(k_i)`` block-tokens/s (compute, with the batch its KV-cache memory allows),
* ``k_i n_i`` (each token entering its span runs at most ``k_i`` blocks there: network), and
* ``k_i lam`` (no block carries more than the ``lam`` tokens/s that flow through it: memory caps what one peer
  can take on),

that is at most ``W_i(lam) = max_k min(c_i(k), k min(n_i, lam))`` (:func:`partitioner.cost.work_curve`). Every token
runs all ``L`` blocks, so a feasible ``lam`` satisfies

    L lam <= sum_i W_i(lam)                            [block-tokens/s]

and the bound is the largest such ``lam`` (the left side grows linearly, the right side is concave: bisection). It
is 0 if the peers' memory cannot hold every block once. Dropping the third cap gives the cruder
"total compute over the work of one token through all blocks, capped by network" (``sum_i max_k w_i(k) / L``,
:func:`compute_bound`); both ignore contiguity and balance, as the relaxations in Helix (Mei et al., ASPLOS 2025)
and Halda / prima.cpp (Li et al., 2025) do.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .cost import ModelSpec, PeerSpec, compute_curve, max_blocks, network_tps, work_curve


def peer_best_work(peer: PeerSpec, model: ModelSpec) -> float:
    """``max_k w(k)``: the most block-tokens/s the peer can add to any placement."""
    curve = work_curve(peer, model)
    return float(curve.max()) if len(curve) else 0.0


def compute_bound(peers: Sequence[PeerSpec], model: ModelSpec) -> float:
    """The crude bound ``sum_i max_k w_i(k) / L``, tokens/s (0 if memory cannot hold every block)."""
    if sum(max_blocks(p, model) for p in peers) < model.num_blocks:
        return 0.0
    return sum(peer_best_work(p, model) for p in peers) / model.num_blocks


def upper_bound(peers: Sequence[PeerSpec], model: ModelSpec, iterations: int = 60) -> float:
    """The bound in the module docstring, tokens/s through all blocks."""
    L = model.num_blocks
    if not peers or sum(max_blocks(p, model) for p in peers) < L:
        return 0.0
    comp = np.zeros((len(peers), L))
    net = np.zeros(len(peers))
    for i, p in enumerate(peers):
        c = compute_curve(p, model)
        comp[i, : len(c)] = c
        net[i] = network_tps(p, model)
    ks = np.arange(1, L + 1, dtype=np.float64)

    def supply(lam: float) -> float:
        per_k = np.minimum(comp, ks[None, :] * np.minimum(net, lam)[:, None])
        return float(per_k.max(axis=1).sum())

    lo, hi = 0.0, float(np.minimum(comp, ks[None, :] * net[:, None]).max(axis=1).sum()) / L
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if supply(mid) >= L * mid:
            lo = mid
        else:
            hi = mid
    return lo
