"""Live placement and rebalancing: a peer's adapter from the swarm's signed DHT records to the partitioner.

Joining: a peer placed automatically (``--num-blocks N``) turns the records it reads into the partitioner's
:class:`~partitioner.cost.PeerSpec` / :class:`~partitioner.cost.ModelSpec` and takes the span
:func:`partitioner.placement.choose_span_for` gives it (start and length, at most ``N`` blocks). Where some online
peer announces no throughput yet, it falls back to the Petals rule (:func:`partitioner.placement.choose_span`).

Rebalancing: every ``rebalance_period`` seconds (x 0.5..1.5 jitter) each balancing peer (``--num-blocks``, or
``--blocks S:E --balance``) builds the same view of the swarm from the records and runs
:func:`partitioner.rebalance.plan_rebalance` over it. Only the first move of the plan whose peer is balancing is
considered, and only by that peer; it runs only if

* :func:`partitioner.rebalance.check_plan` finds no block it would leave unserved,
* it fills a block nobody serves, or it raises the estimated throughput (the max flow of the placement,
  :func:`partitioner.flow.evaluate_placement`) by at least ``min_gain`` (hysteresis), and
* no other peer is moving or joining: the mover first announces ``moving`` in its record, waits ``settle`` seconds,
  reads the records again and backs off if any other peer announced a move meanwhile (both may back off; neither
  proceeds while it sees the other), then re-plans and moves only if the plan still says so.

The move itself (:meth:`peer.server.Peer.move`) is make before break: the new span loads on a loader thread while
the old one keeps serving; the peer announces the new span (new sessions go there), still accepts sessions opened
on the old span for a short grace (clients that read the record just before the move), and drops the old blocks
once the sessions open on them have ended (or after the session timeout). Then it clears ``moving``.

Cost model used for live peers: a peer runs one session's step at a time (no batching across sessions), so it
is modelled with ``max_batch = 1``: a peer holding ``k`` blocks adds ``decode_sps / k`` steps/s to each (its work
``w(k) = decode_sps`` block-steps/s), and its memory is set so that :func:`partitioner.cost.max_blocks` is the
number of blocks it announced it can hold (``max_blocks`` in its record; its span length if absent).
"""

from __future__ import annotations

import asyncio
import logging
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

from partitioner.cost import ModelSpec, PeerSpec, work_tps
from partitioner.rebalance import Move, RebalancePlan, check_plan, plan_rebalance, unserved_blocks
from protocols.records import PeerRecord

logger = logging.getLogger("peer.rebalancer")

DEFAULT_BANDWIDTH = 1e8  # bytes/s each way, for a peer that has not measured its links yet
DEFAULT_RTT = 0.05  # s
MAX_EVALUATED_PEERS = 32  # plan with the max-flow evaluator up to this many peers, with the supply profile above


# ------------------------------------------------------------------------------------------------ specs
def model_spec_from_config(config, num_blocks: int, dtype_bytes: int, context_tokens: int = 2048) -> ModelSpec:
    """The cost model's view of a model from its ``transformers`` config (sizes estimated from the shapes;
    for live peers they only scale memory, see the module docstring)."""
    h = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or h // heads)
    inter = int(getattr(config, "intermediate_size", 4 * h))
    block_params = h * heads * head_dim * 2 + h * kv * head_dim * 2 + 3 * h * inter + 2 * h
    return ModelSpec(num_blocks=num_blocks, block_bytes=float(block_params * dtype_bytes),
                     hidden_bytes=float(h * dtype_bytes), cache_bytes_per_token=float(2 * kv * head_dim * dtype_bytes),
                     context_tokens=context_tokens)


def capacity(record: PeerRecord) -> int:
    """Most blocks the peer can hold: its announced ``max_blocks``, at least its span."""
    return max(int(record.max_blocks or 0), record.end - record.start)


def peer_spec(record: PeerRecord, model: ModelSpec) -> Optional[PeerSpec]:
    """The partitioner's view of a peer from its record; None if it announces no throughput (yet)."""
    if record.decode_sps <= 0:
        return None
    links = [v for v in record.network.values() if len(v) == 2]
    bws = [float(b) for _, b in links if b > 0]
    rtts = [float(r) for r, _ in links if r > 0]
    per_block = model.block_bytes + model.session_bytes()
    return PeerSpec(
        peer_id=record.peer_id, block_tps=max(record.forward_tps, record.decode_sps), decode_sps=record.decode_sps,
        memory_bytes=capacity(record) * per_block, bandwidth=statistics.median(bws) if bws else DEFAULT_BANDWIDTH,
        rtt=statistics.median(rtts) if rtts else DEFAULT_RTT, max_batch=1,
    )


@dataclass
class SwarmView:
    """The swarm as the partitioner sees it, from the fresh records of one model."""

    model: ModelSpec
    specs: List[PeerSpec] = field(default_factory=list)
    placement: Dict[str, Tuple[int, int]] = field(default_factory=dict)
    movable: Set[str] = field(default_factory=set)  # peers that balance themselves
    moving: Dict[str, float] = field(default_factory=dict)  # peer id -> when its move began
    joining: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)  # online peers that announce no throughput

    @property
    def complete(self) -> bool:
        """True when every online peer announces the figures the partitioner needs."""
        return not self.missing

    def signature(self) -> tuple:
        """What a plan depends on: equal signatures give equal plans."""
        return tuple(sorted((p.peer_id, self.placement[p.peer_id], p.peer_id in self.movable, round(p.decode_sps, 3),
                             round(p.block_tps, 1), p.memory_bytes, round(p.bandwidth, -3)) for p in self.specs))


def swarm_view(records: Sequence[PeerRecord], model: ModelSpec, *, now: Optional[float] = None,
               max_age: float = 15.0) -> SwarmView:
    """Build a :class:`SwarmView` from verified records; records older than ``max_age`` seconds are ignored."""
    now = time.time() if now is None else now
    view = SwarmView(model)
    for r in sorted(records, key=lambda r: r.peer_id):  # one order for every peer: equal views, equal plans
        if now - r.timestamp > max_age or r.state == "offline" or r.start >= model.num_blocks:
            continue
        if r.state == "joining":
            view.joining.append(r.peer_id)
            continue
        if r.moving > 0:
            view.moving[r.peer_id] = r.moving
        spec = peer_spec(r, model)
        if spec is None:
            view.missing.append(r.peer_id)
            continue
        view.specs.append(spec)
        view.placement[r.peer_id] = (r.start, min(r.end, model.num_blocks))
        if r.balancing:
            view.movable.add(r.peer_id)
    return view


def estimate(view: SwarmView, placement: Dict[str, Tuple[int, int]]) -> float:
    """Estimated throughput of ``placement`` [tokens/s through all blocks]: the max flow with ideal routing (the
    weakest block's supply under even spreading for large swarms); 0 when a block is unserved."""
    from partitioner.flow import evaluate_placement
    from partitioner.placement import profile_score

    if unserved_blocks(placement, view.model.num_blocks):
        return 0.0
    if len(view.specs) <= MAX_EVALUATED_PEERS:
        return float(evaluate_placement(view.specs, view.model, placement))
    per_block = {p.peer_id: work_tps(p, view.model, e - s) / (e - s)
                 for p in view.specs for s, e in [placement[p.peer_id]]}
    return profile_score(placement, per_block, view.model.num_blocks)


# ------------------------------------------------------------------------------------------------ decisions
@dataclass
class Decision:
    """One peer's move, with the estimated throughput before and after it (tokens/s)."""

    peer_id: str
    old: Tuple[int, int]
    new: Tuple[int, int]
    before: float
    after: float
    fills: bool  # it serves a block nobody serves
    plan: List[Move] = field(default_factory=list)

    def describe(self) -> str:
        what = "fills a gap" if self.fills else f"estimated {self.before:.1f} -> {self.after:.1f} tokens/s"
        return f"plan moves {self.peer_id[-6:]} {self.old[0]}:{self.old[1]} -> {self.new[0]}:{self.new[1]} ({what})"


def decide(view: SwarmView, *, min_gain: float = 0.1) -> Tuple[Optional[Decision], str]:
    """The next move of the swarm, or None and why not (see the module docstring).

    :param min_gain: hysteresis: a move must raise the estimated throughput by this fraction (unless it fills a gap);
        also passed to :func:`plan_rebalance`
    """
    if not view.specs:
        return None, "no peers with figures"
    L = view.model.num_blocks
    evaluate = None
    if len(view.specs) <= MAX_EVALUATED_PEERS:
        from partitioner.flow import evaluate_placement

        def evaluate(pl):
            return float(evaluate_placement(view.specs, view.model, pl))
    plan = plan_rebalance(view.specs, view.model, view.placement, min_gain=min_gain, evaluate=evaluate)
    move = next((m for m in plan.moves if m.peer_id in view.movable), None)
    gaps = set(unserved_blocks(view.placement, L))
    if gaps and (move is None or not gaps.intersection(range(*move.new))):
        heal = heal_move(view, gaps)  # the plan fills no gap (see heal_move): fill one anyway
        if heal is not None:
            move = heal
    if move is None:
        return None, "the plan moves no balancing peer" if plan.moves else "the plan moves nobody"
    single = RebalancePlan(moves=[move])
    unsafe = check_plan(view.placement, single, L)
    if unsafe:
        return None, f"moving {move.peer_id[-6:]} alone would leave blocks {unsafe} unserved"
    fills = any(b in gaps for b in range(*move.new))
    before = estimate(view, view.placement)
    after = estimate(view, single.apply(view.placement))
    decision = Decision(move.peer_id, move.old, move.new, before, after, fills, list(plan.moves))
    if not fills and after < before * (1 + min_gain) + 1e-9:
        return None, f"{decision.describe()}: below the {100 * min_gain:.0f}% hysteresis"
    return decision, decision.describe()


def heal_move(view: SwarmView, gaps: Set[int]) -> Optional[Move]:
    """A move that serves blocks nobody serves, for when the plan has none.

    :func:`plan_rebalance` lets a peer that alone serves some blocks move only if the hull of its old and new spans
    fits its memory (it assumes the peer holds both while it moves). A live peer here always holds both spans
    for the length of a move (make before break), so a peer with no spare memory would otherwise never fill a gap
    next to its own lonely blocks (say it alone serves block 2 and block 3 has no peer). This picks the balancing
    peer and window of its current length that cover the most unserved blocks and every block only it serves
    (fewest lonely blocks first, then peer id; ties go to the weakest window, as in Petals).
    """
    L = view.model.num_blocks
    count = [0] * L
    supply = [0.0] * L
    for p in view.specs:
        s, e = view.placement[p.peer_id]
        for b in range(s, e):
            count[b] += 1
            supply[b] += work_tps(p, view.model, e - s) / (e - s)
    options = []
    for pid in sorted(view.movable):
        if pid not in view.placement:
            continue
        s0, e0 = view.placement[pid]
        k = e0 - s0
        lonely = [b for b in range(s0, e0) if count[b] == 1]
        for s in range(0, L - k + 1):
            if (s, s + k) == (s0, e0) or not all(s <= b < s + k for b in lonely):
                continue
            filled = sum(1 for b in range(s, s + k) if b in gaps)
            if filled:
                options.append((-filled, len(lonely), sorted(supply[s:s + k]), pid, s, k))
    if not options:
        return None
    _, _, _, pid, s, k = min(options)
    s0, e0 = view.placement[pid]
    return Move(pid, (s0, e0), (s, s + k), via=(min(s0, s), max(e0, s + k)))  # it serves the old span meanwhile


def join_span(me: Optional[PeerSpec], model: ModelSpec, others: Sequence[PeerRecord], max_blocks: int, *,
              now: Optional[float] = None, max_age: float = 15.0) -> Tuple[Tuple[int, int], str]:
    """The span a joining peer takes: :func:`choose_span_for` from the others' figures, or the Petals rule
    (:func:`choose_span` with ``max_blocks`` blocks) where figures are missing. Returns the span and the rule used."""
    from partitioner.placement import choose_span, choose_span_for

    L = model.num_blocks
    n = min(max_blocks, L)
    view = swarm_view(others, model, now=now, max_age=max_age)
    if me is not None and view.complete:
        spans = []
        for p in view.specs:
            s, e = view.placement[p.peer_id]
            spans.append((s, e, work_tps(p, model, e - s) / (e - s)))
        try:
            s, e = choose_span_for(me, model, spans)
            if 0 <= s < e <= L and e - s <= n:
                return (s, e), "choose_span_for"
        except ValueError as e:
            logger.warning("capability-aware placement failed (%s); using the Petals rule", e)
    online = [r for r in others if r.state == "online" and (now or time.time()) - r.timestamp <= max_age]
    start = choose_span(L, n, [(r.start, r.end, r.decode_sps) for r in online])
    return (start, start + n), "choose_span (Petals rule)"


# ------------------------------------------------------------------------------------------------ the loop
class Rebalancer:
    """Runs :func:`decide` periodically for one peer and moves it when the plan says so (module docstring).

    ``peer`` provides: ``peer_id`` (base58 str via ``peer_id_str``), ``fetch_records()``, ``record()``,
    ``model_spec()``, ``announce()``, ``moving_since`` (float), ``move(start, end, reason, check)`` and, for
    swarms without figures, ``heal_gaps()``.
    """

    def __init__(self, peer, *, period: float = 3.0, min_gain: float = 0.1, settle: float = 1.0,
                 record_ttl: float = 10.0, stale_move: float = 330.0, delay: float = 0.0, decide_fn=None):
        self.peer, self.period, self.min_gain, self.settle = peer, period, min_gain, settle
        self.decide = decide_fn or (lambda view: decide(view, min_gain=self.min_gain))
        self.max_age = 1.5 * record_ttl
        self.stale_move = stale_move  # a "moving" flag older than this is ignored (a peer stuck mid-move)
        self._last_signature = None
        self.delay = delay  # seconds before the first check
        self.moves = 0
        self.last: str = ""

    async def run(self) -> None:
        await asyncio.sleep(self.delay)
        while True:
            await asyncio.sleep(self.period * (0.5 + random.random()))
            try:
                self.last = await self.tick()
                logger.debug("rebalancing: %s", self.last)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                logger.warning("rebalancing check failed: %s", e)

    async def _view(self) -> SwarmView:
        me = self.peer.peer_id_str
        records = [r for r in await self.peer.fetch_records() if r.peer_id != me]
        records.append(self.peer.record())  # its own live state, not the last one stored
        return swarm_view(records, self.peer.model_spec(), max_age=self.max_age)

    def _others_busy(self, view: SwarmView) -> Optional[str]:
        now = time.time()
        me = self.peer.peer_id_str
        moving = [pid for pid, t in view.moving.items() if pid != me and now - t < self.stale_move]
        if moving:
            return f"peer {moving[0][-6:]} is moving"
        joining = [pid for pid in view.joining if pid != me]
        if joining:
            return f"peer {joining[0][-6:]} is joining"
        return None

    async def tick(self) -> str:
        """One check; returns what happened (for logs and tests)."""
        me = self.peer.peer_id_str
        view = await self._view()
        busy = self._others_busy(view)
        if busy:
            return "wait: " + busy
        if not view.complete:  # some peer announces no figures: the Petals gap healing only
            await self.peer.heal_gaps()
            return f"fallback: peers {[p[-6:] for p in view.missing]} announce no figures"
        signature = view.signature()
        if signature == self._last_signature:
            return "unchanged"
        decision, why = self.decide(view)
        if decision is None or decision.peer_id != me:
            self._last_signature = signature  # the same records give the same plan: skip until they change
            return why if decision is None else f"wait: {why}"
        # claim the move: announce it, give concurrent claims time to show, then check again
        self.peer.moving_since = time.time()
        try:
            await self.peer.announce()
            await asyncio.sleep(self.settle * (1 + 0.2 * random.random()))
            view = await self._view()
            busy = self._others_busy(view)
            if busy:
                return "backed off: " + busy
            again, why = self.decide(view)
            if again is None or again.peer_id != me or again.new != decision.new:
                return "plan changed: " + why
            logger.debug("rebalancing: %s", again.describe())  # the move's own line (Peer.move) gives the reason
            old = (again.old[0], again.old[1])

            async def still_safe() -> Optional[str]:
                return await self._switch_check(old, again.new)

            moved = await self.peer.move(again.new[0], again.new[1], reason=again.describe(), check=still_safe)
            if moved:
                self.moves += 1
            self._last_signature = None
            return ("moved: " if moved else "called off: ") + again.describe()
        finally:
            self.peer.moving_since = 0.0
            try:
                await self.peer.announce()
            except Exception as e:
                logger.warning("could not announce the end of a move: %s", e)

    async def _switch_check(self, old: Tuple[int, int], new: Tuple[int, int]) -> Optional[str]:
        """Just before switching spans: every block of ``old`` that ``new`` drops must still have another online
        peer (the records are re-read: a peer may have left while the new span loaded)."""
        me = self.peer.peer_id_str
        now = time.time()
        records = [r for r in await self.peer.fetch_records() if r.peer_id != me and r.state == "online"
                   and now - r.timestamp <= self.max_age]
        served = set()
        for r in records:
            served.update(range(r.start, r.end))
        dropped = [b for b in range(*old) if not new[0] <= b < new[1] and b not in served]
        return f"blocks {dropped} would have no peer" if dropped else None
