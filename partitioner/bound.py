"""An upper bound on the throughput any placement of a set of peers can serve (a relaxation of placement + routing).

For any placement and any routing at throughput ``lam`` tokens/s, peer ``i`` holding ``k_i`` blocks runs at most

* ``c_i(k_i)`` block-tokens/s (compute, with the batch its KV-cache memory allows),
* ``k_i n_i`` (each token entering its span runs at most ``k_i`` blocks there: network), and
* ``k_i lam`` (no block carries more than the ``lam`` tokens/s that flow through it: memory caps what one peer
  can take on),

that is at most ``w_i(k_i, lam) = min(c_i(k_i), k_i min(n_i, lam))`` (0 for a peer left out, ``k_i = 0``). Every
token runs all ``L`` blocks, and every block must be held by some peer, so a feasible ``lam`` admits span lengths
``k_i in {0, .., m_i}`` (``m_i`` = :func:`partitioner.cost.max_blocks`) with

    (work)      L lam <= sum_i w_i(k_i, lam)                     [block-tokens/s]
    (coverage)  L     <= sum_i k_i (1 if strong else 1/2)        [blocks]

where a span is *strong* if its per-block cap ``a_i = min(n_i, c_i(k_i)) / lam >= 1``. Through block ``b`` peer ``i``
carries ``x_ib <= min(n_i, c_i(k_i))`` tokens/s (every token it runs entered its span, at most ``n_i`` of them, and
its work is at most ``c_i``) and the holders of ``b`` carry ``lam`` together, so the holders' caps add up to at least
1. Any weights ``omega(a)`` with "caps adding up to 1 implies weights adding up to 1" then give, summed over the
holders of every block, ``sum_i omega(a_i) k_i >= L``. Two such weightings are used, each as its own constraint:
``omega = 1`` if strong else ``1/r``, where ``r`` is the fewest distinct peers whose largest caps below 1 add up to
1 (a block without a strong holder has at least ``r`` holders; ``omega = 0`` for weak spans if no such set exists,
``r`` capped at 6 for the state size), and ``omega = 1, 2/3, 1/3`` for ``a >= 1``, ``1/2 <= a < 1``, ``a < 1/2``
(caps below 1 need two holders of which one has ``a >= 1/2``, or three).
Coverage of every block, ``sum_i k_i >= L``, follows. This is the integrality the work constraint alone misses:
slow-linked peers cannot share out their capacity thinly over many blocks.

The bound is the largest such ``lam``. Both constraints hold for every placement with its own lengths, so it is a
true upper bound on :func:`partitioner.flow.max_flow` of any placement (``tests/test_partitioner.py`` checks it
against exhaustive search on small swarms). ``w_i(k, lam) / lam`` does not grow with ``lam``, so the feasible set is
an interval ``[0, lam*]`` (and a span strong at ``lam`` stays strong below it): bisection. Without the coverage
constraint each peer takes its best ``k`` (``W_i(lam) = max_k w_i(k, lam)``); when those best lengths do not
cover (small swarms, slow links), feasibility is decided exactly by a knapsack dynamic program over the covered
half-blocks (capped at ``2 L``): ``O(N L m)`` per bisection step, run only in that case.

The test compares ratios ``sum_i w_i / lam >= L`` rather than ``sum_i w_i >= L lam``: when memory is tight every
peer's term is ``k_i lam`` and the two sides are equal for a whole range of ``lam``, where the product form flips
on rounding noise (an earlier version returned less than a placement's max flow that way).

**Cover LP** (swarms of up to ``_COVER_LP_MAX_PEERS`` peers; the result is the smaller of the two bounds). The
weightings above look at each weak span on its own; the holders of a block without a strong holder must together
reach cap 1, and a slow peer with many blocks cannot do that with a partner that holds only a few. For a given
``lam`` let ``a*_i`` be peer ``i``'s largest cap over its weak lengths and call a set of weak peers a *cover* if its
``a*`` add up to at least 1. Every placement serving ``lam`` gives a point of

    v_ik >= 0 (peer i holds k blocks), z_S >= 0 (blocks whose holders' chosen minimal cover is S)
    (choice)    sum_k v_ik <= 1                                          for every peer
    (work)      sum_ik v_ik w_i(k, lam) / lam >= L
    (coverage)  sum_{ik strong} k v_ik + sum_S z_S >= L
    (weak)      sum_{S contains i} z_S <= sum_{k weak} k v_ik             for every peer

with ``v`` the 0/1 indicator of its lengths: a block's holders have actual caps ``<= a*`` adding up to at least 1,
so a block with no strong holder has only weak holders that form a cover and contain a minimal one ``S`` (pick
one per block); those blocks number ``sum_S z_S``, a peer is in at most as many of them as it holds blocks, and
only if its span is weak; the other blocks have a strong holder, at most ``sum_{strong} k_i`` of them. So if this
linear program (over all minimal covers, enumerated) is infeasible at ``lam`` no placement serves ``lam``: the
smallest infeasible ``lam`` found by bisection is a true upper bound. The LP also relaxes integrality of the
lengths, which the knapsack keeps; taking the smaller of both keeps the strength of each. It is skipped (the
knapsack bound alone is returned) when a ``lam`` has more than ``_MAX_COVERS`` minimal covers. It is the
configuration LP of bin covering (blocks are the bins, minimal covers the configurations; as in the LP-based bin
covering algorithms of Csirik, Johnson and Kenyon, SODA 2001) with the span lengths as choice variables.
``tests/test_partitioner_bound.py`` checks it against exhaustive search on tiny swarms where it binds.

Dropping the ``k_i lam`` cap and coverage gives the cruder "total compute over the work of one token through all
blocks, capped by network" (``sum_i max_k w_i(k) / L``, :func:`compute_bound`); all of these ignore contiguity and
balance, as the relaxations in Helix (Mei et al., ASPLOS 2025) and Halda / prima.cpp (Li et al., 2025) do.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from .cost import ModelSpec, PeerSpec, compute_curve, max_blocks, network_tps, work_curve

_RATIO_TOL = 1e-9  # relative slack in the ratio test (rounding only)
_MAX_HOLDERS = 6  # the holder-count weighting uses at most this many holders per weak-only block (state size)
_COVER_LP_MAX_PEERS = 32  # the cover LP runs for swarms up to this size (larger ones: the knapsack bound is tight)
_MAX_COVERS = 4000  # the cover LP is skipped when a lam has more minimal covers than this
_COVER_TOL = 1e-9  # caps adding up to 1 - _COVER_TOL count as a cover (more covers: a weaker, still valid LP)
_MILP_MAX_PEERS = 8  # upper_bound(milp_time_limit > 0) runs the exact MILP for swarms up to this size


def peer_best_work(peer: PeerSpec, model: ModelSpec) -> float:
    """``max_k w(k)``: the most block-tokens/s the peer can add to any placement."""
    curve = work_curve(peer, model)
    return float(curve.max()) if len(curve) else 0.0


def compute_bound(peers: Sequence[PeerSpec], model: ModelSpec) -> float:
    """The crude bound ``sum_i max_k w_i(k) / L``, tokens/s (0 if memory cannot hold every block)."""
    if sum(max_blocks(p, model) for p in peers) < model.num_blocks:
        return 0.0
    return sum(peer_best_work(p, model) for p in peers) / model.num_blocks


def _coverable(ratio: np.ndarray, units: np.ndarray, mem: np.ndarray, need: int) -> float:
    """Knapsack over span lengths: the most ``sum_i ratio[i, k_i - 1]`` (0 for ``k_i = 0``) over ``k_i <= mem[i]``
    with ``sum_i units[i, k_i - 1] >= need`` (-inf if no choice reaches ``need``). ``ratio``, ``units``: ``N x L``;
    a dynamic program over the covered units capped at ``need``, ``O(N need L)``."""
    dp = np.full(need + 1, -np.inf)
    dp[0] = 0.0
    j = np.arange(need + 1)
    for i in range(ratio.shape[0]):
        m = int(mem[i])
        if m <= 0:
            continue
        cand = dp[:, None] + ratio[i, :m][None, :]
        tgt = np.minimum(j[:, None] + units[i, :m][None, :], need)
        new = dp.copy()
        np.maximum.at(new, tgt.ravel(), cand.ravel())
        dp = new
    return float(dp[need])


def minimal_covers(caps: Sequence[float], limit: int = _MAX_COVERS) -> Optional[List[Tuple[int, ...]]]:
    """Every minimal set of indices whose ``caps`` add up to at least ``1 - _COVER_TOL`` (removing any member drops
    the sum below that), each as a tuple of indices in decreasing order of cap; ``None`` if there are more than
    ``limit``. Caps of 0 never help and are left out. Depth-first search over the caps sorted in decreasing order,
    pruned when the caps left cannot reach 1; a set is minimal iff dropping its smallest member breaks it."""
    caps = np.asarray(caps, dtype=np.float64)
    idx = [int(i) for i in np.argsort(-caps, kind="stable") if caps[i] > 0]
    vals = [float(caps[i]) for i in idx]
    suffix = np.concatenate((np.cumsum(vals[::-1])[::-1], [0.0])) if vals else np.zeros(1)
    need = 1 - _COVER_TOL
    out: List[Tuple[int, ...]] = []
    stack = [(0, (), 0.0)]
    while stack:
        start, chosen, total = stack.pop()
        for t in range(start, len(idx)):
            if total + suffix[t] < need:
                break
            tot = total + vals[t]
            pick = chosen + (t,)
            if tot >= need:
                if tot - vals[t] < need:  # vals[t] is the smallest member
                    out.append(tuple(idx[j] for j in pick))
                    if len(out) > limit:
                        return None
            else:
                stack.append((t + 1, pick, tot))
    return out


def _cover_lp_feasible(comp: np.ndarray, net: np.ndarray, mem: np.ndarray, L: int, lam: float) -> Optional[bool]:
    """The cover LP of the module docstring at ``lam``: False if infeasible (no placement serves ``lam``), True if
    feasible or the solver gives no verdict, None if there are too many minimal covers to write it down."""
    from scipy.optimize import linprog
    from scipy.sparse import csr_matrix

    n = comp.shape[0]
    ks = np.arange(1, L + 1, dtype=np.float64)
    cap = np.minimum(comp, net[:, None]) / lam
    ratio = np.minimum(comp / lam, ks[None, :] * np.minimum(net / lam, 1.0)[:, None])
    held = (np.arange(L)[None, :] < mem[:, None]) & (ratio > 0)
    strong = cap >= 1 - _COVER_TOL
    weak = held & ~strong
    best_weak = np.where(weak, cap, 0.0).max(axis=1)
    covers = minimal_covers(best_weak)
    if covers is None:
        return None
    vi, vk = np.nonzero(held)  # one variable v per (peer, length k = vk + 1)
    nv, nz = len(vi), len(covers)
    rows, cols, vals = [vi, np.full(nv, n), np.full(nv, n + 1)], [np.arange(nv)] * 3, [
        np.ones(nv), -ratio[vi, vk], -np.where(strong[vi, vk], vk + 1.0, 0.0)]
    w = weak[vi, vk]
    rows.append(n + 2 + vi[w])
    cols.append(np.flatnonzero(w))
    vals.append(-(vk[w] + 1.0))
    if nz:
        z_col = nv + np.arange(nz)
        rows.append(np.full(nz, n + 1))
        cols.append(z_col)
        vals.append(-np.ones(nz))
        members = [(i, nv + t) for t, cover in enumerate(covers) for i in cover]
        rows.append(n + 2 + np.array([i for i, _ in members]))
        cols.append(np.array([c for _, c in members]))
        vals.append(np.ones(len(members)))
    a_ub = csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(2 * n + 2, nv + nz))
    b_ub = np.concatenate((np.ones(n), [-L * (1 - _RATIO_TOL), -L * (1 - _RATIO_TOL)], np.zeros(n)))
    res = linprog(np.zeros(nv + nz), A_ub=a_ub, b_ub=b_ub, bounds=(0, None), method="highs")
    return res.status != 2  # 2: infeasible; any other outcome (solved, limits, numerical trouble) keeps lam


def _peer_arrays(peers: Sequence[PeerSpec], model: ModelSpec):
    """``(comp, net, mem)``: ``comp[i, k-1]`` block-tokens/s of peer ``i`` holding ``k`` blocks (0 beyond its
    memory), ``net[i]`` tokens/s its link carries into a span, ``mem[i]`` the most blocks it can hold."""
    n, L = len(peers), model.num_blocks
    comp = np.zeros((n, L))
    net = np.zeros(n)
    mem = np.zeros(n, dtype=np.int64)
    for i, p in enumerate(peers):
        c = compute_curve(p, model)
        comp[i, : len(c)] = c
        mem[i] = len(c)
        net[i] = network_tps(p, model)
    return comp, net, mem


def cover_lp_bound(peers: Sequence[PeerSpec], model: ModelSpec, hi: float, iterations: int = 30) -> float:
    """The cover LP bound of the module docstring below ``hi`` (tokens/s): ``hi`` if the LP is feasible there (or too
    big to write down), else the smallest ``lam`` found infeasible by ``iterations`` bisection steps over
    ``[0, hi]`` (an infeasible ``lam`` is above the max flow of every placement, so the result stays a true bound)."""
    L = model.num_blocks
    comp, net, mem = _peer_arrays(peers, model)
    if hi <= 0 or _cover_lp_feasible(comp, net, mem, L, hi) is not False:
        return hi
    lo = 0.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        ok = _cover_lp_feasible(comp, net, mem, L, mid)
        if ok is None:
            break
        if ok:
            lo = mid
        else:
            hi = mid
    return hi


def upper_bound(peers: Sequence[PeerSpec], model: ModelSpec, iterations: int = 60, *, coverage: bool = True,
                cover_lp: bool = True, milp_time_limit: float = 0.0, milp_max_peers: int = _MILP_MAX_PEERS,
                milp_lower: float = 0.0) -> float:
    """The bound in the module docstring, tokens/s through all blocks (0 if memory cannot hold every block).

    :param iterations: bisection steps (relative precision ``2^-iterations`` of the crude bound)
    :param coverage: enforce the coverage constraint (the default; False gives the looser work-only bound)
    :param cover_lp: also apply the cover LP (:func:`cover_lp_bound`) to swarms of up to ``_COVER_LP_MAX_PEERS``
        peers and return the smaller bound (the default; False gives the knapsack bound alone)
    :param milp_time_limit: if positive, swarms of up to ``milp_max_peers`` peers also get the exact placement MILP
        (:func:`partitioner.milp.solve`, at most this many seconds) and the smaller of both bounds is returned: the
        MILP's *dual* bound, a true bound however early the time limit stops it (equal to the best placement's
        max flow when it finishes). Off by default: the bound is also the target of the placement heuristics, which
        call it often. Measured on the benchmark's swarms (32-80 blocks): 4 peers solve exactly in about 0.2-5 s;
        at 8 peers and more the dual bound does not get below this bound within 10 s
    :param milp_lower: with ``milp_time_limit``: the throughput of a placement already known (tokens/s), a cutoff
        that prunes the MILP's search (it may then prove that placement optimal)
    """
    L = model.num_blocks
    if not peers or sum(max_blocks(p, model) for p in peers) < L:
        return 0.0
    n = len(peers)
    comp, net, mem = _peer_arrays(peers, model)
    ks = np.arange(1, L + 1, dtype=np.float64)

    def ratio(lam: float) -> np.ndarray:  # w_i(k, lam) / lam, N x L (0 beyond a peer's memory)
        return np.minimum(comp / lam, ks[None, :] * np.minimum(net / lam, 1.0)[:, None])

    def free_ok(lam: float) -> bool:
        return float(ratio(lam).max(axis=1).sum()) >= L * (1 - _RATIO_TOL)

    def covered_ok(lam: float) -> bool:
        r = ratio(lam)
        best = r.max(axis=1)
        if best.sum() < L * (1 - _RATIO_TOL):
            return False
        # a span's class by its per-block cap a = min(n_i, c_i(k)) / lam: strong (a >= 1), half (a >= 1/2), thin
        cap = np.minimum(comp, net[:, None]) / lam
        strong = cap >= 1 - 1e-9
        half = cap >= 0.5 - 1e-9
        longest = [int(np.flatnonzero(r[i] >= best[i] * (1 - 1e-12))[-1]) if best[i] > 0 else -1 for i in range(n)]
        # fewest distinct weak holders whose caps can add up to 1 (each peer at its largest weak cap)
        weak_cap = np.where(strong, 0.0, cap)
        top = np.sort(weak_cap.max(axis=1))[::-1]
        reach = np.flatnonzero(np.cumsum(top) >= 1 - 1e-9)
        fewest = int(reach[0]) + 1 if len(reach) else 0  # 0: no block can be served by weak spans alone
        weightings = [(3, 2, 1)]
        if fewest == 0:
            weightings.append((1, 0, 0))
        else:
            r_ = min(fewest, _MAX_HOLDERS)
            weightings.append((r_, 1, 1))
        for unit_of in weightings:
            den = unit_of[0]
            units = np.where(strong, unit_of[0], np.where(half, unit_of[1], unit_of[2])) * ks.astype(np.int64)[None, :]
            # quick sufficient test: each peer at its longest best length already covers the model
            if sum(int(units[i, k]) for i, k in enumerate(longest) if k >= 0) >= den * L:
                continue
            if _coverable(r, units, mem, den * L) < L * (1 - _RATIO_TOL):
                return False
        return True

    def bisect(ok, lo: float, hi: float, steps: int = iterations) -> float:
        for _ in range(steps):
            mid = (lo + hi) / 2
            if mid <= 0:
                break
            if ok(mid):
                lo = mid
            else:
                hi = mid
        return lo

    hi = float(np.minimum(comp, ks[None, :] * net[:, None]).max(axis=1).sum()) / L * (1 + 1e-9)
    if hi <= 0:
        return 0.0
    lam = bisect(free_ok, 0.0, hi)
    if not coverage or lam <= 0:
        return lam
    if not covered_ok(lam):
        lam = bisect(covered_ok, 0.0, lam, 40)
    if cover_lp and n <= _COVER_LP_MAX_PEERS and lam > 0:
        lam = min(lam, cover_lp_bound(peers, model, lam))
    if milp_time_limit > 0 and n <= milp_max_peers and lam > 0:
        from .milp import solve

        lam = min(lam, solve(peers, model, time_limit=milp_time_limit, upper=lam, lower=min(milp_lower, lam)).bound)
    return lam
