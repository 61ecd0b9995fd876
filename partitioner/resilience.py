"""Placements of tiny swarms that survive a peer leaving: among the placements serving (nearly) the most, the one
each departure is best repaired from.

In a swarm of a handful of peers the placement that serves the most usually holds each block once, so when any
peer leaves, some blocks have no holder and nothing is served until the others move; with a move budget (one
peer, :mod:`partitioner.rebalance`) the best reachable placement often serves little or nothing. Yet there are
often several placements that serve as much, and some of them hold a few blocks twice or leave a peer room to
take over a neighbour's blocks. This module chooses, among the placements that keep at least ``keep`` of the bound
(by default: all that the given placement serves), one from which every single departure can be repaired well by
at most one safe move.

**Program** (a scenario MILP: one flow program per departure, sharing the placement). For the whole swarm and,
for every departure ``j`` (by default each single peer; any sets of peers leaving together) that leaves a
coverable swarm (new bound ``B_j`` > 0, :func:`partitioner.bound.upper_bound`), for the others ``R_j``, the flow
program of :mod:`partitioner.milp` (the
same variables ``h, t, z, x, u, lam`` and rows: per-block flow, contiguity, length, caps, entries, network,
compute); the scenario's spans ``h^j[i, .]`` differ from the placement's ``h[i, .]`` only for a peer with
``moved^j_i = 1``; ``sum_i moved^j_i <= max_moves``; a move is safe (no block loses its last holder on the way,
:meth:`partitioner.rebalance.RebalancePlan.intermediate_states`): either the mover's old blocks are all held by
other peers of ``R_j`` (a plain move), or the hull of its old and new spans fits its memory (make before break,
``via``; a block it alone held stays held at the end because the scenario's flow program covers every block).

    maximize   sum_j f_j + eps lam / B                  f_j <= lam_j / B_j,  f_j <= 1
    subject to lam >= keep_lam                          (the static throughput kept)

``B`` is the swarm's bound and ``keep_lam = min(keep B, lam of the given placement)``. Blocks are taken in groups
(:func:`partitioner.milp.grid_for`, including the span ends of the given placement and of its repairs below), a
restriction: every solution is a real placement with real plans. The first incumbent is the given placement, and
for each departure the given placement repaired by its best plan of ``max_moves`` moves
(:func:`partitioner.rebalance.milp_plan`), each routed by its max flow; so a placement returned is repaired at
least as well as the given one in the program's objective (if a repair is one the program cannot express, the
incumbent has no moves instead). Sizes: 4 peers and 24 groups, about 2,500 variables; HiGHS finds good incumbents
within a minute on the benchmark's swarms.

This is two-stage stochastic programming (scenario decomposition, Birge and Louveaux, "Introduction to
Stochastic Programming") applied to the placement MILP; Petals and Helix place for the current peers only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .bound import upper_bound
from .cost import ModelSpec, PeerSpec, max_blocks
from .flow import max_flow, placed_peers
from .milp import Placement, _peer_data, _run, check_placement, grid_for
from .rebalance import milp_plan

RESILIENT_MAX_PEERS = 6  # the program grows with peers x departures; beyond this it is not attempted by default


@dataclass
class ResilientResult:
    """What :func:`resilient_placement` found.

    :param placement: ``{peer_id: (start, end)}``: the given placement if nothing better was found
    :param static: tokens/s the placement serves (its max flow)
    :param restored: ``{leavers: fraction}`` (leavers: a sorted tuple of peer ids): per departure, the program's
        ``min(1, lam_j / B_j)`` for the plan in its solution: the best one it found within the time limit, which
        may be below what a rebalancing plan then finds (:func:`partitioner.rebalance.plan_rebalance` with its
        MILP; the tests check that it reaches each claim); departures that leave an uncoverable swarm, no peer, or
        every peer are absent
    :param changed: whether ``placement`` differs from the given one
    :param seconds: wall time
    :param optimal: HiGHS proved the program's solution optimal (else it stopped at the time limit)
    """

    placement: Placement
    static: float
    restored: Dict[Tuple[str, ...], float] = field(default_factory=dict)
    changed: bool = False
    seconds: float = 0.0
    optimal: bool = False


class _Program:
    """Rows and columns of a MILP under construction (COO triplets, bounds, integrality)."""

    def __init__(self) -> None:
        self.ncol = 0
        self.lb: List[np.ndarray] = []
        self.ub: List[np.ndarray] = []
        self.integer: List[np.ndarray] = []
        self.rows: List[np.ndarray] = []
        self.cols: List[np.ndarray] = []
        self.vals: List[np.ndarray] = []
        self.lo: List[float] = []
        self.hi: List[float] = []

    def columns(self, count: int, upper, integer: bool = False) -> int:
        """``count`` new columns in ``[0, upper]``; returns the first one's index."""
        first = self.ncol
        self.ncol += count
        self.lb.append(np.zeros(count))
        self.ub.append(np.broadcast_to(np.asarray(upper, dtype=np.float64), (count,)).copy())
        self.integer.append(np.full(count, 1 if integer else 0))
        return first

    def row(self, cols, vals, lo: float, hi: float) -> None:
        """``lo <= sum vals * x[cols] <= hi``."""
        r = len(self.lo)
        self.rows.append(np.full(len(cols), r))
        self.cols.append(np.asarray(cols, dtype=np.int64))
        self.vals.append(np.asarray(vals, dtype=np.float64))
        self.lo.append(lo)
        self.hi.append(hi)

    def matrix(self):
        from scipy.sparse import coo_matrix
        return coo_matrix((np.concatenate(self.vals), (np.concatenate(self.rows), np.concatenate(self.cols))),
                          shape=(len(self.lo), self.ncol)).tocsr()


def _flow_program(prog: _Program, who: Sequence[int], comp, net, w: np.ndarray, cap: float):
    """Add the flow program of :mod:`partitioner.milp` for peers ``who`` over groups of ``w`` blocks; returns
    ``(lam column, {peer: (h, t, z, x, u) first columns})``."""
    G = len(w)
    lam = prog.columns(1, cap)
    cols = {}
    for i in who:
        m = len(comp[i])
        a = min(net[i], float(comp[i].max()), cap)
        za = np.minimum(np.minimum(comp[i], net[i]), cap)
        h = prog.columns(G, 1.0, integer=True)
        t = prog.columns(G, 1.0)
        z = prog.columns(m, 1.0, integer=True)
        x = prog.columns(G, a)
        u = prog.columns(G, net[i])
        cols[i] = (h, t, z, x, u)
        zs = list(range(z, z + m))
        for g in range(G):
            prev = [g - 1] if g else []
            prog.row([h + g, t + g] + [h + q for q in prev], [1, -1] + [-1] * len(prev), -np.inf, 0)  # a rise starts
            prog.row([x + g, h + g], [1, -a], -np.inf, 0)
            prog.row([x + g] + zs, [1] + list(-za), -np.inf, 0)
            prog.row([x + g, u + g] + [x + q for q in prev], [1, -1] + [-1] * len(prev), -np.inf, 0)  # entries
        prog.row(list(range(t, t + G)), [1] * G, -np.inf, 1)
        prog.row(zs + list(range(h, h + G)), list(np.arange(1, m + 1)) + list(-w), 0, 0)
        prog.row(zs, [1] * m, 0, 1)
        prog.row(list(range(u, u + G)), [1] * G, -np.inf, net[i])
        prog.row(list(range(x, x + G)) + zs, list(w) + list(-comp[i]), -np.inf, 0)
    for g in range(G):
        prog.row([cols[i][3] + g for i in who] + [lam], [1] * len(who) + [-1], 0, 0)
    return lam, cols


def _start(x0: np.ndarray, sol, kept, ids: Sequence[int], cols, lam: int, pl: Placement, edges: np.ndarray,
           scale: float) -> None:
    """Write placement ``pl`` routed by ``sol`` (a :class:`partitioner.flow.FlowSolution`) into ``x0``, each
    peer's load averaged over the groups of ``edges`` (averaging keeps every row and never adds entries)."""
    x0[lam] = sol.throughput / scale
    for i in ids:
        h, t, z, x, u = cols[i]
        s, e = pl[kept[i].peer_id]
        a, b = np.searchsorted(edges, [s, e])
        x0[h + a:h + b] = 1.0
        x0[t + a] = 1.0
        x0[z + e - s - 1] = 1.0
        load = sol.load.get(kept[i].peer_id)
        if load is None or sol.throughput <= 0:
            continue
        per = np.add.reduceat(load, edges[a:b] - s) / np.diff(edges[a:b + 1]) / scale
        x0[x + a:x + b] = per
        x0[u + a:u + b] = np.maximum(np.diff(np.concatenate(([0.0], per))), 0.0)


def _departure_program(prog: _Program, cols, rest: Sequence[int], comp, net, w: np.ndarray, b_j: float,
                       max_moves: int, hulls: List[Tuple[int, int, int, int, int]]):
    """Add one departure's scenario (module docstring): the flow program of the peers ``rest`` left, their spans
    tied to the placement's ``cols`` but for at most ``max_moves`` safe movers, and ``f <= lam_j / b_j``. Appends
    each peer's ``(peer, hull, rise, moved, via)`` columns to ``hulls``; returns ``(lam_j, its cols, f)`` columns."""
    G, L = len(w), float(w.sum())
    lam_j, cols_j = _flow_program(prog, rest, comp, net, w, b_j * (1 + 1e-6))
    moved = prog.columns(len(rest), 1.0, integer=True)
    for a, i in enumerate(rest):
        h0, hj = cols[i][0], cols_j[i][0]
        others = [cols[k][0] for k in rest if k != i]
        via = prog.columns(1, 1.0, integer=True)
        hull = prog.columns(G, 1.0)
        rise = prog.columns(G, 1.0)
        hulls.append((i, hull, rise, moved + a, via))
        for g in range(G):
            prog.row([hj + g, h0 + g, moved + a], [1, -1, -1], -np.inf, 0)  # |h^j - h| <= moved
            prog.row([h0 + g, hj + g, moved + a], [1, -1, -1], -np.inf, 0)
            # a plain move (via = 0): the mover's old blocks are held by others, h[i,g] <= sum_k h[k,g]
            prog.row([h0 + g, moved + a, via] + [o + g for o in others], [1, 1, -1] + [-1] * len(others),
                     -np.inf, 1)
            # the hull of both spans: hull >= h, h^j, and contiguous (one rise in all)
            prog.row([hull + g, h0 + g], [1, -1], 0, np.inf)
            prog.row([hull + g, hj + g], [1, -1], 0, np.inf)
            prev = [hull + g - 1] if g else []
            prog.row([hull + g, rise + g] + prev, [1, -1] + [-1] * len(prev), -np.inf, 0)
        prog.row(list(range(rise, rise + G)), [1] * G, -np.inf, 1)
        # make before break (via = 1): the hull fits the mover's memory
        prog.row(list(range(hull, hull + G)) + [via], list(w) + [L], -np.inf, len(comp[i]) + L)
    prog.row(list(range(moved, moved + len(rest))), [1] * len(rest), -np.inf, max_moves)
    f = prog.columns(1, 1.0)
    prog.row([f, lam_j], [1, -1 / b_j], -np.inf, 0)
    return lam_j, cols_j, f


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _is_whole(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_arguments(peers: Sequence[PeerSpec], placement, keep: float, time_limit: float, groups: int,
                     max_moves: int, departures, max_peers: int) -> None:
    """:raises ValueError: naming the first argument of :func:`resilient_placement` that is out of range"""
    if not isinstance(placement, Mapping):
        raise ValueError(f"placement must map peer ids to (start, end) spans, got {type(placement).__name__}")
    if not (_is_number(keep) and 0 < keep <= 1):
        raise ValueError(f"keep must be a number in (0, 1], got {keep!r}")
    if not (_is_number(time_limit) and math.isfinite(time_limit) and time_limit > 0):
        raise ValueError(f"time_limit must be a positive number of seconds, got {time_limit!r}")
    if not _is_whole(groups) or groups < 1:
        raise ValueError(f"groups must be a positive whole number, got {groups!r}")
    if not _is_whole(max_peers) or max_peers < 2:
        raise ValueError(f"max_peers must be a whole number of at least 2, got {max_peers!r}")
    if not _is_whole(max_moves) or max_moves not in (0, 1):
        raise ValueError(f"max_moves must be 0 or 1 (a plan of several moves needs an order), got {max_moves!r}")
    ids = [p.peer_id for p in peers]
    if len(set(ids)) != len(ids):
        raise ValueError("two peers share a peer id")
    if departures is not None:
        if isinstance(departures, (str, bytes)):
            raise ValueError("departures must be a list of sets of peer ids, not a string")
        for gone in departures:
            if isinstance(gone, (str, bytes)) or not hasattr(gone, "__iter__"):
                raise ValueError(f"each departure must be a set (tuple, list) of peer ids, got {gone!r}")


def resilient_placement(peers: Sequence[PeerSpec], model: ModelSpec, placement: Placement, *, keep: float = 1.0,
                        time_limit: float = 60.0, groups: int = 24, max_moves: int = 1,
                        departures: Optional[Sequence[Sequence[str]]] = None,
                        max_peers: int = RESILIENT_MAX_PEERS) -> ResilientResult:
    """A placement serving at least ``keep`` of the bound (or all that ``placement`` serves, if less: with the
    default ``keep = 1`` nothing is given up) from which each departure is repaired as well as possible by
    ``max_moves`` safe moves (the program in the module docstring; spans on a grid of about ``groups`` groups plus
    ``placement``'s span ends).

    :param placement: the swarm's throughput-first placement (``{peer_id: (start, end)}``, every peer that can
        hold a block; checked: ``ValueError`` if it is not a placement of ``peers``). It is returned unchanged,
        with an empty ``restored``, when the swarm has more than ``max_peers`` peers or fewer than 2
        that can hold a block, when ``placement`` or the swarm serves nothing (a block without a holder), when no
        departure leaves a swarm that can cover the model, or when HiGHS returns no solution; and it is returned
        with the program's ``restored`` when the program finds nothing better
    :param keep: fraction of the bound (:func:`partitioner.bound.upper_bound`) the placement must still serve
    :param time_limit: seconds of solver time (positive): each departure's repair plan gets at most half of its
        share (5 s at most), the program the rest (at least 0.1 s). Each departure's bound and max flows come on top
        (about 0.3-0.6 s each at 8 peers), so with many departures the call takes longer than ``time_limit``
    :param groups: about this many groups of blocks on the grid (a positive whole number)
    :param max_moves: moves allowed after a departure: 0 or 1 (with several, each move's safety would depend on
        the order of the moves, which the program does not model)
    :param departures: the departures to plan for, each a set (tuple, list) of peer ids leaving together (default:
        every single peer); ids not in the swarm are ignored and equal departures count once; each adds a flow
        program of the peers left, so the program grows with their number
    :param max_peers: larger swarms are not planned (default ``RESILIENT_MAX_PEERS``; at 8 peers, planning for every
        single departure, HiGHS changed the given placement in none of 30 of the benchmark's swarms within a minute,
        in a trial before the program started from each departure's repair). The program itself has no size
        limit: with one departure known in advance it serves to measure what any placement could restore
        (``sims/resilience_ceiling.py``)
    :raises ValueError: for a bad ``placement``, duplicate peer ids, or an argument out of the ranges above
    """
    t0 = time.time()
    if departures is not None and not isinstance(departures, (str, bytes)):
        try:
            departures = [d if isinstance(d, (str, bytes)) or not hasattr(d, "__iter__") else tuple(d)
                          for d in departures]  # read once: an iterator would be used up by the checks
        except TypeError:
            raise ValueError(f"departures must be a list of sets of peer ids, got {departures!r}") from None
    _check_arguments(peers, placement, keep, time_limit, groups, max_moves, departures, max_peers)
    check_placement(peers, model, placement)
    placement = {pid: (int(s), int(e)) for pid, (s, e) in placement.items()}
    result = _plan(peers, model, placement, keep, time_limit, groups, max_moves, departures, max_peers)
    result.seconds = time.time() - t0
    return result


def _plan(peers: Sequence[PeerSpec], model: ModelSpec, placement: Placement, keep: float, time_limit: float,
          groups: int, max_moves: int, departures, max_peers: int) -> ResilientResult:
    """:func:`resilient_placement` after its checks (``placement``'s spans as integer pairs)."""
    t0 = time.time()
    kept, comp, net = _peer_data(peers, model)
    n = len(kept)
    L = model.num_blocks
    base = max_flow(placed_peers(kept, model, placement), L, hop_penalty=0.0)
    result = ResilientResult(dict(placement), base.throughput)
    if n < 2 or n > max_peers or base.throughput <= 0:
        return result
    bound = upper_bound(kept, model)
    if bound <= 0:
        return result
    if departures is None:
        departures = [(p.peer_id,) for p in kept]
    known = {p.peer_id for p in kept}
    chosen = []  # (leavers, remaining peers' indices, their bound, the given placement repaired by its best plan)
    for gone in departures:
        j = tuple(sorted({pid for pid in gone if pid in known}, key=str))
        rest = [i for i in range(n) if kept[i].peer_id not in j]
        if any(c[0] == j for c in chosen) or len(rest) == n or not rest:
            continue
        b_j = upper_bound([kept[i] for i in rest], model)
        if b_j > 0:
            repaired = _repaired(kept, rest, model, placement, max_moves, time_limit, len(departures))
            chosen.append((j, rest, b_j, repaired))
    if not chosen:
        return result
    ends = [v for span in placement.values() for v in span]
    ends += [v for *_, repaired in chosen for span in repaired.values() for v in span]
    edges = grid_for(L, groups, keep=ends)
    w = np.diff(edges).astype(np.float64)
    G = len(w)
    scale = max(float(max(c.max() for c in comp)), 1e-12)
    comp = [c / scale for c in comp]
    net = [v / scale for v in net]
    big = bound / scale
    prog = _Program()
    lam, cols = _flow_program(prog, range(n), comp, net, w, big * (1 + 1e-6))
    prog.lb[0][0] = min(keep * big, base.throughput / scale) * (1 - 1e-6)
    cost_of: Dict[int, float] = {lam: -1e-3 / big}
    scenarios = []
    hulls: Dict[Tuple[str, ...], List[Tuple[int, int, int, int, int]]] = {}  # per departure: each peer's columns
    for j, rest, b_j, repaired in chosen:
        hulls[j] = []
        lam_j, cols_j, f = _departure_program(prog, cols, rest, comp, net, w, b_j / scale, max_moves, hulls[j])
        cost_of[f] = -1.0
        scenarios.append((j, rest, lam_j, cols_j, f, b_j / scale, repaired))
    cost = np.zeros(prog.ncol)
    for c, v in cost_of.items():
        cost[c] = v
    lb, ub, integer = np.concatenate(prog.lb), np.concatenate(prog.ub), np.concatenate(prog.integer)
    a_mat, lo, hi = prog.matrix(), np.array(prog.lo), np.array(prog.hi)
    x0 = _incumbent(prog.ncol, base, kept, model, cols, lam, placement, edges, scale, scenarios, hulls, True)
    x0 = np.clip(x0, lb, ub)
    if not _feasible(a_mat, lo, hi, x0):  # a repair the program cannot express: start from no moves
        x0 = np.clip(_incumbent(prog.ncol, base, kept, model, cols, lam, placement, edges, scale, scenarios, hulls,
                                False), lb, ub)
    left = max(time_limit - (time.time() - t0), 0.1)
    res = _run(cost, integer, lb, ub, a_mat, lo, hi, left, 1e-4, x0)
    if res.x is None:
        return result
    new: Placement = {}
    for i, p in enumerate(kept):
        held = np.flatnonzero(res.x[cols[i][0]:cols[i][0] + G] > 0.5)
        new[p.peer_id] = (int(edges[held[0]]), int(edges[held[-1] + 1])) if len(held) else placement[p.peer_id]
    static = max_flow(placed_peers(kept, model, new), L, hop_penalty=0.0).throughput
    if static < min(keep * bound, base.throughput) * (1 - 1e-6):  # the program's own flow was off: keep the given
        return result
    result.placement, result.static, result.changed = new, static, new != dict(placement)
    result.optimal = res.status == 0
    result.restored = {j: float(min(1.0, max(0.0, res.x[f]))) for j, _, _, _, f, _, _ in scenarios}
    return result


def _repaired(kept: Sequence[PeerSpec], rest: Sequence[int], model: ModelSpec, placement: Placement, max_moves: int,
              time_limit: float, count: int) -> Placement:
    """The placement of the peers ``rest`` after the best plan of at most ``max_moves`` moves from ``placement``
    (:func:`partitioner.rebalance.milp_plan`, half of ``time_limit``'s share for each of ``count`` departures): the
    program's incumbent for that departure, so that the placement it returns is kept only if it is repaired
    better than the given one is."""
    spec = [kept[i] for i in rest]
    start = {p.peer_id: placement[p.peer_id] for p in spec}
    if not max_moves:
        return start
    plan = milp_plan(start, spec, model, max_moves, time_limit=min(5.0, time_limit / (2.0 * count)))
    return plan.apply(start) if len(plan.moves) <= max_moves else start


def _incumbent(ncol: int, base, kept, model: ModelSpec, cols, lam: int, placement: Placement, edges: np.ndarray,
               scale: float, scenarios, hulls, repair: bool) -> np.ndarray:
    """The program's first incumbent: ``placement`` routed by its max flow ``base``, and for each departure the
    peers left, repaired (with ``repair``: by the departure's plan, its mover marked as moved and its hull spanning
    both of its spans; else unmoved), routed by their max flow."""
    L = model.num_blocks
    x0 = np.zeros(ncol)
    _start(x0, base, kept, range(len(kept)), cols, lam, placement, edges, scale)
    for j, rest, lam_j, cols_j, f, b_j, repaired in scenarios:
        after = repaired if repair else {kept[i].peer_id: placement[kept[i].peer_id] for i in rest}
        sol = max_flow(placed_peers([kept[i] for i in rest], model, after), L, hop_penalty=0.0)
        _start(x0, sol, kept, rest, cols_j, lam_j, after, edges, scale)
        x0[f] = min(1.0, x0[lam_j] / b_j)
        for i, hull, rise, moved, via in hulls[j]:
            old, new = placement[kept[i].peer_id], after[kept[i].peer_id]
            s, e = min(old[0], new[0]), max(old[1], new[1])
            a, b = np.searchsorted(edges, [s, e])
            x0[hull + a:hull + b] = 1.0
            x0[rise + a] = 1.0
            if new != old:
                x0[moved] = 1.0
                x0[via] = 1.0 if e - s <= max_blocks(kept[i], model) else 0.0  # make before break if it fits
    return x0


def _feasible(a_mat, lo: np.ndarray, hi: np.ndarray, x: np.ndarray, tol: float = 1e-7) -> bool:
    """Whether ``x`` satisfies ``lo <= a_mat x <= hi`` (up to ``tol`` relative to each row's scale)."""
    act = a_mat @ x
    slack = tol * (1.0 + np.abs(act))
    return bool(np.all(act >= lo - slack) and np.all(act <= hi + slack))
