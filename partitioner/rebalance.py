"""Rebalancing a running swarm: which peers should move where, in what order.

Algorithm (ours): a sequence of single-peer moves, each the best move :func:`partitioner.placement.best_move` finds
for one peer with the rest fixed, on the even-spread supply profile against the target ``upper_bound`` of the
peers present (:mod:`partitioner.bound`). Peers sitting on the most over-supplied blocks are considered first. A
move is kept only if

* no block is unserved in any intermediate step: the peer's old span stays served by other peers while it
  reloads, or, if it alone serves some of them, it grows to the hull of its old and new spans first (when that
  fits its memory) and drops the old blocks after (make before break); moves run one after another, and
  :func:`check_plan` replays the plan's states, and
* it fills blocks nobody serves, or its score (``L x`` the rise of the weakest block plus the cut in the deficit
  below the target, block-tokens/s) is at least ``min_gain`` of the peer's own best work (hysteresis: small wins
  do not move a peer, so a swarm does not churn, the Petals reports of servers endlessly reloading blocks).

Planning stops once the weakest block reaches ``settle`` of the target, when no move passes, or when
``max_moves`` peers have moved (each peer moves at most once per plan). This is the greedy improvement that
Petals' rebalancing also uses, with three changes: the objective is the max-flow-friendly profile against the
upper bound rather than the weakest block alone, moves are planned globally in a safe order rather than by each
server on a timer, and the move budget and gain thresholds are explicit.

For small swarms ``search_budget`` adds a search with the max-flow LP in the loop
(:func:`partitioner.placement.search_with_flow`, at most ``max_moves`` peers off their span) and
:func:`order_moves` puts the resulting moves in a safe order, peers carrying the least flow first; ``beam_budget``
adds :func:`search_moves`, a beam search over sequences of safe single-peer moves judged by the LP (holes bridged
by phantom peers, so that a plan can fill them one by one), which finds the multi-move repairs that one greedy move
at a time misses (after 20% of 20 peers leave, ``make bench-partitioner``: median 0.758 -> 0.801 of the new bound,
p10 0.512 -> 0.615). The plan that serves the most under the LP is returned.

``milp_time_limit`` adds the exact MILP (:mod:`partitioner.milp`): up to ``milp_max_peers`` peers the best plan
within the move budget (:func:`milp_plan`: for one move, the best *safe* one) and a bound on what any such plan
serves; above that, up to ``milp_neighborhood_max_peers``, the MILP over the best plan's movers and a few idle
peers (:func:`milp_neighborhood`). Measured (``make bench-partitioner``, 100 swarms): after 2 of 8 peers leave the
heuristic plans' median, 0.573 of the new bound, *is* the exact optimum within the one-move budget (the MILP
raised 8 of 85 plans, not the median); after 1 of 4 leave, 0.799 -> 0.820, again the exact optimum.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .bound import upper_bound
from .cost import ModelSpec, PeerSpec, work_curve
from .placement import Placement, apply_move, best_move, supply_profile


@dataclass(frozen=True)
class Move:
    """``peer_id`` goes from blocks ``old`` (start, end) to ``new``.

    Without ``via`` the peer unloads ``old`` and loads ``new`` (others serve ``old`` meanwhile). With ``via`` (the
    hull of both spans, which fits its memory) it first loads the blocks of ``via`` it lacks while still serving
    ``old``, then serves ``new`` and drops the rest: make before break, for a peer that alone serves some blocks.
    """

    peer_id: str
    old: Tuple[int, int]
    new: Tuple[int, int]
    via: Optional[Tuple[int, int]] = None


@dataclass
class RebalancePlan:
    """Moves to run in order, and the weakest block's even-spread supply (tokens/s) before and after."""

    moves: List[Move] = field(default_factory=list)
    min_before: float = 0.0
    min_after: float = 0.0
    target: float = 0.0
    budget_bound: Optional[float] = None  # tokens/s no plan within the move budget exceeds (only safe ones when the
    # budget is one move); the MILP's dual bound, :func:`milp_plan`; None when it did not run

    def apply(self, placement: Placement) -> Placement:
        """The placement after every move."""
        out = dict(placement)
        for m in self.moves:
            out[m.peer_id] = m.new
        return out

    def intermediate_states(self, placement: Placement):
        """Yield each state a swarm goes through: while a peer reloads it serves neither span, then its new one."""
        cur = dict(placement)
        for m in self.moves:
            if m.via is None:
                yield {pid: span for pid, span in cur.items() if pid != m.peer_id}  # reloading: serves nothing
            else:
                yield dict(cur)  # loading the rest of ``via`` while serving ``old``
            cur[m.peer_id] = m.new
            yield dict(cur)


def _record_move(plan: "RebalancePlan", pid: str, s: int, k: int, cur: Placement, prof, count, curves, h_of) -> None:
    """Apply the move of ``pid`` to ``[s, s + k)`` to the working placement and append it to ``plan``; a peer that
    is the only server of some of its old blocks moves ``via`` the hull of both spans (make before break)."""
    old = cur[pid]
    c_old = count.copy()
    c_old[old[0]:old[1]] -= 1
    alone = bool(((c_old <= 0) & (count > 0))[old[0]:old[1]].any())
    via = (min(old[0], s), max(old[1], s + k)) if alone else None
    apply_move(pid, s, k, cur, prof, count, curves, h_of)
    plan.moves.append(Move(pid, old, (s, s + k), via))


def unserved_blocks(placement: Placement, num_blocks: int) -> List[int]:
    """Blocks no span of ``placement`` holds."""
    count = supply_profile(num_blocks, [(s, e, 1.0) for s, e in placement.values()])
    return [int(b) for b in np.flatnonzero(count <= 0)]


def plan_rebalance(peers: Sequence[PeerSpec], model: ModelSpec, placement: Placement, *,
                   max_moves: Optional[int] = None, max_move_fraction: float = 0.3, min_gain: float = 0.1,
                   settle: float = 0.97, evaluate: Optional[Callable[[Placement], float]] = None,
                   shortlist: int = 12, search_budget: int = 0, seed: int = 0, beam_budget: int = 0,
                   beam: int = 4, milp_time_limit: float = 0.0, milp_max_peers: int = 8,
                   milp_neighborhood_max_peers: int = 0, milp_extra: int = 4) -> RebalancePlan:
    """A rebalancing plan for the peers present (see the module docstring).

    Moves are chosen by lazy greedy: every peer's best move is scored once, as
    ``L x (rise of the weakest block) + (cut in the deficit below the target)`` [tokens/s x blocks]; the top peer is
    re-scored against the current state and moved if it still beats the next one, else pushed back.

    :param peers: the peers now in the swarm; ``placement`` maps each to its current ``(start, end)``
    :param max_moves: most peers to move (default ``floor(max_move_fraction x peers)``, at least 1). Rounded down, so
        that "at most 30% of the peers" holds as stated (6 peers: 1 move, 16 peers: 4); rounding to the nearest
        count would allow 2 of 6 (33%) or 5 of 16 (31%). The floor of 1 lets a swarm of 3 repair a hole with one
        move, which is 33% of it: the one case above the fraction, and reported as such by the benchmark
    :param min_gain: hysteresis: a move must score at least ``min_gain`` x the peer's own best work (put that
        share of what it can do to better use), unless it serves a block nobody serves
    :param settle: stop once every block is served and the weakest has this fraction of the target
    :param evaluate: optional throughput of a placement (e.g. the max-flow evaluator, for small swarms): then each
        step scores the ``shortlist`` best moves by the profile with it and takes the best; a move must raise it by
        ``min_gain`` x the peer's best work / ``L`` (the same hysteresis in tokens/s), unless it fills a gap
    :param search_budget: if positive, the greedy plan's end state is then improved by
        :func:`partitioner.placement.search_with_flow` (at most ``search_budget`` max-flow LPs, at most
        ``max_moves`` peers off their current span), and the moves to reach the better of the two are put in a safe
        order by :func:`order_moves`; the plan that serves more under the max-flow LP is returned (the search is
        for small swarms: each LP costs milliseconds there)
    :param beam_budget: if positive, :func:`search_moves` (width ``beam``, at most ``beam_budget`` LPs, the same
        ``max_moves`` and ``min_gain``) also plans from the current placement, and the plan (of it, the greedy one
        and the ``search_budget`` one) that serves the most under the max-flow LP is returned, the fewest moves
        among equals (for small swarms, as ``search_budget``)
    :param milp_time_limit: if positive and at most ``milp_max_peers`` peers are present, :func:`milp_plan` (the
        best placement within ``max_moves`` moves by the exact MILP, at most this many seconds, put in a safe order
        by :func:`order_moves`) is a candidate too, as in ``beam_budget``; the plan's ``budget_bound`` then says how
        much any plan within the budget could serve. Measured on the benchmark's swarms: after 2 of 8 peers leave
        (6 left, 1 move), 0.1-0.5 s, solved exactly; 16 peers with 4 moves find no incumbent within 10 s
    :param milp_neighborhood_max_peers: with ``milp_time_limit``: swarms above ``milp_max_peers`` and up to this
        size get :func:`milp_neighborhood` instead (the MILP with only a few peers free to move: those the best plan
        so far moves, then also the ``milp_extra`` peers its flow uses least), in ``milp_time_limit`` s in all
    """
    import heapq

    L = model.num_blocks
    peers = [p for p in peers if p.peer_id in placement]
    if max_moves is None:
        max_moves = max(1, int(max_move_fraction * len(peers)))
    curves = {p.peer_id: work_curve(p, model) for p in peers}
    target = upper_bound(peers, model)
    cur = {p.peer_id: placement[p.peer_id] for p in peers if len(curves[p.peer_id])}
    h_of = {pid: float(curves[pid][min(e - s, len(curves[pid])) - 1]) / (e - s) for pid, (s, e) in cur.items()}
    prof = supply_profile(L, [(s, e, h_of[pid]) for pid, (s, e) in cur.items()])
    count = supply_profile(L, [(s, e, 1.0) for s, e in cur.values()])
    plan = RebalancePlan(min_before=float(prof.min()), target=target)
    if target <= 0:
        return plan

    def settled() -> bool:
        return bool(prof.min() >= settle * target and (count > 0).all())

    def score(pid: str) -> Tuple[float, int, int, bool]:
        old_min, old_def, new_min, new_def, s, k = best_move(pid, cur, prof, count, curves, h_of, target,
                                                             strict_cover=True)
        if (s, s + k) == cur[pid]:
            return 0.0, s, k, False
        fills = bool((count[s:s + k] <= 0).any())
        return L * (new_min - old_min) + (old_def - new_def), s, k, fills

    use_milp = milp_time_limit > 0 and len(cur) <= milp_max_peers
    use_hood = milp_time_limit > 0 and milp_max_peers < len(cur) <= milp_neighborhood_max_peers
    if search_budget > 0 or beam_budget > 0 or use_milp or use_hood:
        start = dict(cur)
        best = plan_rebalance(peers, model, placement, max_moves=max_moves, min_gain=min_gain, settle=settle,
                              evaluate=evaluate, shortlist=shortlist)
        if search_budget > 0:
            best = _improve_with_search(best, start, peers, model, target, max_moves, search_budget, seed)
        if beam_budget > 0:
            best = _best_plan([best, search_moves(start, peers, model, max_moves, beam=beam, budget=beam_budget,
                                                  min_gain=min_gain)], start, peers, model)
        if use_milp:
            from .flow import max_flow, placed_peers

            spec = [p for p in peers if p.peer_id in start]
            have = max_flow(placed_peers(spec, model, best.apply(start)), L).throughput
            # hysteresis: the MILP only looks for plans serving at least 0.1% more (its bound stays valid)
            cand = milp_plan(start, peers, model, max_moves, time_limit=milp_time_limit, lower=have * (1 + 1e-3),
                             upper=target)
            bound = cand.budget_bound
            best = _best_plan([best, cand], start, peers, model)
            best.budget_bound = bound
        if use_hood:
            best = milp_neighborhood(best, start, peers, model, max_moves, time_limit=milp_time_limit, upper=target,
                                     extra=milp_extra)
        return best
    if evaluate is not None:
        return _plan_with_evaluator(plan, cur, curves, prof, count, h_of, target, L, max_moves, min_gain, settle,
                                    evaluate, shortlist)
    heap = []
    for pid in cur:
        g, _, _, fills = score(pid)
        if g > 0 or fills:
            heapq.heappush(heap, (-(g + (1e30 if fills else 0.0)), pid))
    moved: set = set()
    while heap and len(plan.moves) < max_moves and not settled():
        _, pid = heapq.heappop(heap)
        if pid in moved:
            continue
        g, s, k, fills = score(pid)
        key = -(g + (1e30 if fills else 0.0))
        if heap and key > heap[0][0] + 1e-12:
            if g > 0 or fills:
                heapq.heappush(heap, (key, pid))
            continue
        if not fills and g < min_gain * float(curves[pid].max()):
            continue
        _record_move(plan, pid, s, k, cur, prof, count, curves, h_of)
        moved.add(pid)
    plan.min_after = float(prof.min())
    return plan


def check_plan(placement: Placement, plan: RebalancePlan, num_blocks: int) -> List[int]:
    """Blocks left unserved by some intermediate step of ``plan`` that were served before it started
    (empty when the plan is safe)."""
    before = set(range(num_blocks)) - set(unserved_blocks(placement, num_blocks))
    bad: set = set()
    for state in plan.intermediate_states(placement):
        bad |= before & set(unserved_blocks(state, num_blocks))
    return sorted(bad)


def _plan_with_evaluator(plan: RebalancePlan, cur: Placement, curves: Dict[str, np.ndarray], prof: np.ndarray,
                         count: np.ndarray, h_of: Dict[str, float], target: float, L: int, max_moves: int,
                         min_gain: float, settle: float, evaluate: Callable[[Placement], float],
                         shortlist: int) -> RebalancePlan:
    moved: set = set()
    value = evaluate(cur)
    while len(plan.moves) < max_moves:
        if prof.min() >= settle * target and (count > 0).all():
            break
        options = []
        for pid in cur:
            if pid in moved:
                continue
            old_min, old_def, new_min, new_def, s, k = best_move(pid, cur, prof, count, curves, h_of, target,
                                                                 strict_cover=True)
            if (s, s + k) == cur[pid]:
                continue
            fills = bool((count[s:s + k] <= 0).any())
            options.append((fills, L * (new_min - old_min) + (old_def - new_def), pid, s, k))
        if not options:
            break
        options.sort(key=lambda o: (not o[0], -o[1]))
        best = None
        for fills, _, pid, s, k in options[:shortlist]:
            trial = dict(cur)
            trial[pid] = (s, s + k)
            v = evaluate(trial)
            need = 0.0 if fills else min_gain * float(curves[pid].max()) / L
            if v - value >= need and (best is None or v > best[0]):
                best = (v, pid, s, k)
        if best is None:
            break
        v, pid, s, k = best
        _record_move(plan, pid, s, k, cur, prof, count, curves, h_of)
        moved.add(pid)
        value = v
    plan.min_after = float(prof.min())
    return plan


def order_moves(start: Placement, goal: Placement, peers: Sequence[PeerSpec], model: ModelSpec,
                load: Optional[Dict[str, float]] = None) -> List[Move]:
    """Moves that take the swarm from ``start`` to ``goal`` one peer at a time without unserving a block.

    Peers that carry the least flow (``load``, tokens/s x blocks, e.g. from the max-flow LP) go first. A peer
    moves plainly (reloads, serving nothing meanwhile) when the others still serve every block of its old span
    that is served now; otherwise make before break through the hull of both spans, if the new span keeps every
    block only it serves and the hull fits its memory (:func:`partitioner.cost.max_blocks`); otherwise it waits
    for others to move. Peers that can never move
    safely keep their span (so the plan may stop short of ``goal``). ``O(moves^2 L)``.
    """
    from .cost import max_blocks

    spec = {p.peer_id: p for p in peers}
    L = model.num_blocks
    cur = dict(start)
    pending = [pid for pid in goal if pid in cur and goal[pid] != cur[pid]]
    pending.sort(key=lambda pid: (load or {}).get(pid, 0.0))
    out: List[Move] = []
    progress = True
    while pending and progress:
        progress = False
        for pid in list(pending):
            old, new = cur[pid], goal[pid]
            served = supply_profile(L, [(s, e, 1.0) for s, e in cur.values()]) > 0
            others = supply_profile(L, [(s, e, 1.0) for q, (s, e) in cur.items() if q != pid]) > 0
            alone = served & ~others
            if not alone.any():
                out.append(Move(pid, old, new, None))
            else:
                # make before break: the new span must keep every block only this peer serves, and the hull of
                # both spans must fit its memory
                hull = (min(old[0], new[0]), max(old[1], new[1]))
                idx = np.flatnonzero(alone)
                if idx.min() < new[0] or idx.max() >= new[1] or hull[1] - hull[0] > max_blocks(spec[pid], model):
                    continue
                out.append(Move(pid, old, new, hull))
            cur[pid] = new
            pending.remove(pid)
            progress = True
    return out


def _milp_start(start: Placement, peers: Sequence[PeerSpec], model: ModelSpec):
    """What both rebalancing MILPs start from: the peers of ``start`` that can hold a block, their spans, and the
    tokens/s each one's compute carries in the max flow of ``start`` (``{peer_id: load}``)."""
    from .flow import max_flow, placed_peers

    spec = [p for p in peers if p.peer_id in start and len(work_curve(p, model))]
    cur = {p.peer_id: start[p.peer_id] for p in spec}
    sol = max_flow(placed_peers(spec, model, cur), model.num_blocks)
    return spec, cur, {pid: float(v.sum()) for pid, v in sol.load.items()}


def milp_plan(start: Placement, peers: Sequence[PeerSpec], model: ModelSpec, max_moves: int, *,
              time_limit: float = 5.0, lower: float = 0.0, upper: Optional[float] = None) -> RebalancePlan:
    """The best placement within ``max_moves`` moved peers that serves more than ``lower`` tokens/s, by the exact
    MILP (:func:`partitioner.milp.best_rebalance`, at most ``time_limit`` s), as a plan: :func:`order_moves` puts
    its moves in a safe order (peers carrying the least flow first; a peer that can never move safely keeps its
    span, so the plan may stop short of the MILP's placement). No moves if the MILP finds nothing better.
    ``budget_bound``: no placement within the budget serves more (tokens/s; the MILP's dual bound)."""
    from .milp import best_rebalance

    spec, cur, load = _milp_start(start, peers, model)
    res = best_rebalance(spec, model, cur, max_moves, time_limit=time_limit, lower=lower, upper=upper)
    plan = RebalancePlan(target=upper or 0.0, budget_bound=res.bound)
    if res.placement:
        plan.moves = order_moves(cur, {pid: res.placement.get(pid, cur[pid]) for pid in cur}, spec, model, load)
    return plan


def milp_neighborhood(plan: RebalancePlan, start: Placement, peers: Sequence[PeerSpec], model: ModelSpec,
                      max_moves: int, *, time_limit: float = 4.0, upper: Optional[float] = None, extra: int = 4
                      ) -> RebalancePlan:
    """``plan`` improved by the MILP over a neighborhood (for swarms where the full rebalancing MILP finds nothing in
    time): the best placement within ``max_moves`` moves from ``start`` in which only a few peers may move, first
    those ``plan`` moves (their spans re-chosen jointly and exactly), then those plus the ``extra`` peers that the
    flow of ``plan``'s end state uses least (utilization: the share of its compute the max flow uses); each with
    half the ``time_limit`` (s), cut off at the best so far. Each result is put in a safe order
    (:func:`order_moves`) and kept if it serves more (:func:`_best_plan`). Measured after 4 of 20 peers leave
    (``make bench-partitioner``: 2 s in all per plan, a small gain on about half the swarms)."""
    from .cost import compute_tps
    from .flow import max_flow, placed_peers
    from .milp import solve

    L = model.num_blocks
    spec, cur, load0 = _milp_start(start, peers, model)
    end = plan.apply(cur)
    sol = max_flow(placed_peers(spec, model, end), L)
    util = sorted((float(sol.load[p.peer_id].sum()) / max(compute_tps(p, model, end[p.peer_id][1] - end[p.peer_id][0]),
                                                           1e-12) if p.peer_id in sol.load else 0.0, p.peer_id)
                  for p in spec)
    movers = [m.peer_id for m in plan.moves if m.peer_id in cur]
    sets = [movers] if movers else []
    sets.append(list(dict.fromkeys(movers + [pid for _, pid in util]))[:len(movers) + extra])
    best, have = plan, sol.throughput
    for j, free in enumerate(sets):
        res = solve(spec, model, time_limit=time_limit / len(sets), lower=have, upper=upper, current=cur,
                    max_moves=max_moves, movable=free)
        if not res.placement:
            continue
        goal = {pid: res.placement.get(pid, cur[pid]) for pid in cur}
        cand = RebalancePlan(moves=order_moves(cur, goal, spec, model, load0), min_before=plan.min_before,
                             target=plan.target, budget_bound=plan.budget_bound)
        best = _best_plan([best, cand], start, peers, model)
        have = max_flow(placed_peers(spec, model, best.apply(cur)), L).throughput
    return best


def _improve_with_search(greedy: RebalancePlan, start: Placement, peers: Sequence[PeerSpec], model: ModelSpec,
                         target: float, max_moves: int, budget: int, seed: int) -> RebalancePlan:
    from .flow import max_flow, placed_peers
    from .placement import search_with_flow

    L = model.num_blocks
    spec = [p for p in peers if p.peer_id in start]
    first = greedy.apply(start)
    goal = search_with_flow(first, spec, model, budget=budget, seed=seed, target=target, reference=start,
                            max_changed=max_moves)
    sol = max_flow(placed_peers(spec, model, start), L)
    load = {pid: float(v.sum()) for pid, v in sol.load.items()}
    moves = order_moves(start, goal, spec, model, load)
    cand = RebalancePlan(moves=moves, min_before=greedy.min_before, target=target)

    def value(plan: RebalancePlan) -> float:
        return max_flow(placed_peers(spec, model, plan.apply(start)), L).throughput

    best = cand if value(cand) > value(greedy) * (1 + 1e-9) else greedy
    curves = {p.peer_id: work_curve(p, model) for p in spec}
    end = best.apply(start)
    best.min_after = float(supply_profile(L, [(s, e, float(curves[pid][e - s - 1]) / (e - s))
                                              for pid, (s, e) in end.items()]).min())
    return best


def _flow_with_phantoms(spec: Sequence[PeerSpec], model: ModelSpec, placement: Placement):
    """``(unserved, solution)``: the blocks ``placement`` leaves unserved and the max-flow LP of the placement with
    one phantom peer over each run of them, with 1,000 times the compute and link of the whole swarm (``peer_id``
    ``"~phantom<b>"``), so that a placement with holes still has a throughput (what the rest of the swarm serves) and
    block prices to guide a search; without holes it is :func:`partitioner.flow.max_flow` itself."""
    from .flow import PlacedPeer, max_flow, placed_peers

    L = model.num_blocks
    placed = placed_peers(spec, model, placement)
    holes = unserved_blocks(placement, L)
    if holes:
        big = 1e3 * max(sum(max(p.compute_tps, p.network_tps * p.length) for p in placed), 1.0)
        runs: List[List[int]] = []
        for b in holes:
            if runs and runs[-1][1] == b:
                runs[-1][1] = b + 1
            else:
                runs.append([b, b + 1])
        placed = placed + [PlacedPeer(f"~phantom{a}", a, b, big, big) for a, b in runs]
    return len(holes), max_flow(placed, L)


def search_moves(start: Placement, peers: Sequence[PeerSpec], model: ModelSpec, max_moves: int, *,
                 beam: int = 4, tries: int = 12, budget: int = 300, min_gain: float = 0.1) -> RebalancePlan:
    """A rebalancing plan found by beam search over sequences of safe single-peer moves, each state judged by the
    max-flow LP (for small swarms: an LP costs milliseconds there).

    A state is a placement reached from ``start`` by moving distinct peers one after another; its value is
    ``(fewest unserved blocks, max-flow throughput)``, holes bridged by phantom peers (:func:`_flow_with_phantoms`)
    so that a state with holes is still ranked by what the rest serves. From each of the ``beam`` best states of a
    depth, every peer not yet moved is offered a few span lengths (its current one, one and two shorter and longer,
    half and double, its best-work length, all its memory) and for each the starts with the most LP block price
    under them (the dual of the per-block rows: where capacity is scarce), plus the starts that keep its first or
    last block (grow or shrink in place); a window over unserved blocks earns a large bonus. Moves are ranked by the
    first-order estimate ``sum(price x new per-block capacity) - sum(price x load the peer carries now)`` and the
    ``tries`` best are solved exactly, with the ``tries // 2`` best moves of :func:`_profile_moves` (each peer's
    :func:`partitioner.placement.best_move` on the even-spread profile). The next depth keeps half the beam by
    throughput and the other half by the smallest deficit below the upper bound (``sum_b max(0, bound - supply_b)``
    of the even-spread profile, tokens/s x blocks) among children that lose no throughput: sideways steps, since a
    run of bottleneck blocks may need several peers before the throughput moves. A move must be safe on its own in
    the state it starts from: a peer that alone
    serves some blocks must keep them and its old and new spans' hull must fit its memory (it then moves ``via``
    the hull, make before break); otherwise it reloads while others serve its old blocks. So every prefix of the
    plan is safe, which :func:`check_plan` confirms. Depth ``max_moves``, at most ``budget`` LPs.

    The plan returned is the state with the best ``(unserved, throughput - hysteresis)`` over all depths, where each
    move costs ``min_gain x`` its peer's best work ``/ L`` (tokens/s): a move must pay for itself, as in
    :func:`plan_rebalance`. ``start`` itself (no moves) is a candidate, so the plan never serves less than it.
    """
    from .cost import network_tps

    L = model.num_blocks
    spec = [p for p in peers if p.peer_id in start]
    by_id = {p.peer_id: p for p in spec}
    curves = {p.peer_id: work_curve(p, model) for p in spec}
    net = {p.peer_id: network_tps(p, model) for p in spec}
    fee = {pid: min_gain * float(curves[pid].max()) / L if len(curves[pid]) else 0.0 for pid in curves}

    target = upper_bound(spec, model)

    def state(pl: Placement, moves: Tuple[Move, ...]):
        holes, sol = _flow_with_phantoms(spec, model, pl)
        cost = sum(fee[m.peer_id] for m in moves)
        prof = supply_profile(L, [(s, e, float(curves[pid][e - s - 1]) / (e - s)) for pid, (s, e) in pl.items()])
        return dict(pl=pl, moves=moves, holes=holes, sol=sol, thr=sol.throughput, score=(-holes, sol.throughput - cost),
                    deficit=float(np.maximum(target - prof, 0).sum()))

    root = state({pid: start[pid] for pid in by_id}, ())
    used = 1
    best = root
    frontier = [root]
    seen = {tuple(sorted(root["pl"].items()))}
    for _depth in range(max_moves):
        children = []
        for st in frontier:
            cands = _candidate_moves(st, curves, net, L)[:tries] + _profile_moves(st, curves, L, target)[:tries // 2]
            for _, pid, s, e, via in cands:
                if used >= budget:
                    break
                pl = dict(st["pl"])
                pl[pid] = (s, e)
                key = tuple(sorted(pl.items()))
                if key in seen:
                    continue
                seen.add(key)
                child = state(pl, st["moves"] + (Move(pid, st["pl"][pid], (s, e), via),))
                child["parent_thr"] = st["thr"]
                used += 1
                children.append(child)
        if not children:
            break
        # half the beam: the highest throughput; the other half: the smallest deficit below the target among those
        # that lose no throughput (sideways steps: a run of bottleneck blocks may need several peers to lift)
        children.sort(key=lambda c: (-c["holes"], -c["thr"]))
        frontier = children[:(beam + 1) // 2]
        rest = [c for c in children[(beam + 1) // 2:] if c["thr"] >= c["parent_thr"] * (1 - 1e-9)]
        rest.sort(key=lambda c: (-c["holes"], c["deficit"]))
        frontier += rest[:beam - len(frontier)]
        top = max(children, key=lambda c: c["score"])
        if top["score"] > best["score"]:
            best = top
        if used >= budget:
            break
    end = best["pl"]
    prof = supply_profile(L, [(s, e, float(curves[pid][e - s - 1]) / (e - s)) for pid, (s, e) in end.items()])
    prof0 = supply_profile(L, [(s, e, float(curves[pid][min(e - s, len(curves[pid])) - 1]) / (e - s))
                               for pid, (s, e) in root["pl"].items()])
    return RebalancePlan(moves=list(best["moves"]), min_before=float(prof0.min()), min_after=float(prof.min()),
                         target=target)


def _candidate_moves(st: Dict, curves: Dict[str, np.ndarray], net: Dict[str, float], L: int
                     ) -> List[Tuple[float, str, int, int, Optional[Tuple[int, int]]]]:
    """Safe single-peer moves from a :func:`search_moves` state, best first estimate first:
    ``(estimate, peer_id, start, end, via)``."""
    cur, sol = st["pl"], st["sol"]
    moved = {m.peer_id for m in st["moves"]}
    count = supply_profile(L, [(s, e, 1.0) for s, e in cur.values()])
    unserved = (count <= 0).astype(np.float64)
    price = sol.block_price if sol.block_price is not None and sol.throughput > 0 else None
    if price is None or price.sum() <= 0:
        price = np.ones(L)
    price = price / max(price.sum(), 1e-300)
    lam = max(sol.throughput, 1e-12)
    cum_p = np.concatenate(([0.0], np.cumsum(price)))
    cum_u = np.concatenate(([0.0], np.cumsum(unserved)))
    bonus = 10.0 * lam
    out = []
    for pid, (s0, e0) in cur.items():
        if pid in moved:
            continue
        curve = curves[pid]
        m = len(curve)
        if m == 0:
            continue
        k0 = e0 - s0
        load = sol.load.get(pid)
        old_val = float((price[s0:e0] * load).sum()) if load is not None else 0.0
        cnt = count.copy()
        cnt[s0:e0] -= 1
        alone = np.flatnonzero((cnt <= 0) & (count > 0))
        best_k = int(np.flatnonzero(curve >= curve.max() * (1 - 1e-2))[-1] + 1)
        ks = {k0, k0 - 1, k0 + 1, k0 - 2, k0 + 2, best_k, m, max(1, k0 // 2), min(m, 2 * k0)}
        for k in ks:
            if k < 1 or k > m or k > L:
                continue
            h = min(float(curve[k - 1]) / k, net[pid], lam * 1.5)
            starts = np.arange(L - k + 1)
            ok = np.ones(len(starts), dtype=bool)
            if len(alone):  # make before break: keep the blocks only it serves, the hull must fit its memory
                ok &= (starts <= alone.min()) & (starts + k > alone.max())
                ok &= (np.maximum(starts + k, e0) - np.minimum(starts, s0)) <= m
            if not ok.any():
                continue
            gain = np.where(ok, (cum_p[starts + k] - cum_p[starts]) * h + bonus * (cum_u[starts + k] - cum_u[starts]),
                            -np.inf)
            picks = set(int(s) for s in np.argsort(-gain)[:2])
            picks |= {s for s in (s0, e0 - k) if 0 <= s <= L - k}
            for s in picks:
                if not np.isfinite(gain[s]) or (s, s + k) == (s0, e0):
                    continue
                via = (min(s0, s), max(e0, s + k)) if len(alone) else None
                out.append((float(gain[s]) - old_val, pid, s, s + k, via))
    out.sort(key=lambda t: -t[0])
    return out


def _profile_moves(st: Dict, curves: Dict[str, np.ndarray], L: int, target: float
                   ) -> List[Tuple[float, str, int, int, Optional[Tuple[int, int]]]]:
    """For each peer not yet moved in a :func:`search_moves` state, its :func:`partitioner.placement.best_move` on
    the even-spread profile (safe: ``strict_cover``), scored ``L x (rise of the weakest block) + (cut in the
    deficit below target)`` as in :func:`plan_rebalance`; best first, as ``(score, peer_id, start, end, via)``."""
    cur = dict(st["pl"])
    moved = {m.peer_id for m in st["moves"]}
    h_of = {pid: float(curves[pid][e - s - 1]) / (e - s) for pid, (s, e) in cur.items()}
    prof = supply_profile(L, [(s, e, h_of[pid]) for pid, (s, e) in cur.items()])
    count = supply_profile(L, [(s, e, 1.0) for s, e in cur.values()])
    out = []
    for pid, (s0, e0) in cur.items():
        if pid in moved or not len(curves[pid]):
            continue
        old_min, old_def, new_min, new_def, s, k = best_move(pid, cur, prof, count, curves, h_of, target,
                                                             strict_cover=True)
        if (s, s + k) == (s0, e0):
            continue
        c = count.copy()
        c[s0:e0] -= 1
        alone = bool(((c <= 0) & (count > 0))[s0:e0].any())
        via = (min(s0, s), max(e0, s + k)) if alone else None
        out.append((L * (new_min - old_min) + (old_def - new_def), pid, s, s + k, via))
    out.sort(key=lambda t: -t[0])
    return out


def _best_plan(plans: Sequence[RebalancePlan], start: Placement, peers: Sequence[PeerSpec], model: ModelSpec
               ) -> RebalancePlan:
    """The plan whose end state leaves the fewest blocks unserved, then serves the most under the max-flow LP
    (fewest moves among equals, then the first); its ``target`` is the upper bound of the peers in ``start``."""
    from .flow import max_flow, placed_peers

    spec = [p for p in peers if p.peer_id in start]
    L = model.num_blocks
    scored = []
    for i, plan in enumerate(plans):
        end = plan.apply(start)
        thr = max_flow(placed_peers(spec, model, end), L).throughput
        scored.append((len(unserved_blocks(end, L)), thr, i, plan))
    holes = min(t[0] for t in scored)
    scored = [t for t in scored if t[0] == holes]
    top = max(t[1] for t in scored)
    best = min((t for t in scored if t[1] >= top * (1 - 1e-9)), key=lambda t: (len(t[3].moves), t[2]))[3]
    best.target = plans[0].target or upper_bound(spec, model)
    return best
