"""Choosing spans: the span a joining peer takes, and a placement for a whole set of peers.

:func:`choose_span` is the Petals join rule (kept for the peer daemon and as the baseline); :func:`choose_span_for`
and :func:`plan_placement` are ours (they pick the length as well as the start, against the upper bound);
:func:`search_with_flow` improves a placement of a small swarm with the max-flow LP in the loop (also used by
:func:`partitioner.rebalance.plan_rebalance` under a move budget).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .cost import ModelSpec, PeerSpec, max_blocks, work_curve


def choose_span(num_blocks: int, span_length: int, spans: Sequence[Tuple[int, int, float]]) -> int:
    """The first block of the ``span_length``-block window that the swarm serves worst.

    Each block's service is the sum of the announced throughput of the peers holding it; the window whose
    sorted per-block throughputs are lexicographically smallest is chosen (the weakest blocks first), the
    rule Petals uses for a joining server.

    :param num_blocks: blocks in the model
    :param span_length: blocks the joining peer can hold (``1 <= span_length <= num_blocks``)
    :param spans: ``(start, end, throughput)`` of every peer already serving
    :returns: the start block of the chosen window
    :raises ValueError: if ``span_length`` is out of range
    """
    if not 1 <= span_length <= num_blocks:
        raise ValueError(f"span length {span_length} must be in [1, {num_blocks}]")
    per_block = [0.0] * num_blocks
    for start, end, throughput in spans:
        for b in range(max(start, 0), min(end, num_blocks)):
            per_block[b] += max(throughput, 1e-9)
    best_start, best_key = 0, None
    for start in range(num_blocks - span_length + 1):
        key = sorted(per_block[start : start + span_length])
        if best_key is None or key < best_key:
            best_start, best_key = start, key
    return best_start


# ---------------------------------------------------------------------------------------------------------------
# Our placement: spans (start and length) that flatten the swarm's supply of work across blocks.
# ---------------------------------------------------------------------------------------------------------------

def supply_profile(num_blocks: int, spans: Sequence[Tuple[int, int, float]]) -> np.ndarray:
    """Per-block supply, tokens/s: the sum of ``per_block`` over the ``(start, end, per_block)`` spans holding
    each block (a difference array, ``O(len(spans) + num_blocks)``)."""
    diff = np.zeros(num_blocks + 1)
    if len(spans):
        arr = np.asarray(spans, dtype=np.float64).reshape(-1, 3)
        s = np.clip(arr[:, 0].astype(np.int64), 0, num_blocks)
        e = np.clip(arr[:, 1].astype(np.int64), 0, num_blocks)
        np.add.at(diff, s, arr[:, 2])
        np.add.at(diff, e, -arr[:, 2])
    return np.cumsum(diff[:-1])


def candidate_lengths(curve: np.ndarray, keep: float = 0.5, most: int = 24) -> np.ndarray:
    """Span lengths worth trying for a peer with work curve ``curve`` (``w(k)`` at index ``k - 1``): those within
    ``keep`` of its best work, at most ``most`` of them (spread geometrically), always including the best."""
    if len(curve) == 0:
        return np.zeros(0, dtype=np.int64)
    best = curve.max()
    ks = np.flatnonzero(curve >= keep * best) + 1
    if len(ks) > most:
        picks = np.unique(np.round(np.geomspace(ks[0], ks[-1], most)).astype(np.int64))
        ks = np.intersect1d(ks, picks)
    top = int(np.flatnonzero(curve >= (1 - 1e-2) * best)[-1] + 1)
    return np.union1d(ks, [top])


def rank_windows(curve: np.ndarray, profile: np.ndarray, target: float, *, lengths: Optional[np.ndarray] = None,
                 uncovered: Optional[np.ndarray] = None, top: int = 1, fragile: Optional[np.ndarray] = None,
                 fragile_weight: float = 0.0) -> List[Tuple[float, int, int]]:
    """The best ``(score, start, length)`` windows for a peer with work curve ``curve`` (``w(k)`` at ``k - 1``,
    block-tokens/s) given the swarm's per-block ``profile`` (tokens/s), best first.

    Holding ``k`` blocks the peer adds ``h = w(k) / k`` tokens/s to each (its work spread evenly; the router may
    shift it). The score of a window is the deficit it fills, ``sum_b min(h, max(0, target - profile[b]))``
    [tokens/s x blocks], plus a large bonus per ``uncovered`` block it covers and ``fragile_weight x target`` per
    ``fragile`` block (one served by a single peer: a replica there keeps the model served if that peer leaves);
    ties go to the window with the least supply (the weakest blocks first, as in Petals). Prefix sums: ``O(L)``
    per candidate length.
    """
    L = len(profile)
    if lengths is None:
        lengths = candidate_lengths(curve)
    deficit = np.maximum(target - profile, 0.0)
    scale = max(target, float(profile.max()) if L else 0.0, 1e-12)
    cover_bonus = 10.0 * scale * L
    cum_prof = np.concatenate(([0.0], np.cumsum(profile)))
    cum_unc = np.concatenate(([0.0], np.cumsum(uncovered))) if uncovered is not None else None
    cum_frag = np.concatenate(([0.0], np.cumsum(fragile))) if fragile is not None and fragile_weight > 0 else None
    found: List[Tuple[float, int, int]] = []
    for k in lengths:
        k = int(k)
        if k < 1 or k > L or k > len(curve):
            continue
        h = curve[k - 1] / k
        if h <= 0:
            continue
        cum = np.concatenate(([0.0], np.cumsum(np.minimum(h, deficit))))
        score = (cum[k:] - cum[:-k]) - 1e-6 * (cum_prof[k:] - cum_prof[:-k]) / k
        if cum_unc is not None:
            score = score + cover_bonus * (cum_unc[k:] - cum_unc[:-k])
        if cum_frag is not None:
            score = score + fragile_weight * target * (cum_frag[k:] - cum_frag[:-k])
        if top == 1:
            s = int(np.argmax(score))
            found.append((float(score[s]), s, k))
        else:
            for s in np.argsort(-score)[:top]:
                found.append((float(score[s]), int(s), k))
    found.sort(key=lambda t: -t[0])
    return found[:top]


def best_window(curve: np.ndarray, profile: np.ndarray, target: float,
                lengths: Optional[np.ndarray] = None, uncovered: Optional[np.ndarray] = None,
                fragile: Optional[np.ndarray] = None, fragile_weight: float = 0.0) -> Tuple[int, int, float]:
    """The ``(start, length, work)`` a peer should take (the best of :func:`rank_windows`)."""
    ranked = rank_windows(curve, profile, target, lengths=lengths, uncovered=uncovered, top=1, fragile=fragile,
                          fragile_weight=fragile_weight)
    if not ranked:
        return 0, 1, float(curve[0]) if len(curve) else 0.0
    _, s, k = ranked[0]
    return s, k, float(curve[k - 1])


def choose_span_for(peer: PeerSpec, model: ModelSpec, spans: Sequence[Tuple[int, int, float]], *,
                    fragile_weight: float = 0.5) -> Tuple[int, int]:
    """Our join rule: the ``(start, end)`` a joining peer should take in a running swarm (start and length).

    :param spans: ``(start, end, per_block)`` of the peers already serving, ``per_block`` in tokens/s (their work
        :func:`partitioner.cost.work_tps` divided by their span length)
    :param fragile_weight: worth of a replica on a block only one peer serves, in blocks' worth of the target
    :returns: the span, chosen by :func:`best_window` against the target ``(total work + this peer's best) / L``
        (the crude bound :func:`partitioner.bound.compute_bound` after it joins): blocks nobody serves first,
        then the deficit it fills, then replicas for single-served blocks. ``O(len(spans) + L * lengths)``:
        about 10 ms for 10,000 peers.
    """
    L = model.num_blocks
    curve = work_curve(peer, model)
    if len(curve) == 0:
        raise ValueError(f"peer {peer.peer_id} cannot hold a single block")
    profile = supply_profile(L, spans)
    total = sum(float(w) * (e - s) for s, e, w in spans) if len(spans) < 4096 else float(
        np.sum((np.asarray(spans)[:, 1] - np.asarray(spans)[:, 0]) * np.asarray(spans)[:, 2]))
    target = (total + float(curve.max())) / L
    count = supply_profile(L, [(s, e, 1.0) for s, e, _ in spans]) if len(spans) < 4096 else supply_profile(
        L, np.column_stack((np.asarray(spans)[:, :2], np.ones(len(spans)))))
    uncovered = (count <= 0).astype(np.float64)
    fragile = (np.abs(count - 1) < 0.5).astype(np.float64)
    s, k, _ = best_window(curve, profile, target, uncovered=uncovered, fragile=fragile, fragile_weight=fragile_weight)
    return s, s + k


Placement = Dict[str, Tuple[int, int]]


def profile_score(placement: Placement, per_block: Dict[str, float], num_blocks: int) -> float:
    """The weakest block's supply when each peer spreads its work evenly over its span, tokens/s (0 if a block is
    unserved): a quick stand-in for the evaluator, which can only do better when no link is the bottleneck."""
    prof = supply_profile(num_blocks, [(s, e, per_block[pid]) for pid, (s, e) in placement.items()])
    return float(prof.min()) if num_blocks else 0.0


def _greedy(order: Sequence[PeerSpec], curves: Dict[str, np.ndarray], L: int, target: float,
            cover_factor: float, backbone: bool) -> Optional[Placement]:
    profile = np.zeros(L)
    count = np.zeros(L, dtype=np.int64)
    placement: Placement = {}
    rest = list(order)
    if backbone:  # fewest, largest spans tiling all blocks first (full memory), the rest fill in
        by_mem = sorted(order, key=lambda p: -len(curves[p.peer_id]))
        pos = 0
        chosen = set()
        for p in by_mem:
            if pos >= L:
                break
            k = min(len(curves[p.peer_id]), L)
            s = min(pos, L - k)
            placement[p.peer_id] = (s, s + k)
            profile[s:s + k] += curves[p.peer_id][k - 1] / k
            count[s:s + k] += 1
            pos = s + k
            chosen.add(p.peer_id)
        rest = [p for p in order if p.peer_id not in chosen]
    mem_left = float(sum(len(curves[p.peer_id]) for p in rest))
    for p in rest:
        curve = curves[p.peer_id]
        unc = (count == 0)
        n_unc = int(unc.sum())
        need = n_unc > 0 and mem_left < cover_factor * n_unc
        s, k, w = best_window(curve, profile, target, uncovered=unc.astype(np.float64) if need else None)
        placement[p.peer_id] = (s, s + k)
        profile[s:s + k] += w / k
        count[s:s + k] += 1
        mem_left -= len(curve)
    if (count == 0).any():
        return None
    return placement


def plan_placement(peers: Sequence[PeerSpec], model: ModelSpec, *,
                   evaluate: Optional[Callable[[Placement], float]] = None, refine_budget: int = 0,
                   seed: int = 0, target_fractions: Sequence[float] = (1.0, 0.9, 0.8, 0.7, 0.6),
                   max_lanes: int = 12, descend_sweeps: int = 4, descend_top: int = 1,
                   descend_all_below: int = 64, flow_refine: int = 0, restarts: int = 0,
                   milp_time_limit: float = 0.0, milp_max_peers: int = 8, milp_exact_max_peers: int = 4,
                   milp_groups: int = 16) -> Placement:
    """Our placement of a whole swarm: ``{peer_id: (start, end)}``, each span within the peer's memory.

    Candidates, all against the target ``lam*`` = :func:`partitioner.bound.upper_bound` of the peers:

    1. greedy fill: peers in decreasing order of their best work each take the window and length of
       :func:`rank_windows` (largest items first, as in first-fit-decreasing packing), for targets
       ``target_fractions x lam*``; coverage of every block is forced once the memory still to place gets tight;
    2. backbone: the largest memories first tile the model, the rest fill in as in 1;
    3. layered tiling (:func:`_lanes_best`) with ``q = 1..max_lanes`` lanes: the largest ``lam`` for which the peers
       split into ``q`` lanes that each tile blocks ``0..L`` at ``lam / q`` tokens/s per block (bisection over
       ``lam``, bin covering per lane); the single-lane case is exact for tiles and wins when memory is tight;
    4. ``restarts`` randomized orders of 1 and 3.

    Each candidate is rated by ``evaluate`` (default :func:`profile_score`, the weakest block under even spreading;
    pass the max-flow evaluator for small swarms), the best ones are polished by coordinate descent
    (:func:`descend`, every start and length of every peer), and the best is kept. Then, optionally,
    ``flow_refine`` LPs of bottleneck-driven search (:func:`refine_with_flow`) and ``refine_budget`` evaluations of
    re-placing single peers among their best-ranked windows. Last, if ``milp_time_limit`` is positive and the swarm
    has at most ``milp_max_peers`` peers, the placement MILP (:func:`partitioner.milp.solve`, at most that many
    seconds, cut off below the placement found so far so that it only searches better ones) offers its incumbent:
    exact for up to ``milp_exact_max_peers`` peers, else restricted to spans on a grid of about ``milp_groups``
    groups of blocks (:func:`partitioner.milp.grid_for`; at 8 peers and 32-80 blocks the exact program finds no
    good incumbent within seconds). Peers it leaves out take :func:`best_window`; it is taken only if its max flow
    (:func:`partitioner.flow.max_flow`, whatever ``evaluate`` is) is higher. Measured on the benchmark's swarms
    after the search of ``sims.scale.sim.ours_place``: at 4 peers (exact, 3 s) it raised the 10th percentile of
    ours / bound from 0.951 to 0.980; at 8 peers (grid, 3 s) it improved none of 20 swarms, so the benchmark runs it
    only up to 4 peers. Cost without the optional steps:
    ``O(candidates x N x L x lengths)`` vectorized; about 3 s for 1,000 peers on one core.

    The approach follows the max-flow view of Helix (placement judged by the flow it allows, Mei et al. 2025) with
    packing heuristics in place of its MILP, so that it scales to thousands of peers.
    """
    L = model.num_blocks
    curves = {p.peer_id: work_curve(p, model) for p in peers}
    usable = [p for p in peers if len(curves[p.peer_id]) and curves[p.peer_id].max() > 0]
    best = {p.peer_id: float(curves[p.peer_id].max()) for p in usable}
    from .bound import upper_bound

    target = upper_bound(usable, model)
    order = sorted(usable, key=lambda p: -best[p.peer_id])

    def per_block(pl: Placement) -> Dict[str, float]:
        return {pid: float(curves[pid][e - s - 1]) / (e - s) for pid, (s, e) in pl.items()}

    if evaluate is None:
        def evaluate(pl: Placement) -> float:
            return profile_score(pl, per_block(pl), L)

    cands = []
    for frac in target_fractions:
        for factor in (2.0, 4.0, float("inf")):
            pl = _greedy(order, curves, L, frac * target, factor, backbone=False)
            if pl is not None:
                cands.append(pl)
                break
        pl = _greedy(order, curves, L, frac * target, 2.0, backbone=True)
        if pl is not None:
            cands.append(pl)
    for q in range(1, min(len(order), max_lanes) + 1):
        pl = _lanes_best(order, curves, L, q, target)
        if pl is not None:
            cands.append(pl)
    rng = np.random.default_rng(seed)
    for _ in range(restarts):  # randomized orders: other basins for small swarms
        shuffled = [order[i] for i in rng.permutation(len(order))]
        frac = float(rng.uniform(0.6, 1.0))
        pl = _greedy(shuffled, curves, L, frac * target, float(rng.choice([2.0, 4.0, np.inf])), backbone=False)
        if pl is not None:
            cands.append(pl)
        q = int(rng.integers(1, min(len(order), max_lanes) + 1))
        pl = _lanes_best(shuffled, curves, L, q, target)
        if pl is not None:
            cands.append(pl)
    if not cands:
        # memory cannot cover the model: every peer takes all it can, tiled from block 0
        return _greedy(order, curves, L, target, float("inf"), backbone=True) or {}
    scored = [(evaluate(pl), i, pl) for i, pl in enumerate(cands)]
    if descend_sweeps > 0:
        # polish the most promising candidates with coordinate descent (all of them in small swarms)
        scored.sort(key=lambda t: (-t[0], t[1]))
        keep = scored if len(usable) <= descend_all_below else scored[:descend_top]
        polished = [descend(pl, curves, L, target, sweeps=descend_sweeps) for _, _, pl in keep]
        scored += [(evaluate(pl), len(cands) + i, pl) for i, pl in enumerate(polished)]
    cur_val, _, cur = max(scored, key=lambda t: (t[0], -t[1]))
    if flow_refine > 0:
        cur = refine_with_flow(cur, usable, model, budget=flow_refine)
        cur_val = evaluate(cur)
    if refine_budget > 0:
        cur, cur_val = _refine(cur, cur_val, order, curves, L, target, evaluate, refine_budget, seed)
    if milp_time_limit > 0 and 0 < len(usable) <= milp_max_peers:
        cur = _milp_candidate(cur, usable, model, curves, target, milp_time_limit,
                              exact=len(usable) <= milp_exact_max_peers, groups=milp_groups)
    return cur


def _milp_candidate(cur: Placement, usable: Sequence[PeerSpec], model: ModelSpec, curves: Dict[str, np.ndarray],
                    target: float, time_limit: float, *, exact: bool, groups: int) -> Placement:
    """``cur`` or the MILP's incumbent, whichever has the higher max flow (see :func:`plan_placement`)."""
    from .flow import max_flow, placed_peers
    from .milp import grid_for, solve

    L = model.num_blocks
    lower = max_flow(placed_peers(usable, model, cur), L).throughput
    res = solve(usable, model, time_limit=time_limit, lower=lower, upper=target if target > 0 else None,
                grid=None if exact else grid_for(L, groups))
    if not res.placement:
        return cur
    cand = dict(res.placement)
    h_of = {pid: float(curves[pid][e - s - 1]) / (e - s) for pid, (s, e) in cand.items()}
    profile = supply_profile(L, [(s, e, h_of[pid]) for pid, (s, e) in cand.items()])
    for p in usable:  # peers the MILP left out: an extra span never lowers a max flow
        if p.peer_id not in cand:
            s, k, w = best_window(curves[p.peer_id], profile, target)
            cand[p.peer_id] = (s, s + k)
            profile[s:s + k] += w / k
    return cand if max_flow(placed_peers(usable, model, cand), L).throughput > lower * (1 + 1e-9) else cur


def refine_with_flow(placement: Placement, peers: Sequence[PeerSpec], model: ModelSpec, *, budget: int = 30,
                     tries_per_round: int = 4) -> Placement:
    """Bottleneck-driven local search with the max-flow evaluator (:func:`partitioner.flow.max_flow`).

    The LP's duals mark the bottleneck blocks (positive price). Peers that could bring spare capacity there are
    tried: growing their span over the nearest run of bottleneck blocks (if memory allows) or sliding it onto them
    (if no block is left unserved), ranked by the capacity they would have to spare (their compute at the new
    length minus what the flow uses of them now); the best improving move is kept, at most ``budget`` LPs.
    """
    from .cost import compute_tps, network_tps
    from .flow import max_flow, placed_peers

    L = model.num_blocks
    spec = {p.peer_id: p for p in peers}
    cur = dict(placement)
    sol = max_flow(placed_peers(peers, model, cur), L)
    used = 1
    while used < budget and sol.throughput > 0 and sol.block_price is not None:
        price = sol.block_price
        hot = np.flatnonzero(price > 1e-3 * max(price.max(), 1e-12))  # (the hop penalty leaves tiny prices)
        if len(hot) == 0:
            break
        runs, a = [], int(hot[0])
        for b0, b1 in zip(hot, list(hot[1:]) + [None]):
            if b1 is None or b1 != b0 + 1:
                runs.append((a, int(b0) + 1))
                if b1 is not None:
                    a = int(b1)
        count = supply_profile(L, [(s, e, 1.0) for s, e in cur.values()])
        cands = []
        for pid, (s, e) in cur.items():
            p = spec[pid]
            m = max_blocks(p, model)
            spare_now = float(sol.load[pid].sum()) if pid in sol.load else 0.0
            for ra, rb in runs:
                if s <= ra and rb <= e:
                    continue
                options = [(min(s, ra), max(e, rb))]
                k = e - s
                if rb - ra <= k:
                    options += [(ra, ra + k), (rb - k, rb)]
                for ns, ne in options:
                    if ns < 0 or ne > L or ne - ns > m or (ns, ne) == (s, e):
                        continue
                    c = count.copy()
                    c[s:e] -= 1
                    c[ns:ne] += 1
                    if (c <= 0).any():
                        continue
                    spare = min(compute_tps(p, model, ne - ns), (ne - ns) * network_tps(p, model)) - spare_now
                    cands.append((spare, pid, ns, ne))
        if not cands:
            break
        cands.sort(key=lambda t: -t[0])
        best = None
        for spare, pid, ns, ne in cands[:tries_per_round]:
            if used >= budget:
                break
            trial = dict(cur)
            trial[pid] = (ns, ne)
            tsol = max_flow(placed_peers(peers, model, trial), L)
            used += 1
            if tsol.throughput > sol.throughput * (1 + 1e-6) and (best is None or tsol.throughput > best[0].throughput):
                best = (tsol, trial)
        if best is None:
            break
        sol, cur = best
    return cur


def _refine(cur: Placement, cur_val: float, order: Sequence[PeerSpec], curves: Dict[str, np.ndarray], L: int,
            target: float, evaluate: Callable[[Placement], float], budget: int, seed: int,
            candidates_per_peer: int = 3) -> Tuple[Placement, float]:
    rng = np.random.default_rng(seed)
    used = 0
    improved = True
    while improved and used < budget:
        improved = False
        for idx in rng.permutation(len(order)):
            p = order[int(idx)]
            pid = p.peer_id
            s0, e0 = cur[pid]
            spans = [(s, e, float(curves[q][e - s - 1]) / (e - s)) for q, (s, e) in cur.items() if q != pid]
            profile = supply_profile(L, spans)
            count = supply_profile(L, [(s, e, 1.0) for s, e, _ in spans])
            unc = (count <= 0).astype(np.float64)
            for _, s, k in rank_windows(curves[pid], profile, target, uncovered=unc, top=candidates_per_peer):
                if (s, s + k) == (s0, e0):
                    continue
                trial = dict(cur)
                trial[pid] = (s, s + k)
                val = evaluate(trial)
                used += 1
                if val > cur_val * (1 + 1e-6):
                    cur, cur_val, improved = trial, val, True
                    break
                if used >= budget:
                    return cur, cur_val
    return cur, cur_val


def _lane_lengths(curves: Dict[str, np.ndarray], order: Sequence[PeerSpec], height: float, L: int) -> Dict[str, int]:
    """Longest span each peer can take while adding at least ``height`` tokens/s to every block of it."""
    out = {}
    for p in order:
        c = curves[p.peer_id]
        h = c / np.arange(1, len(c) + 1)
        ok = np.flatnonzero(h >= height)
        out[p.peer_id] = int(min(ok[-1] + 1, L)) if len(ok) else 0
    return out


def _lanes_assign(order: Sequence[PeerSpec], K: Dict[str, int], L: int, q: int) -> Optional[List[List[str]]]:
    """Bin covering: split peers into ``q`` lanes whose spans (lengths ``K``) add up to at least ``L`` each, largest
    first, each into the lane it closes with the least overflow, else the fullest open lane."""
    items = sorted((pid for pid in K if K[pid] > 0), key=lambda pid: -K[pid])
    lanes: List[List[str]] = [[] for _ in range(q)]
    sums = [0] * q
    for pid in items:
        open_ = [j for j in range(q) if sums[j] < L]
        if not open_:
            break
        closing = [j for j in open_ if sums[j] + K[pid] >= L]
        j = min(closing, key=lambda j: sums[j] + K[pid] - L) if closing else max(open_, key=lambda j: sums[j])
        lanes[j].append(pid)
        sums[j] += K[pid]
    if any(s < L for s in sums):
        return None
    return lanes


def _lanes_best(order: Sequence[PeerSpec], curves: Dict[str, np.ndarray], L: int, q: int, target: float,
                iterations: int = 30) -> Optional[Placement]:
    """Layered tiling: the largest ``lam`` for which the peers split into ``q`` lanes, each tiling blocks ``0..L``
    with spans adding ``lam / q`` tokens/s to every block (found by bisection); peers left over then fill in with
    :func:`rank_windows`. Exact for a single lane (``q = 1``) of tiles; a coverage-first layout for tight memory."""
    lo, hi, best = 0.0, max(target, 1e-12), None
    for _ in range(iterations):
        mid = (lo + hi) / 2
        lanes = _lanes_assign(order, _lane_lengths(curves, order, mid / q, L), L, q)
        if lanes is None:
            hi = mid
        else:
            lo, best = mid, lanes
    if best is None:
        return None
    K = _lane_lengths(curves, order, lo / q, L)
    placement: Placement = {}
    profile = np.zeros(L)
    for j, lane in enumerate(best):
        pos = 0
        for pid in lane:
            k = K[pid]
            s = min(pos, L - k)
            placement[pid] = (s, s + k)
            profile[s:s + k] += curves[pid][k - 1] / k
            pos = s + k
    for p in order:
        if p.peer_id not in placement:
            s, k, w = best_window(curves[p.peer_id], profile, target)
            placement[p.peer_id] = (s, s + k)
            profile[s:s + k] += w / k
    return placement


def best_move(pid: str, placement: Placement, prof: np.ndarray, count: np.ndarray, curves: Dict[str, np.ndarray],
              h_of: Dict[str, float], target: float, *, strict_cover: bool = False
              ) -> Tuple[float, float, float, float, int, int]:
    """The best ``(start, length)`` for one peer with the rest of the swarm fixed, on the even-spread profile.

    :param prof: per-block supply with every peer in place, tokens/s; ``count``: peers holding each block
    :param strict_cover: if True, a peer that alone serves some blocks may only move to a span that keeps them and
        whose hull with its old span fits its memory (it grows first, then drops the old blocks: make before
        break); in any case the new span must cover the blocks only this peer holds
    :returns: ``(old_min, old_deficit, new_min, new_deficit, start, length)``: the weakest block's supply and the
        deficit below ``target`` (``sum_b max(0, target - supply_b)``, tokens/s x blocks) before and after; the
        old span when nothing is better or allowed. Vectorized: sliding-window minima and prefix sums,
        ``O(L)`` per candidate length.
    """
    L = len(prof)
    s0, e0 = placement[pid]
    k0 = e0 - s0
    base = prof.copy()
    base[s0:e0] -= h_of[pid]
    cnt = count.copy()
    cnt[s0:e0] -= 1
    lonely = cnt <= 0
    cur_min = float(prof.min())
    cur_def = float(np.maximum(target - prof, 0).sum())
    was_served = count > 0
    # a peer that alone serves some of its blocks can only move by growing first (load the new blocks while still
    # serving the old ones, then drop the old): the hull of both spans must fit in its memory
    grow_first = strict_cover and bool((lonely & was_served)[s0:e0].any())
    max_k = len(curves[pid])
    eps = 1e-9 * max(target, 1e-12)
    quantum = 1e-6 * max(target, 1e-12)
    pre = np.concatenate(([np.inf], np.minimum.accumulate(base)))       # min of base[:s]
    suf = np.concatenate((np.minimum.accumulate(base[::-1])[::-1], [np.inf]))  # min of base[s:]
    cum_dbase = np.concatenate(([0.0], np.cumsum(np.maximum(target - base, 0))))
    total_dbase = cum_dbase[-1]
    cum_lonely = np.concatenate(([0], np.cumsum(lonely & was_served)))
    n_lonely = int(cum_lonely[-1])
    best = (np.floor(cur_min / quantum), -cur_def + eps, cur_min, cur_def, s0, k0)
    for k in candidate_lengths(curves[pid], keep=0.0, most=40):
        k = int(k)
        if k > L:
            continue
        h = curves[pid][k - 1] / k
        starts = np.arange(L - k + 1)
        ok = (cum_lonely[starts + k] - cum_lonely[starts]) == n_lonely
        if grow_first:
            ok &= (np.maximum(starts + k, e0) - np.minimum(starts, s0)) <= max_k
        if not ok.any():
            continue
        win = np.lib.stride_tricks.sliding_window_view(base, k).min(axis=1) + h
        mins = np.minimum(win, np.minimum(pre[starts], suf[starts + k]))
        cum_d2 = np.concatenate(([0.0], np.cumsum(np.maximum(target - base - h, 0))))
        defs = total_dbase - (cum_dbase[starts + k] - cum_dbase[starts]) + (cum_d2[starts + k] - cum_d2[starts])
        qmins = np.floor(np.where(ok, mins, -np.inf) / quantum)
        s = int(np.lexsort((defs, -qmins))[0])
        if (qmins[s], -defs[s]) > best[:2]:
            best = (float(qmins[s]), float(-defs[s]), float(mins[s]), float(defs[s]), s, k)
    return cur_min, cur_def, best[2], best[3], best[4], best[5]


def apply_move(pid: str, start: int, length: int, placement: Placement, prof: np.ndarray, count: np.ndarray,
               curves: Dict[str, np.ndarray], h_of: Dict[str, float]) -> None:
    """Move ``pid`` to ``[start, start + length)``, updating the profile and counts in place."""
    s0, e0 = placement[pid]
    prof[s0:e0] -= h_of[pid]
    count[s0:e0] -= 1
    h = curves[pid][length - 1] / length
    prof[start:start + length] += h
    count[start:start + length] += 1
    placement[pid] = (start, start + length)
    h_of[pid] = h


def descend(placement: Placement, curves: Dict[str, np.ndarray], L: int, target: float, *, sweeps: int = 4,
            movable: Optional[Sequence[str]] = None) -> Placement:
    """Coordinate descent on the even-spread supply profile: each peer in turn takes :func:`best_move` (the
    ``(start, length)`` that most raises the weakest block, ties broken by the deficit below ``target``), until a
    sweep moves nobody. A move never leaves a block unserved in the result."""
    placement = dict(placement)
    h_of = {pid: curves[pid][e - s - 1] / (e - s) for pid, (s, e) in placement.items()}
    prof = supply_profile(L, [(s, e, h_of[pid]) for pid, (s, e) in placement.items()])
    count = supply_profile(L, [(s, e, 1.0) for s, e in placement.values()])
    ids = list(movable) if movable is not None else list(placement)
    for _ in range(sweeps):
        moved = False
        for pid in ids:
            _, _, _, _, s, k = best_move(pid, placement, prof, count, curves, h_of, target)
            if (s, s + k) != placement[pid]:
                apply_move(pid, s, k, placement, prof, count, curves, h_of)
                moved = True
        if not moved:
            break
    return placement


def search_with_flow(placement: Placement, peers: Sequence[PeerSpec], model: ModelSpec, *, budget: int = 150,
                     tries_per_round: int = 6, seed: int = 0, target: Optional[float] = None,
                     lengths_hint: Optional[Dict[str, int]] = None, reference: Optional[Placement] = None,
                     max_changed: Optional[int] = None) -> Placement:
    """Price-guided local search over whole-swarm placements, every candidate judged by the max-flow LP
    (:func:`partitioner.flow.max_flow`); for small swarms, where the LP costs milliseconds.

    Each round solves the LP of the current placement and reads its block prices (the duals of the per-block
    rows: where one more token/s of capacity would raise the throughput). For every peer and a few span lengths
    (its current one, one shorter and longer, its best-work length, its longest, ``lengths_hint``) the start with
    the most price under the window is found by prefix sums, and the move is scored by the first-order estimate
    ``sum(price x new per-block capacity) - sum(price x load the peer carries now)``. The ``tries_per_round`` best
    moves that keep every block served are solved exactly; the best that raises the throughput is taken. A move
    that keeps the throughput and lowers the even-spread deficit below ``target`` (:func:`best_move`'s tie-break)
    is taken as a sideways step, so that runs of bottleneck blocks that need several peers get filled one peer at a
    time. When no listed move passes, a random peer among the least used takes a random priced window (a kick,
    kept only if it is no worse by the same order). Stops after ``budget`` LPs.

    This is the bottleneck-driven local search of Helix's placement refinement (Mei et al. 2025), with LP duals in
    place of its MILP.

    :param reference: with ``max_changed``: at most ``max_changed`` peers may end on a span other than their span
        in ``reference`` (a rebalancing move budget); a peer may always go back to its reference span
    :returns: the best placement seen (never worse under the LP than ``placement``)
    """
    from .bound import upper_bound
    from .cost import network_tps
    from .flow import max_flow, placed_peers

    L = model.num_blocks
    spec = {p.peer_id: p for p in peers}
    curves = {pid: work_curve(spec[pid], model) for pid in placement}
    if target is None:
        target = upper_bound([spec[pid] for pid in placement], model)
    rng = np.random.default_rng(seed)
    net = {pid: network_tps(spec[pid], model) for pid in placement}

    def deficit(pl: Placement) -> float:
        prof = supply_profile(L, [(s, e, float(curves[pid][e - s - 1]) / (e - s)) for pid, (s, e) in pl.items()])
        return float(np.maximum(target - prof, 0).sum())

    def solve(pl: Placement):
        return max_flow(placed_peers(peers, model, pl), L)

    cur = dict(placement)
    sol = solve(cur)
    cur_val, cur_def = sol.throughput, deficit(cur)
    used = 1

    def better(val: float, dfc: float, ref_val: float, ref_def: float) -> bool:
        if val > ref_val * (1 + 1e-7) + 1e-12:
            return True
        return val >= ref_val * (1 - 1e-9) and dfc < ref_def * (1 - 1e-6) - 1e-12

    tabu: Dict[Tuple[str, int, int], int] = {}
    rnd = 0
    while used < budget:
        rnd += 1
        price = sol.block_price if sol.block_price is not None and sol.throughput > 0 else None
        if price is None or price.sum() <= 0:
            prof = supply_profile(L, [(s, e, float(curves[pid][e - s - 1]) / (e - s)) for pid, (s, e) in cur.items()])
            price = (prof <= prof.min() * (1 + 1e-9)).astype(np.float64)
        price = price / max(price.sum(), 1e-300)
        cum_p = np.concatenate(([0.0], np.cumsum(price)))
        count = supply_profile(L, [(s, e, 1.0) for s, e in cur.values()])
        lam = max(sol.throughput, 1e-12)
        moves = []
        for pid, (s0, e0) in cur.items():
            curve = curves[pid]
            m = len(curve)
            k0 = e0 - s0
            load = sol.load.get(pid)
            old_val = float((price[s0:e0] * load).sum()) if load is not None else 0.0
            cnt = count.copy()
            cnt[s0:e0] -= 1
            lonely = np.concatenate(([0], np.cumsum((cnt <= 0) & (count > 0))))
            n_lonely = int(lonely[-1])
            best_k = int(np.flatnonzero(curve >= curve.max() * (1 - 1e-2))[-1] + 1)
            ks = {k0, k0 - 1, k0 + 1, k0 - 2, k0 + 2, best_k, m, max(1, k0 // 2), min(m, 2 * k0)}
            if lengths_hint and pid in lengths_hint:
                ks.add(int(lengths_hint[pid]))
            for k in ks:
                if k < 1 or k > m or k > L:
                    continue
                h = min(float(curve[k - 1]) / k, net[pid], lam * 1.5)
                starts = np.arange(L - k + 1)
                ok = (lonely[starts + k] - lonely[starts]) == n_lonely
                if not ok.any():
                    continue
                gain = np.where(ok, (cum_p[starts + k] - cum_p[starts]) * h, -np.inf)
                for s in np.argsort(-gain)[:2]:
                    s = int(s)
                    if not np.isfinite(gain[s]) or (s, s + k) == (s0, e0) or tabu.get((pid, s, s + k), -1) >= rnd:
                        continue
                    moves.append((float(gain[s]) - old_val, pid, s, s + k))
        if reference is not None and max_changed is not None:
            changed = {pid for pid, span in cur.items() if reference.get(pid) != span}
            full = len(changed) >= max_changed
            moves = [mv for mv in moves if not full or mv[1] in changed or reference.get(mv[1]) == (mv[2], mv[3])]
            if full:  # also offer going back home, which frees a move
                for pid in changed:
                    if pid in reference:
                        moves.append((0.0, pid, reference[pid][0], reference[pid][1]))
        moves.sort(key=lambda t: -t[0])
        best = None
        for est, pid, s, e in moves[:tries_per_round]:
            if used >= budget:
                break
            trial = dict(cur)
            trial[pid] = (s, e)
            tsol = solve(trial)
            used += 1
            tdef = deficit(trial)
            tabu[(pid, s, e)] = rnd + 3
            if better(tsol.throughput, tdef, cur_val, cur_def) and (
                    best is None or better(tsol.throughput, tdef, best[0].throughput, best[1])):
                best = (tsol, tdef, trial)
        if best is None and used < budget:
            # kick: one of the least-used peers takes a random window on priced blocks
            util = []
            for pid, (s0, e0) in cur.items():
                capacity = float(curves[pid][e0 - s0 - 1])
                util.append((float(sol.load[pid].sum()) / max(capacity, 1e-12) if pid in sol.load else 0.0, pid))
            util.sort()
            pid = util[int(rng.integers(0, max(1, min(3, len(util)))))][1]
            s0, e0 = cur[pid]
            m = len(curves[pid])
            k = int(rng.integers(1, min(m, L) + 1))
            b = int(rng.choice(L, p=price)) if price.sum() > 0 else int(rng.integers(0, L))
            s = int(np.clip(b - rng.integers(0, k), 0, L - k))
            trial = dict(cur)
            trial[pid] = (s, s + k)
            over = (reference is not None and max_changed is not None and reference.get(pid) != (s, s + k)
                    and len({q for q, sp in trial.items() if reference.get(q) != sp}) > max_changed)
            if not over and not set(unserved_list(trial, L)) - set(unserved_list(cur, L)):
                tsol = solve(trial)
                used += 1
                tdef = deficit(trial)
                if better(tsol.throughput, tdef, cur_val, cur_def):
                    best = (tsol, tdef, trial)
            else:
                used += 1  # count failed kicks, so the loop ends
        if best is not None:
            sol, cur_def, cur = best
            cur_val = sol.throughput
    return cur


def unserved_list(placement: Placement, num_blocks: int) -> List[int]:
    """Blocks no span of ``placement`` holds."""
    count = supply_profile(num_blocks, [(s, e, 1.0) for s, e in placement.values()])
    return [int(b) for b in np.flatnonzero(count <= 0)]
