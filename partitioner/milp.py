"""Exact placement + routing as a mixed-integer linear program (small swarms): the best placement's throughput, a
true upper bound on it under a time limit, and the best rebalancing plan within a move budget.

The model is the one :func:`partitioner.flow.max_flow` evaluates, with the spans made variables. For peer ``i``
(``N`` peers, ``L`` blocks, ``m_i`` = :func:`partitioner.cost.max_blocks`), ``c_i(k)`` =
:func:`partitioner.cost.compute_tps` of a ``k``-block span (its batch, hence its compute, shrinks as the span
grows: KV-cache memory), ``n_i`` = :func:`partitioner.cost.network_tps`:

* ``h[i,b]``  binary       peer ``i`` holds block ``b``                               (``N x L``)
* ``t[i,b]``  in [0, 1]    its span starts at ``b``                                   (``N x L``)
* ``z[i,k]``  binary       its span has ``k`` blocks, ``k = 1..m_i``                  (``sum_i m_i``)
* ``x[i,b]``  >= 0         tokens/s it runs through block ``b``                      (``N x L``)
* ``u[i,b]``  >= 0         tokens/s entering its span just before block ``b``         (``N x L``)
* ``lam``     >= 0         tokens/s through the whole model

    maximize   lam
    subject to sum_i x[i,b] = lam                           every block b              (as in max_flow)
               h[i,b] - h[i,b-1] <= t[i,b]                  (h[i,-1] = 0)              (a span starts where h rises)
               sum_b t[i,b] <= 1                                                        (one rise: contiguous)
               sum_k z[i,k] <= 1,  sum_k k z[i,k] = sum_b h[i,b]                       (its length, or none)
               x[i,b] <= A_i h[i,b]                         A_i = min(n_i, max_k c_i(k), U)
               x[i,b] <= sum_k min(n_i, c_i(k), U) z[i,k]                               (valid cut, tightens the LP)
               x[i,b] - x[i,b-1] <= u[i,b]                  (x[i,-1] = 0)              (entries)
               sum_b u[i,b] <= n_i                                                      (network)
               sum_b x[i,b] <= sum_k c_i(k) z[i,k]                                      (compute at its length)

Given a contiguous span ``[s, e)`` (``h`` is 1 exactly there), ``x`` is 0 outside it, the entry rows read
``u[i,s] >= x[i,s]`` and ``u[i,b] >= x[i,b] - x[i,b-1]`` inside, as in :func:`partitioner.flow.max_flow`, so for
fixed ``h`` the program *is* that LP, and its optimum over ``h`` is the best max flow of any placement. A peer may
be left out (an extra span never lowers a max flow, so callers give such a peer any span afterwards). ``U`` is a
known upper bound on ``lam`` (``upper``; no block carries more than ``lam``), and the second cap on ``x`` is
implied at integral points (a peer runs no more of a block than enters its span, nor more than its compute): both
only cut fractional points. Units: everything in tokens/s (block-tokens/s for compute), scaled by the largest
``c_i`` inside the solver. ``tests/test_partitioner_milp.py`` checks the optimum against exhaustive search.

**Bound.** HiGHS (through :func:`scipy.optimize.milp`) returns a dual bound ``mip_dual_bound`` with any status;
that, not the incumbent, is the upper bound, so a time limit leaves it valid (only looser). A cutoff
``lam >= lower`` (a placement already known) prunes as an incumbent would; then the best placement serves at most
``max(lower, dual bound)`` (and exactly ``lower`` is the bound if the cut program is infeasible). The bound is
raised by a relative ``1e-6`` for the solver's feasibility tolerance.

**Rebalancing** (:func:`best_rebalance`): the same program with the current spans ``h0`` and a binary ``moved[i]``
per peer, ``|h[i,b] - h0[i,b]| <= moved[i]`` and ``sum_i moved[i] <= max_moves``, every peer keeping a span
(``sum_k z = 1``): the best placement reachable by moving at most ``max_moves`` peers (a tiny cost per move picks
the fewest among equals). With few sets of movers, one small program per set (the others fixed), and a single
mover constrained to a move that is safe on its own (see :func:`best_rebalance`).

**Grids** (``grid``): blocks taken in groups, either as a restriction (spans on the group boundaries: feasible
placements, no bound) or as a relaxation (:func:`grid_bound`: a true bound from a smaller program).

Size: about ``5 N L`` variables (``N L + sum_i m_i`` binary) and ``5 N L`` rows. Measured on the benchmark's swarms
(``sims.scale.swarmgen``, 32-80 blocks, one core): 4 peers solve exactly in 0.2-5 s; at 8 peers the LP relaxation
already meets :func:`partitioner.bound.upper_bound` and branching does not lower the dual bound within 10 s, nor
does the 12-group relaxation (it solves in 1-7 s and equals that bound); the 16-group restriction's incumbent
rarely beats the heuristics; started from the heuristic placement (``initial``, :func:`improve_placement`) the
exact program does improve on it at 8 peers within a minute, and a neighbourhood search of it at 20. Rebalancing
after 2 of 8 peers leave (6 left, 1 move: 6 programs) solves exactly in 0.1-0.5 s in all; 16 peers with 4 moves
find no incumbent within 10 s. Exact at small scale: the same 8-peer swarms cut to 12 blocks solve in 1-20 s. For
the formulation, compare Helix (Mei et al., ASPLOS 2025), whose placement MILP is of the same kind (node-layer
assignment with max-flow constraints).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .cost import ModelSpec, PeerSpec, compute_curve, network_tps

Placement = Dict[str, Tuple[int, int]]

_BOUND_SLACK = 1e-6  # relative slack added to the solver's dual bound (feasibility tolerances)


@dataclass
class MilpResult:
    """One solve.

    :param bound: upper bound on the throughput of every placement allowed (tokens/s): the dual bound, raised by the
        tolerance slack; ``inf`` if the solver gave none
    :param value: the incumbent's throughput as the MILP reports it (tokens/s; 0 if none)
    :param placement: the incumbent ``{peer_id: (start, end)}`` (None if none was found)
    :param status: scipy's status (0 optimal, 1 time/node limit, 2 infeasible, other: trouble)
    :param seconds: wall time of the solve
    :param gap: the solver's relative gap (``nan`` if none)
    """

    bound: float
    value: float
    placement: Optional[Placement]
    status: int
    seconds: float
    gap: float = float("nan")
    moved: Tuple[str, ...] = field(default_factory=tuple)


def _peer_data(peers: Sequence[PeerSpec], model: ModelSpec):
    """``(peers kept, comp, net)``: the peers that can hold a block, ``comp[i]`` their ``c_i(k)`` for
    ``k = 1..m_i`` (block-tokens/s, numpy arrays), ``net[i]`` their ``n_i`` (tokens/s)."""
    kept, comp, net = [], [], []
    for p in peers:
        c = compute_curve(p, model)
        n = network_tps(p, model)
        if len(c) and c.max() > 0 and n > 0:
            kept.append(p)
            comp.append(np.asarray(c, dtype=np.float64))
            net.append(float(n))
    return kept, comp, net


def solve(peers: Sequence[PeerSpec], model: ModelSpec, *, time_limit: float = 10.0, lower: float = 0.0,
          upper: Optional[float] = None, current: Optional[Placement] = None, max_moves: Optional[int] = None,
          move_cost: float = 1e-5, mip_rel_gap: float = 1e-4, grid: Optional[Sequence[int]] = None,
          movable: Optional[Sequence[str]] = None,
          limits: Optional[Dict[str, Tuple[int, int, int, int]]] = None, relax: bool = False,
          initial: Optional[Placement] = None) -> MilpResult:
    """Solve the program of the module docstring.

    :param peers: the swarm; ``model``: its model
    :param time_limit: seconds for HiGHS (the bound stays valid when it stops early)
    :param lower: cutoff, tokens/s: only placements serving at least this are searched (a known placement's value;
        the returned ``bound`` accounts for it, i.e. it bounds every placement, not only those above ``lower``)
    :param upper: a known upper bound, tokens/s (e.g. :func:`partitioner.bound.upper_bound` without the MILP): caps
        ``lam``, which helps the solver prune
    :param current: with ``max_moves``: the current spans (every peer must have one); at most ``max_moves`` peers may
        end on another span (rebalancing), and ``bound``/``value`` are then over those placements only
    :param move_cost: with ``max_moves``: objective cost of one moved peer, as a fraction of ``upper`` (or of the
        largest compute) (the fewest moves among near-equal plans)
    :param mip_rel_gap: HiGHS's relative gap at which it stops
    :param movable: with ``current`` and ``max_moves``: only these peers may move (the others' ``moved`` is 0)
    :param relax: with ``grid``: the grid *relaxation* instead of the restriction (:func:`grid_bound`): ``bound``
        is a true upper bound on every placement, and there is no placement
    :param limits: ``{peer_id: (lo, hi, keep_lo, keep_hi)}``: that peer's span must lie within blocks ``[lo, hi)``
        and hold ``[keep_lo, keep_hi)`` (group-aligned; a safe single move, see :func:`best_rebalance`)
    :param initial: a placement of every peer (``{peer_id: (start, end)}``, checked by :func:`check_placement`:
        ``ValueError`` if it fails) to start from: HiGHS gets it, routed by its max flow, as the first incumbent
        (through ``highspy``), so its improvement heuristics work from it at once, and the result is never worse
        than it (``lower`` does not cut the search then). A placement that serves nothing (a block unheld) is no
        incumbent: the search then starts cold. Exact programs only (no ``grid``)
    :param grid: block boundaries ``0 = g_0 < g_1 < .. < g_G = L``: spans must start and end on them (a restricted
        program, :func:`grid_for`; ``bound`` is then ``inf``, as it bounds only grid-aligned placements). The
        program is the same with the blocks of a group ``[g_j, g_j+1)`` of ``w_j`` blocks as one variable each:
        ``x[i,j]`` is the rate through each of its blocks and the compute row reads ``sum_j w_j x[i,j]``; exact for
        grid-aligned placements, since averaging a flow over blocks with the same holders keeps every row and
        never adds entries (the total variation of a sequence does not grow under block averaging). ``current``
        spans must lie on the grid.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    t_start = time.time()
    L = model.num_blocks
    bounds_ = np.arange(L + 1) if grid is None else np.unique(np.clip(np.asarray(grid, dtype=np.int64), 0, L))
    if bounds_[0] != 0 or bounds_[-1] != L:
        bounds_ = np.unique(np.concatenate(([0, L], bounds_)))
    exact = len(bounds_) == L + 1
    w = np.diff(bounds_).astype(np.float64)  # blocks in each group
    G = len(w)
    kept, comp, net = _peer_data(peers, model)
    n = len(kept)
    if n == 0 or L == 0 or sum(len(c) for c in comp) < L:
        return MilpResult(0.0, 0.0, None, 2, time.time() - t_start)
    scale = max(float(max(c.max() for c in comp)), 1e-12)
    comp = [c / scale for c in comp]
    netv = np.array(net) / scale
    m = np.array([len(c) for c in comp], dtype=np.int64)
    rebalance = current is not None and max_moves is not None

    # variable layout
    NL = n * G
    o_h, o_t, o_x, o_u = 1, 1 + NL, 1 + 2 * NL, 1 + 3 * NL
    o_z = 1 + 4 * NL
    z_first = o_z + np.concatenate(([0], np.cumsum(m)[:-1]))
    nz = int(m.sum())
    o_mv = o_z + nz
    nvar = o_mv + (n if rebalance else 0)
    relax = relax and not rebalance and grid is not None
    o_g, o_F = nvar, nvar + NL  # relax: touched / fully held groups (binary); h is then the held fraction
    if relax:
        nvar += 2 * NL
    ib = np.arange(NL)
    pi = ib // G  # peer of each (i, j)
    bb = ib % G  # group of each (i, j)
    cap = (upper / scale) * (1 + 1e-9) if upper else np.inf  # lam <= cap, so no x[i,b] exceeds it either
    A = np.array([min(netv[i], float(comp[i].max()), cap) for i in range(n)])
    zi = np.repeat(np.arange(n), m)  # peer of each z
    zk = np.concatenate([np.arange(1, mi + 1) for mi in m]).astype(np.float64)  # length of each z
    zc = np.concatenate(comp)  # c_i(k) of each z
    za = np.minimum(np.minimum(zc, netv[zi]), cap)  # min(n_i, c_i(k), cap) of each z

    rows, cols, vals, lo, hi = [], [], [], [], []
    r = 0

    def add(rr, cc, vv):
        rows.append(np.asarray(rr, dtype=np.int64))
        cols.append(np.asarray(cc, dtype=np.int64))
        vals.append(np.asarray(vv, dtype=np.float64))

    # 1. blocks: sum_i x[i,b] - lam = 0
    add(r + bb, o_x + ib, np.ones(NL))
    add(r + np.arange(G), np.zeros(G), -np.ones(G))
    lo.append(np.zeros(G)); hi.append(np.zeros(G)); r += G
    # 2. starts: h[i,b] - h[i,b-1] - t[i,b] <= 0 (relax: the same on the touched groups g)
    o_run = o_g if relax else o_h
    add(r + ib, o_run + ib, np.ones(NL))
    nb = bb > 0
    add(r + ib[nb], o_run + ib[nb] - 1, -np.ones(int(nb.sum())))
    add(r + ib, o_t + ib, -np.ones(NL))
    lo.append(np.full(NL, -np.inf)); hi.append(np.zeros(NL)); r += NL
    # 3. one start: sum_b t[i,b] <= 1
    add(r + pi, o_t + ib, np.ones(NL))
    lo.append(np.full(n, -np.inf)); hi.append(np.ones(n)); r += n
    # 4. length: sum_k k z[i,k] - sum_b h[i,b] = 0
    add(r + zi, o_z + np.arange(nz), zk)
    add(r + pi, o_h + ib, -w[bb])
    lo.append(np.zeros(n)); hi.append(np.zeros(n)); r += n
    # 5. one length: sum_k z[i,k] <= 1 (= 1 when rebalancing: every peer keeps a span)
    add(r + zi, o_z + np.arange(nz), np.ones(nz))
    lo.append(np.ones(n) if rebalance else np.zeros(n)); hi.append(np.ones(n)); r += n
    # 6. x[i,b] - A_i h[i,b] <= 0
    add(r + ib, o_x + ib, np.ones(NL))
    add(r + ib, o_h + ib, -A[pi])
    lo.append(np.full(NL, -np.inf)); hi.append(np.zeros(NL)); r += NL
    # 7. x[i,b] - sum_k min(n_i, c_i(k)) z[i,k] <= 0
    add(r + ib, o_x + ib, np.ones(NL))
    # for each (i, b): every z of peer i
    rep = m[pi]
    zrow = np.repeat(ib, rep)
    zcol = np.concatenate([z_first[i] + np.arange(m[i]) for i in pi])
    add(r + zrow, zcol, -za[zcol - o_z])
    lo.append(np.full(NL, -np.inf)); hi.append(np.zeros(NL)); r += NL
    # 8. entries: x[i,b] - x[i,b-1] - u[i,b] <= 0
    add(r + ib, o_x + ib, np.ones(NL))
    add(r + ib[nb], o_x + ib[nb] - 1, -np.ones(int(nb.sum())))
    add(r + ib, o_u + ib, -np.ones(NL))
    lo.append(np.full(NL, -np.inf)); hi.append(np.zeros(NL)); r += NL
    # 9. network: sum_b u[i,b] <= n_i
    add(r + pi, o_u + ib, np.ones(NL))
    lo.append(np.full(n, -np.inf)); hi.append(netv.copy()); r += n
    # 10. compute: sum_j w_j x[i,j] - sum_k c_i(k) z[i,k] <= 0
    add(r + pi, o_x + ib, w[bb])
    add(r + zi, o_z + np.arange(nz), -zc)
    lo.append(np.full(n, -np.inf)); hi.append(np.zeros(n)); r += n

    if relax:
        # F <= h <= g; at most two partly held groups (the ends); a group between two touched ones is full
        add(r + ib, o_h + ib, np.ones(NL)); add(r + ib, o_g + ib, -np.ones(NL))
        lo.append(np.full(NL, -np.inf)); hi.append(np.zeros(NL)); r += NL
        add(r + ib, o_F + ib, np.ones(NL)); add(r + ib, o_h + ib, -np.ones(NL))
        lo.append(np.full(NL, -np.inf)); hi.append(np.zeros(NL)); r += NL
        add(r + pi, o_g + ib, np.ones(NL)); add(r + pi, o_F + ib, -np.ones(NL))
        lo.append(np.full(n, -np.inf)); hi.append(np.full(n, 2.0)); r += n
        mid = (bb > 0) & (bb < G - 1)
        im = ib[mid]
        add(r + np.arange(len(im)), o_F + im, np.ones(len(im)))
        for d in (-1, 0, 1):
            add(r + np.arange(len(im)), o_g + im + d, -np.ones(len(im)))
        lo.append(np.full(len(im), -2.0)); hi.append(np.full(len(im), np.inf)); r += len(im)

    ref_scale = (upper / scale) if upper else float(A.sum())
    cost = np.zeros(nvar)
    cost[0] = -1.0
    ids = [p.peer_id for p in kept]
    if rebalance:
        h0 = np.zeros(NL)
        for i, pid in enumerate(ids):
            s, e = current[pid]
            a, b = np.searchsorted(bounds_, [max(s, 0), min(e, L)])
            if bounds_[a] != max(s, 0) or bounds_[b] != min(e, L):
                raise ValueError(f"span {current[pid]} of {pid} is not on the grid")
            h0[i * G + a: i * G + b] = 1.0
        # h0 = 1: h[i,b] + moved[i] >= 1; h0 = 0: h[i,b] - moved[i] <= 0
        one = h0 > 0.5
        add(r + ib, o_h + ib, np.ones(NL))
        add(r + ib, o_mv + pi, np.where(one, 1.0, -1.0))
        lo.append(np.where(one, 1.0, -np.inf)); hi.append(np.where(one, np.inf, 0.0)); r += NL
        add(np.full(n, r), o_mv + np.arange(n), np.ones(n))
        lo.append(np.array([-np.inf])); hi.append(np.array([float(max_moves)])); r += 1
        cost[o_mv:o_mv + n] = move_cost * ref_scale

    a = coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(r, nvar)).tocsr()
    lb = np.zeros(nvar)
    ub = np.full(nvar, np.inf)
    ub[o_h:o_h + NL] = 1.0
    ub[o_t:o_t + NL] = 1.0
    ub[o_x:o_x + NL] = A[pi]
    ub[o_u:o_u + NL] = netv[pi]
    ub[o_z:o_z + nz] = 1.0
    if relax:
        ub[o_g:o_g + 2 * NL] = 1.0
    if rebalance:
        ub[o_mv:o_mv + n] = 1.0
        if movable is not None:
            free = set(movable)
            ub[o_mv:o_mv + n] = [1.0 if pid in free else 0.0 for pid in ids]
    for i, pid in enumerate(ids):
        if limits and pid in limits:
            lo_b, hi_b, k_lo, k_hi = limits[pid]
            starts_, ends_ = bounds_[:-1], bounds_[1:]
            ub[o_h + i * G: o_h + (i + 1) * G] = np.where((starts_ >= lo_b) & (ends_ <= hi_b), 1.0, 0.0)
            lb[o_h + i * G: o_h + (i + 1) * G] = np.where((starts_ < k_hi) & (ends_ > k_lo), 1.0, 0.0)
    cut = lower / scale * (1 + 1e-7) if lower > 0 else 0.0
    lb[0] = cut
    ub[0] = upper / scale * (1 + 1e-9) if upper else float(A.sum())
    if ub[0] < lb[0]:  # the known bound already meets the known placement
        return MilpResult(max(lower, upper or 0.0) * (1 + _BOUND_SLACK), 0.0, None, 2, time.time() - t_start,
                          0.0)
    integrality = np.zeros(nvar)
    integrality[o_h:o_h + NL] = 0 if relax else 1
    integrality[o_z:o_z + nz] = 1
    if relax:
        integrality[o_g:o_g + 2 * NL] = 1
    if rebalance:
        integrality[o_mv:o_mv + n] = 1
    x0 = None
    if initial is not None and not relax and exact:
        check_placement(peers, model, initial)
        x0 = _start_vector(initial, kept, model, comp, netv, scale, L, o_h, o_t, o_x, o_u, z_first, nvar)
        if x0 is not None:
            lb[0] = 0.0
    res = _run(cost, integrality, lb, ub, a, np.concatenate(lo), np.concatenate(hi), time_limit, mip_rel_gap, x0)
    seconds = time.time() - t_start
    # bound on lam: the objective is -lam + move costs >= dual, so lam <= -dual + the most the move costs can add
    extra = move_cost * ref_scale * max_moves if rebalance else 0.0
    if res.status == 2:  # nothing serves more than the cutoff
        bound = lower
    else:
        dual = getattr(res, "mip_dual_bound", None)
        if dual is None or not np.isfinite(dual):
            bound = float("inf")
        else:
            bound = max(lower, (-float(dual) + extra) * scale)
    bound = min(bound, upper * (1 + 1e-9)) if upper else bound
    bound *= 1 + _BOUND_SLACK
    placement, value, moved = None, 0.0, ()
    if res.x is not None and res.status in (0, 1) and not relax:
        h = res.x[o_h:o_h + NL].reshape(n, G) > 0.5
        placement = {}
        for i, pid in enumerate(ids):
            held = np.flatnonzero(h[i])
            if len(held):
                placement[pid] = (int(bounds_[held[0]]), int(bounds_[held[-1] + 1]))
            elif rebalance:
                placement[pid] = current[pid]
        value = float(res.x[0]) * scale
        if rebalance:
            moved = tuple(pid for pid in ids if placement.get(pid) != tuple(current[pid]))
        if not placement or value <= 0:  # a trivial incumbent (no span, nothing served) is no placement
            placement, value, moved = None, 0.0, ()
    gap = float(getattr(res, "mip_gap", float("nan")) or float("nan"))
    if not exact and not relax:
        bound = float("inf")
    return MilpResult(bound, value, placement, int(res.status), seconds, gap, moved)


@dataclass
class _Res:
    """What :func:`_run` returns, named as scipy's ``milp`` result."""

    status: int
    x: Optional[np.ndarray]
    mip_dual_bound: float
    mip_gap: float


_quiet_highs = False


def _highs():
    """A silent ``highspy.Highs`` (its first construction in a process prints a banner on the C stdout, which is
    sent to /dev/null)."""
    global _quiet_highs
    import os
    import sys

    import highspy
    if not _quiet_highs:
        _quiet_highs = True
        sys.stdout.flush()
        saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, 1)
            h = highspy.Highs()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            os.close(null)
    else:
        h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    return h


def _run(cost, integrality, lb, ub, a, lo, hi, time_limit, mip_rel_gap, x0):
    """Solve with HiGHS: through highspy when there is a starting solution ``x0`` (an incumbent from the first node
    on, which HiGHS's improvement heuristics such as RINS start from; scipy's ``milp`` cannot pass one), else
    through scipy."""
    if x0 is None:
        from scipy.optimize import Bounds, LinearConstraint, milp
        return milp(cost, integrality=integrality, bounds=Bounds(lb, ub), constraints=LinearConstraint(a, lo, hi),
                    options=dict(time_limit=max(float(time_limit), 0.01), mip_rel_gap=mip_rel_gap, presolve=True))
    import highspy
    h = _highs()
    h.setOptionValue("time_limit", max(float(time_limit), 0.01))
    h.setOptionValue("mip_rel_gap", mip_rel_gap)
    h.setOptionValue("threads", 1)
    lp = highspy.HighsLp()
    csc = a.tocsc()
    lp.num_col_, lp.num_row_ = a.shape[1], a.shape[0]
    lp.col_cost_, lp.col_lower_, lp.col_upper_ = cost, lb, ub
    lp.row_lower_, lp.row_upper_ = lo, hi
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = csc.indptr, csc.indices, csc.data
    lp.integrality_ = [highspy.HighsVarType.kInteger if v else highspy.HighsVarType.kContinuous for v in integrality]
    h.passModel(lp)
    sol = highspy.HighsSolution()
    sol.col_value = list(x0)
    sol.value_valid = True
    h.setSolution(sol)
    h.run()
    st = h.getModelStatus()
    info = h.getInfo()
    x = np.asarray(h.getSolution().col_value) if info.primal_solution_status == 2 else None  # 2: feasible
    status = 0 if st == highspy.HighsModelStatus.kOptimal else 2 if st == highspy.HighsModelStatus.kInfeasible else 1
    return _Res(status, x, info.mip_dual_bound, info.mip_gap)


def _start_vector(pl, kept, model, comp, netv, scale, L, o_h, o_t, o_x, o_u, z_first, nvar):
    """The program's variables (layout of :func:`solve`, exact blocks) at placement ``pl`` (already through
    :func:`check_placement`) routed by its max flow (:func:`partitioner.flow.max_flow`): a starting incumbent. None
    if the placement serves nothing."""
    from .flow import max_flow, placed_peers
    sol = max_flow(placed_peers(kept, model, pl), L, hop_penalty=0.0)
    if sol.throughput <= 0:
        return None
    x0 = np.zeros(nvar)
    x0[0] = sol.throughput / scale
    for i, p in enumerate(kept):
        s, e = pl[p.peer_id]
        k = e - s
        x0[o_h + i * L + s: o_h + i * L + e] = 1.0
        x0[o_t + i * L + s] = 1.0
        x0[z_first[i] + k - 1] = 1.0
        load = sol.load.get(p.peer_id)
        if load is not None:
            xs = np.minimum(load / scale, min(netv[i], float(comp[i].max())))
            x0[o_x + i * L + s: o_x + i * L + e] = xs
            u = np.maximum(np.diff(np.concatenate(([0.0], xs))), 0.0)
            x0[o_u + i * L + s: o_u + i * L + e] = u
    return x0


def check_placement(peers: Sequence[PeerSpec], model: ModelSpec, placement: Placement) -> None:
    """Check that ``placement`` (``{peer_id: (start, end)}``) gives every peer that can hold a block a span of
    whole block indices ``0 <= start < end <= L`` that fits its memory (:func:`partitioner.cost.max_blocks`), and
    names no other peer.

    :raises ValueError: naming the first peer or span that does not
    """
    specs = {p.peer_id: p for p in peers}
    L = model.num_blocks
    for pid, span in placement.items():
        if pid not in specs:
            raise ValueError(f"peer {pid!r} of the placement is not among the peers")
        try:
            s, e = span
        except (TypeError, ValueError):
            raise ValueError(f"span {span!r} of peer {pid} is not a (start, end) pair") from None
        if (not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (s, e))
                or not 0 <= s < e <= L):
            raise ValueError(f"span {span!r} of peer {pid} is not whole blocks within [0, {L})")
        room = len(compute_curve(specs[pid], model))
        if e - s > room:
            raise ValueError(f"span {span!r} of peer {pid} holds {e - s} blocks; its memory holds {room}")
    for p in _peer_data(peers, model)[0]:
        if p.peer_id not in placement:
            raise ValueError(f"peer {p.peer_id} has no span in the placement")


def improve_placement(peers: Sequence[PeerSpec], model: ModelSpec, placement: Placement, *,
                      time_limit: float = 60.0, upper: Optional[float] = None, full_max_peers: int = 8,
                      neighborhood: int = 6, solve_time: float = 5.0, seed: int = 0) -> Tuple[Placement, MilpResult]:
    """A placement at least as good as ``placement`` under :func:`partitioner.flow.max_flow`, from at most
    ``time_limit`` s of the exact program of :func:`solve` started from it.

    * Up to ``full_max_peers`` peers: one solve of the whole program with ``placement`` as its first incumbent.
    * Larger swarms: a large-neighbourhood search (Shaw, "Using constraint programming and local search methods to
      solve vehicle routing problems", CP 1998; the MILP form is "fix and re-optimize"): repeatedly pick a block, a
      priced one (a bottleneck: positive dual of its row in the max flow) with probability 0.7, else any; let the
      ``neighborhood`` peers whose spans are nearest to it move and keep every other span fixed; solve that
      program (at most ``solve_time`` s, started from the current placement) and keep its placement if the max
      flow grows.

    Measured on ``sims.scale.swarmgen`` swarms (``make bench-partitioner``, 100 swarms per size, 60 s each, one
    core per swarm), as a fraction of :func:`partitioner.bound.upper_bound`, median (10th percentile): 8 peers
    0.947 (0.837) for the heuristic placement alone, 0.976 (0.872) after the whole-program solve; 20 peers 0.918
    (0.875) -> 0.939 (0.890) after the neighbourhood search. Started cold (no incumbent, cut off at the heuristic's
    value) the 8-peer program found nothing better within 30 s in 9 of 10 swarms, and the whole 20-peer program
    nothing within 60 s.

    :param placement: every peer's span, ``{peer_id: (start, end)}``
    :param upper: a known upper bound on the throughput, tokens/s (prunes; the search stops when it is reached)
    :returns: ``(placement, result)``: the better placement and a :class:`MilpResult` whose ``bound`` is a true
        upper bound on every placement after a whole-program solve, ``inf`` after a neighbourhood search
    :raises ValueError: the placement fails :func:`check_placement`, or ``upper`` is below what it serves
    """
    from .flow import evaluate_placement, max_flow, placed_peers

    t0 = time.time()
    check_placement(peers, model, placement)
    cur = {pid: (int(s), int(e)) for pid, (s, e) in placement.items()}
    kept, comp, _ = _peer_data(peers, model)
    L = model.num_blocks
    have = evaluate_placement(peers, model, cur)
    if upper is not None and upper < have * (1 - 1e-6):
        raise ValueError(f"upper={upper:g} tokens/s is below what the placement already serves ({have:g})")
    if sum(len(c) for c in comp) < L:  # no placement covers the model: nothing to search
        return cur, MilpResult(0.0, 0.0, None, 2, time.time() - t0)
    if len(kept) <= full_max_peers:
        res = solve(peers, model, time_limit=time_limit, upper=upper, initial=cur)
        if res.placement is not None:
            new = {pid: res.placement.get(pid, span) for pid, span in cur.items()}  # a peer left out keeps its span
            if evaluate_placement(peers, model, new) > have * (1 + 1e-9):
                return new, res
        return cur, res
    rng = np.random.default_rng(seed)
    ids = [p.peer_id for p in kept]
    sol = max_flow(placed_peers(peers, model, cur), L)  # the current placement's flow: its prices pick the blocks
    while time.time() - t0 < time_limit and (upper is None or have < upper * (1 - 1e-6)):
        price = sol.block_price if sol.block_price is not None else np.zeros(L)
        hot = np.flatnonzero(price > 1e-9)
        b = int(rng.choice(hot)) if len(hot) and rng.random() < 0.7 else int(rng.integers(L))
        dist = {pid: 0 if cur[pid][0] <= b < cur[pid][1] else min(abs(cur[pid][0] - b), abs(cur[pid][1] - 1 - b))
                for pid in ids}
        movers = sorted(ids, key=lambda pid: (dist[pid], rng.random()))[:neighborhood]
        left = time_limit - (time.time() - t0)
        res = solve(peers, model, time_limit=min(solve_time, max(left, 0.01)), upper=upper, current=cur,
                    max_moves=len(movers), movable=movers, initial=cur)
        if res.placement is not None:
            new = {pid: res.placement.get(pid, span) for pid, span in cur.items()}
            new_sol = max_flow(placed_peers(peers, model, new), L)
            if new_sol.throughput > have * (1 + 1e-6):
                cur, have, sol = new, new_sol.throughput, new_sol
    return cur, MilpResult(float("inf"), have, cur, 1, time.time() - t0)


def milp_bound(peers: Sequence[PeerSpec], model: ModelSpec, *, time_limit: float = 10.0, lower: float = 0.0,
               upper: Optional[float] = None) -> float:
    """Upper bound on the max-flow throughput (tokens/s) of every placement of ``peers``: the MILP's dual bound
    after at most ``time_limit`` s (see :func:`solve`)."""
    return solve(peers, model, time_limit=time_limit, lower=lower, upper=upper).bound


def best_placement(peers: Sequence[PeerSpec], model: ModelSpec, *, time_limit: float = 10.0, lower: float = 0.0,
                   upper: Optional[float] = None) -> MilpResult:
    """The MILP's best placement of ``peers`` found within ``time_limit`` s that serves more than ``lower``
    tokens/s (``placement`` None if none), with the bound (see :func:`solve`)."""
    return solve(peers, model, time_limit=time_limit, lower=lower, upper=upper)


def best_rebalance(peers: Sequence[PeerSpec], model: ModelSpec, current: Placement, max_moves: int, *,
                   time_limit: float = 10.0, lower: float = 0.0, upper: Optional[float] = None,
                   subset_limit: int = 12, safe: bool = True) -> MilpResult:
    """The best placement reachable from ``current`` by moving at most ``max_moves`` peers (each peer in
    ``peers`` must have a span in ``current``), found within ``time_limit`` s; ``bound`` bounds every such
    placement's throughput (tokens/s). Turning it into a safe sequence of moves is
    :func:`partitioner.rebalance.order_moves`' job.

    When there are at most ``subset_limit`` sets of ``max_moves`` movers (e.g. 6 peers, 1 move), one program per
    set is solved with the others fixed (each much smaller; the time limit is shared out) and ``bound`` is the
    largest of their bounds; otherwise one program with a binary ``moved`` per peer. With ``safe`` and a budget of
    one move, the mover must also be able to move without unserving a block (as
    :func:`partitioner.rebalance.order_moves` requires): if it alone serves some blocks of its span, its new span
    keeps them (from the first to the last) and the hull of old and new spans fits its memory; the result is then
    the best *safe* plan of one move, and ``bound`` bounds those."""
    import itertools
    import math

    kept = [p.peer_id for p in _peer_data(peers, model)[0]]
    k = min(max_moves, len(kept))
    if k <= 0 or math.comb(len(kept), k) > subset_limit:
        return solve(peers, model, time_limit=time_limit, lower=lower, upper=upper, current=current,
                     max_moves=max_moves)
    # few subsets of movers: one small program per subset of exactly k movers (smaller sets are inside them:
    # a mover may keep its span), each with the others fixed, the best value so far as the cutoff
    t0 = time.time()
    subsets = list(itertools.combinations(kept, k))
    best: Optional[MilpResult] = None
    bound, status = 0.0, 0
    L = model.num_blocks
    mem = {p.peer_id: len(compute_curve(p, model)) for p in peers}
    for j, sub in enumerate(subsets):
        left = time_limit - (time.time() - t0)
        limits = None
        if k == 1 and safe:  # a single move must be safe on its own (as partitioner.rebalance.order_moves has it)
            pid = sub[0]
            s0, e0 = current[pid]
            count = np.zeros(L + 1)
            for q in kept:
                if q != pid:
                    count[current[q][0]] += 1
                    count[current[q][1]] -= 1
            others = np.cumsum(count[:-1]) > 0
            alone = np.flatnonzero(~others[s0:e0]) + s0
            if len(alone):  # make before break: keep those blocks, and the hull of both spans fits its memory
                limits = {pid: (max(0, e0 - mem[pid]), min(L, s0 + mem[pid]), int(alone[0]), int(alone[-1]) + 1)}
        res = solve(peers, model, time_limit=max(left / (len(subsets) - j), 0.05), lower=lower, upper=upper,
                    current=current, max_moves=k, movable=sub, limits=limits)
        bound = max(bound, res.bound)
        if res.status not in (0, 2):
            status = res.status
        if res.placement and res.value > lower and (best is None or res.value > best.value):
            best, lower = res, res.value
    out = best if best is not None else MilpResult(bound, 0.0, None, 2, 0.0)
    out.bound, out.status, out.seconds = bound, status, time.time() - t0  # status 0: every subset solved
    return out


def grid_for(num_blocks: int, groups: int, keep: Sequence[int] = ()) -> np.ndarray:
    """Block boundaries for a restricted program (:func:`solve`'s ``grid``): about ``groups`` groups of nearly
    equal size, plus every boundary in ``keep`` (e.g. the ends of spans that must stay representable)."""
    even = np.round(np.linspace(0, num_blocks, max(1, min(groups, num_blocks)) + 1)).astype(np.int64)
    return np.unique(np.concatenate((even, np.asarray(list(keep), dtype=np.int64), [0, num_blocks])))


def grid_bound(peers: Sequence[PeerSpec], model: ModelSpec, groups: int = 12, *, time_limit: float = 10.0,
               lower: float = 0.0, upper: Optional[float] = None) -> MilpResult:
    """An upper bound from a smaller program: the blocks in about ``groups`` groups (:func:`grid_for`), each peer's
    span seen through the *fraction* ``h[i,j]`` of each group it holds, between binaries ``F[i,j] <= h[i,j] <=
    g[i,j]`` (fully held, touched): touched groups contiguous, at most two touched groups not full (the span's two
    ends), every group between two touched ones full. Rates are per-block averages over each group. Any
    placement maps to a feasible point (averaging a flow over a group keeps the block, compute and cap rows and
    never adds entries: the total variation of a sequence does not grow under block averaging), so the dual
    bound bounds every placement; it is looser than the exact program's by the ends' fractional holding, and
    much smaller (``2 N G`` binaries instead of ``N L``)."""
    L = model.num_blocks
    return solve(peers, model, time_limit=time_limit, lower=lower, upper=upper, grid=grid_for(L, groups),
                 relax=True)
