"""The evaluator: the most tokens/s a placement of spans can serve when requests are routed as well as possible.

Formulation (a max-flow with per-peer time-sharing, after Helix: Mei et al., "Helix: Serving Large Language Models
over Heterogeneous GPUs and Network via Max-Flow", ASPLOS 2025). Tokens flow from block boundary 0 to boundary
``L``. Peer ``i`` holds blocks ``[s_i, e_i)``; a token may enter its span before any block ``a`` and leave after any
block (paying one hop each time). Variables, for each peer ``i`` and block ``b`` of its span:

* ``x[i,b]`` [tokens/s]  tokens peer ``i`` runs through block ``b``
* ``u[i,b]`` [tokens/s]  tokens entering peer ``i`` just before block ``b`` (``b > s_i``; at ``s_i`` it is ``x[i,s_i]``)

    maximize   lam
    subject to sum_i x[i,b] = lam                      for every block b        (every token runs every block once)
               x[i,b] - x[i,b-1] - u[i,b] <= 0         for s_i < b < e_i        (tokens leaving after b-1 are >= 0)
               sum_b x[i,b] <= c_i                      for every peer           (compute, block-tokens/s)
               x[i,s_i] + sum_b u[i,b] <= n_i           for every peer           (network: tokens entering the span)
               x, u >= 0

Flow conservation at each boundary is implied by the equal per-block totals. ``c_i`` and ``n_i`` come from
:mod:`partitioner.cost`. It is a linear program (HiGHS through ``scipy.optimize.linprog``) with about two variables
per (peer, block). A small penalty on entries picks, among optimal flows, one with few hops.

:func:`decompose` splits the flow into chains with rates (a standard path decomposition), which
:class:`partitioner.route.FlowRouter` samples from; :func:`served_throughput` gives the tokens/s any random routing
policy sustains (the load of its bottleneck peer), so every system is measured the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .route import Hop

if TYPE_CHECKING:
    from .cost import ModelSpec, PeerSpec


@dataclass(frozen=True)
class PlacedPeer:
    """A peer as the evaluator sees it.

    :param peer_id: the peer's id
    :param start: first block of its span
    :param end: one past the last block of its span
    :param compute_tps: ``c``, block-tokens/s it can compute over its span (see :func:`partitioner.cost.compute_tps`)
    :param network_tps: ``n``, tokens/s that can enter its span (see :func:`partitioner.cost.network_tps`)
    """

    peer_id: str
    start: int
    end: int
    compute_tps: float
    network_tps: float

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass
class FlowSolution:
    """An optimal flow: ``throughput`` tokens/s through all blocks, and per peer the tokens/s it runs through each
    block of its span (``load[peer_id][j]`` for block ``start + j``) and the tokens/s entering before each block."""

    throughput: float
    num_blocks: int
    peers: List[PlacedPeer]
    load: Dict[str, np.ndarray] = field(default_factory=dict)
    entries: Dict[str, np.ndarray] = field(default_factory=dict)
    block_price: Optional[np.ndarray] = None  # dual of the per-block constraints: where capacity is scarce

    def exits(self, peer_id: str) -> np.ndarray:
        """Tokens/s leaving the peer after each block of its span (index j: after block start + j)."""
        x, u = self.load[peer_id], self.entries[peer_id]
        out = np.empty_like(x)
        out[:-1] = x[:-1] + u[1:] - x[1:]
        out[-1] = x[-1]
        return np.maximum(out, 0.0)


def uncovered_blocks(spans: Sequence[Tuple[int, int]], num_blocks: int) -> List[int]:
    """Blocks in ``[0, num_blocks)`` that no span ``(start, end)`` holds."""
    diff = np.zeros(num_blocks + 1, dtype=np.int64)
    for s, e in spans:
        s, e = max(s, 0), min(e, num_blocks)
        if s < e:
            diff[s] += 1
            diff[e] -= 1
    return [int(b) for b in np.flatnonzero(np.cumsum(diff[:-1]) == 0)]


def max_flow(peers: Sequence[PlacedPeer], num_blocks: int, *, hop_penalty: float = 1e-6) -> FlowSolution:
    """Solve the linear program in the module docstring.

    :param peers: the placement (spans with their compute and network capacity)
    :param num_blocks: blocks in the model ``L``
    :param hop_penalty: weight of total entries (hops) in the objective, relative to throughput
    :returns: the optimal :class:`FlowSolution` (throughput 0 if a block is unserved)
    """
    from scipy.optimize import linprog
    from scipy.sparse import csr_matrix

    peers = [p for p in peers if p.end > p.start and p.compute_tps > 0 and p.network_tps > 0]
    peers = [PlacedPeer(p.peer_id, max(p.start, 0), min(p.end, num_blocks), p.compute_tps, p.network_tps)
             for p in peers]
    peers = [p for p in peers if p.end > p.start]
    empty = FlowSolution(0.0, num_blocks, list(peers),
                         {p.peer_id: np.zeros(p.length) for p in peers}, {p.peer_id: np.zeros(p.length) for p in peers})
    if not peers or uncovered_blocks([(p.start, p.end) for p in peers], num_blocks):
        return empty

    n = len(peers)
    starts = np.array([p.start for p in peers], dtype=np.int64)
    lengths = np.array([p.length for p in peers], dtype=np.int64)
    scale = max(max(p.compute_tps for p in peers), 1e-12)
    comp = np.array([p.compute_tps for p in peers]) / scale
    net = np.array([p.network_tps for p in peers]) / scale

    # variable layout: [lam] + x for every (peer, block) + u for every (peer, block except the first)
    nx = int(lengths.sum())
    peer_of_x = np.repeat(np.arange(n), lengths)
    x_first = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    offset_in_span = np.arange(nx) - np.repeat(x_first, lengths)
    block_of_x = np.repeat(starts, lengths) + offset_in_span
    x_col = 1 + np.arange(nx)
    has_u = offset_in_span > 0  # x entries that have an entry variable u (not the first block of a span)
    nu = int(has_u.sum())
    u_col = np.full(nx, -1, dtype=np.int64)
    u_col[has_u] = 1 + nx + np.arange(nu)
    nvar = 1 + nx + nu

    # equality rows: sum_i x[i,b] - lam = 0
    eq_rows = np.concatenate((block_of_x, np.arange(num_blocks)))
    eq_cols = np.concatenate((x_col, np.zeros(num_blocks, dtype=np.int64)))
    eq_vals = np.concatenate((np.ones(nx), -np.ones(num_blocks)))
    a_eq = csr_matrix((eq_vals, (eq_rows, eq_cols)), shape=(num_blocks, nvar))

    # inequality rows: exits >= 0 (nu rows), compute (n rows), network (n rows)
    idx = np.flatnonzero(has_u)
    r_exit = np.arange(nu)
    rows = [r_exit, r_exit, r_exit]
    cols = [x_col[idx], x_col[idx - 1], u_col[idx]]
    vals = [np.ones(nu), -np.ones(nu), -np.ones(nu)]
    rows.append(nu + peer_of_x)
    cols.append(x_col)
    vals.append(np.ones(nx))
    first = ~has_u
    rows.append(nu + n + peer_of_x[first])
    cols.append(x_col[first])
    vals.append(np.ones(int(first.sum())))
    rows.append(nu + n + peer_of_x[idx])
    cols.append(u_col[idx])
    vals.append(np.ones(nu))
    a_ub = csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(nu + 2 * n, nvar))
    b_ub = np.concatenate((np.zeros(nu), comp, net))

    cost = np.zeros(nvar)
    cost[0] = -1.0
    cost[x_col[first]] = hop_penalty
    cost[1 + nx:] = hop_penalty
    # dual simplex is quickest on small programs, interior point on large ones (measured: 1,000 peers 0.9 s vs 3.5 s)
    method = "highs-ipm" if nvar > 4000 else "highs"
    res = linprog(cost, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=np.zeros(num_blocks), bounds=(0, None), method=method)
    if res.status != 0 or res.x is None:
        return empty
    sol = np.maximum(res.x, 0.0)
    xs = sol[x_col] * scale
    us = np.zeros(nx)
    us[has_u] = sol[u_col[has_u]] * scale
    us[first] = xs[first]
    load, entries = {}, {}
    for i, p in enumerate(peers):
        a, b = x_first[i], x_first[i] + lengths[i]
        load[p.peer_id] = xs[a:b]
        entries[p.peer_id] = us[a:b]
    price = None
    marg = getattr(getattr(res, "eqlin", None), "marginals", None)
    if marg is not None:
        price = np.abs(np.asarray(marg))
    return FlowSolution(float(sol[0] * scale), num_blocks, peers, load, entries, price)


def decompose(solution: FlowSolution, *, tolerance: float = 1e-9) -> List[Tuple[float, List[Hop]]]:
    """Split a flow into chains with rates (tokens/s) that add up to it (path decomposition of a DAG flow).

    Inside peer ``i`` the flow has four kinds of edges: entry before block ``j`` (``u``), running block ``j``
    (``x``), staying on the peer for block ``j+1`` (``x[j+1] - u[j+1]``) and exit after block ``j``. Walking from
    boundary 0, a chain enters the first peer with entry flow left, stays on it while it can (fewer hops) and leaves
    when it must; it carries the smallest flow left on its path, which is then
    subtracted. Each chain empties at least one edge, so there are at most as many chains as edges.

    The LP's solution balances only within the solver's tolerance: entries are first capped at what the peer runs
    through that block (``u <= x``), and a walk that still dead-ends (flow a few tolerances out of balance) drops
    that residue along its path and the next walk starts, instead of leaving the rest of the flow unrouted.

    :returns: ``(rate, hops)`` pairs, rates in tokens/s, largest first
    """
    L = solution.num_blocks
    if solution.throughput <= 0:
        return []
    eps = tolerance * max(solution.throughput, 1e-12)
    by_id = {p.peer_id: p for p in solution.peers}
    x = {pid: v.copy() for pid, v in solution.load.items()}
    # no more tokens enter before a block than run it: the LP allows it only within the solver's tolerance (a
    # residual entry on a block the peer does not run would otherwise start a chain that dead-ends there)
    u = {pid: np.minimum(v, x[pid]) for pid, v in solution.entries.items()}
    stay = {pid: np.maximum(np.concatenate(([0.0], x[pid][1:] - u[pid][1:])), 0.0) for pid in x}
    out = {pid: np.maximum(x[pid] - np.concatenate((stay[pid][1:], [0.0])), 0.0) for pid in x}
    enter_at: List[List[str]] = [[] for _ in range(L)]
    for pid, p in by_id.items():
        for j in range(p.length):
            if u[pid][j] > eps:
                enter_at[p.start + j].append(pid)
    ptr = [0] * L
    remaining = solution.throughput
    chains: List[Tuple[float, List[Hop]]] = []
    max_paths = 4 * sum(p.length for p in solution.peers) + 10
    walks = 0
    while remaining > eps and walks < max_paths:
        walks += 1
        b, hops, rate, path = 0, [], remaining, []
        while b < L:
            lst = enter_at[b]
            while ptr[b] < len(lst) and u[lst[ptr[b]]][b - by_id[lst[ptr[b]]].start] <= eps:
                ptr[b] += 1
            if ptr[b] >= len(lst):
                break
            pid = lst[ptr[b]]
            p = by_id[pid]
            j = b - p.start
            a = b
            if x[pid][j] <= eps:  # solver residue: an entry on a block the peer no longer runs
                u[pid][j] = 0.0
                continue
            rate = min(rate, u[pid][j], x[pid][j])
            path += [(u[pid], j), (x[pid], j)]
            while j + 1 < p.length and stay[pid][j + 1] > eps:
                j += 1
                rate = min(rate, stay[pid][j], x[pid][j])
                path += [(stay[pid], j), (x[pid], j)]
            if j + 1 < p.length:
                rate = min(rate, out[pid][j])
                path.append((out[pid], j))
            b = p.start + j + 1
            hops.append(Hop(pid, a, b))
        if b < L or rate <= eps:
            # a dead end: flow the solver's tolerance left unbalanced (a few eps). Drop it along the walk (its
            # smallest edge empties, so the walks end) rather than give up on the rest of the flow
            for arr, j in path:
                arr[j] = 0.0 if arr[j] <= max(rate, eps) else arr[j] - rate
            continue
        for arr, j in path:
            arr[j] -= rate
        remaining -= rate
        chains.append((rate, hops))
    return _merge(chains)


def _merge(chains: List[Tuple[float, List[Hop]]]) -> List[Tuple[float, List[Hop]]]:
    merged: Dict[Tuple[Hop, ...], float] = {}
    for rate, hops in chains:
        key = tuple(hops)
        merged[key] = merged.get(key, 0.0) + rate
    return sorted(((r, list(h)) for h, r in merged.items()), key=lambda t: -t[0])


@dataclass
class Usage:
    """What one token routed by a policy costs each peer, on average: ``blocks[peer]`` block-runs and
    ``entries[peer]`` hops into its span (per token through all blocks)."""

    blocks: Dict[str, float] = field(default_factory=dict)
    entries: Dict[str, float] = field(default_factory=dict)

    def add(self, peer_id: str, blocks: float, entries: float) -> None:
        self.blocks[peer_id] = self.blocks.get(peer_id, 0.0) + blocks
        self.entries[peer_id] = self.entries.get(peer_id, 0.0) + entries


def usage_of_chains(chains: Sequence[Tuple[float, Sequence[Hop]]]) -> Usage:
    """Per-token usage of a routing policy that picks chain ``hops`` with probability proportional to ``rate``."""
    total = sum(r for r, _ in chains)
    use = Usage()
    if total <= 0:
        return use
    for rate, hops in chains:
        for h in hops:
            use.add(h.peer_id, rate / total * (h.end - h.start), rate / total)
    return use


def served_throughput(peers: Sequence[PlacedPeer], usage: Usage) -> float:
    """Tokens/s a random routing policy with this per-token ``usage`` sustains: the arrival rate at which its
    busiest peer saturates, ``min_i min(c_i / blocks_i, n_i / entries_i)`` (0 if it uses an unknown peer)."""
    by_id = {p.peer_id: p for p in peers}
    best = float("inf")
    for pid, blocks in usage.blocks.items():
        p = by_id.get(pid)
        if p is None:
            return 0.0
        if blocks > 0:
            best = min(best, p.compute_tps / blocks)
        ent = usage.entries.get(pid, 0.0)
        if ent > 0:
            best = min(best, p.network_tps / ent)
    return 0.0 if best == float("inf") else best


def placed_peers(peers: Sequence["PeerSpec"], model: "ModelSpec", placement: Dict[str, Tuple[int, int]]
                 ) -> List[PlacedPeer]:
    """The evaluator's view of a placement: each placed peer with ``c(k)`` and ``n`` from :mod:`partitioner.cost`."""
    from .cost import compute_tps, network_tps

    out = []
    for p in peers:
        if p.peer_id in placement:
            s, e = placement[p.peer_id]
            out.append(PlacedPeer(p.peer_id, s, e, compute_tps(p, model, e - s), network_tps(p, model)))
    return out


def evaluate_placement(peers: Sequence["PeerSpec"], model: "ModelSpec", placement: Dict[str, Tuple[int, int]]
                       ) -> float:
    """Max-flow throughput (tokens/s) of a placement with optimal routing: :func:`max_flow` on :func:`placed_peers`."""
    return max_flow(placed_peers(peers, model, placement), model.num_blocks).throughput


def proportional_usage(peers: Sequence[PlacedPeer], num_blocks: int) -> Usage:
    """Per-token usage of the even-spread routing: at each block ``b`` a token is run by peer ``i`` with
    probability ``h_i / S(b)``, where ``h_i = min(c_i / k_i, n_i)`` is the peer's even share over its ``k_i``
    blocks and ``S(b)`` the sum over the peers holding ``b``; it enters a peer where that probability rises
    (``p_i(s_i) + sum_b max(0, p_i(b) - p_i(b-1))`` entries per token).

    A routing any client can follow, computed in ``O(sum of span lengths)``; its :func:`served_throughput` is a
    lower bound on :func:`max_flow` that gets close when the supply profile is flat (large swarms).
    Empty if a block is unserved.
    """
    L = num_blocks
    h = np.array([min(p.compute_tps / max(p.length, 1), p.network_tps) for p in peers])
    diff = np.zeros(L + 1)
    for p, hi in zip(peers, h):
        diff[p.start] += hi
        diff[p.end] -= hi
    supply = np.cumsum(diff[:-1])
    if L == 0 or (supply <= 0).any():
        return Usage()
    inv = 1.0 / supply
    use = Usage()
    for p, hi in zip(peers, h):
        frac = hi * inv[p.start:p.end]
        entries = frac[0] + float(np.maximum(np.diff(frac), 0).sum())
        use.add(p.peer_id, float(frac.sum()), entries)
    return use
