"""The training-sync protocol: DiLoCo outer steps over hivemind's group all-reduce.

Algorithm (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of Language Models",
arXiv:2311.08105, Algorithm 1): every training peer keeps the *anchor* ``θ`` (the parameters as of the last
outer step) and runs H *inner steps* of AdamW on its own data. The *outer step* then

1. computes the peer's *pseudo-gradient* ``Δ_i = θ − θ_i`` (anchor minus current parameters, per tensor);
2. averages the pseudo-gradients of every peer present with a group *all-reduce*
   (hivemind :class:`~hivemind.averaging.DecentralizedAverager`, butterfly all-reduce; the tensors are
   compressed on the wire with ``none``, ``fp16`` or ``8bit``), weighted by how many inner steps each peer
   ran: ``Δ = Σ w_i Δ_i / Σ w_i``;
3. applies Nesterov momentum to the anchor: ``v ← μ v + Δ;  θ ← θ − lr (Δ + μ v)`` (``torch.optim.SGD`` with
   ``nesterov=True``; the paper's ``lr = 0.7``, ``μ = 0.9`` are the defaults) and copies ``θ`` into the model.

What travels and where (all keys are in the run's namespace ``run_id``):

- the all-reduce itself: hivemind's averaging RPCs (``rpc_join_group`` for matchmaking, ``rpc_aggregate_part``
  for the tensor parts), under the averager prefix ``{run_id}_diloco``. The group key carries the outer-step
  number (:func:`round_group_bits`), so peers at different outer steps never average together;
- progress records (:class:`ProgressRecord`) under the DHT key ``{run_id}.diloco.progress``, one sub-key per
  peer, refreshed every few seconds with a short TTL: they tell who is alive, at which outer step and inner
  step, and how fast, from which each peer plans the outer step's deadline (:func:`plan_outer_step`);
- state sharing for elastic join: a peer downloads the anchor, the outer momentum buffers and the outer-step
  number from a live peer (hivemind's ``rpc_download_state``). Peers announce a state-sharing priority
  (:func:`sharing_priority`) that prefers the most advanced outer step and, within it, the largest group, so
  a newcomer and a peer that fell out of a group both take the state of the main body of the swarm.

Bytes are counted in the averager process at the protobuf message level (``ByteSize()`` of every
``AveragingData`` message sent or received: the tensor payload plus a few bytes of framing; libp2p's own
Noise/yamux framing is not included), separately for all-reduce traffic and state downloads.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import math
import multiprocessing as mp
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.compression import CompressionBase, Float16Compression, NoCompression, Uniform8BitQuantization
from hivemind.dht import DHT
from hivemind.p2p import P2PContext
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.asyncio import as_aiter, azip

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1

#: wire compression of the pseudo-gradients, by the name a run chooses
COMPRESSIONS: Dict[str, Callable[[], CompressionBase]] = {
    "none": NoCompression,
    "fp16": Float16Compression,
    "8bit": Uniform8BitQuantization,
}


def make_compression(name: str) -> CompressionBase:
    """The hivemind codec for ``name`` (``none``: float32 as is; ``fp16``: IEEE half precision, 2 bytes a
    value; ``8bit``: hivemind's uniform 8-bit quantization, 1 byte a value plus a 256-entry codebook).

    :raises ValueError: for an unknown name
    """
    if name not in COMPRESSIONS:
        raise ValueError(f"unknown compression {name!r}; choose one of {sorted(COMPRESSIONS)}")
    return COMPRESSIONS[name]()


def codec_error_bound(name: str, tensors: Sequence[torch.Tensor]) -> float:
    """An upper bound on the elementwise error of one group all-reduce of ``tensors`` under codec ``name``.

    In hivemind's butterfly all-reduce a value is encoded twice on its way: the peer's own part goes to the
    part's owner encoded (error ``e_in``), and the owner sends back ``average − decoded input``, encoded again
    (error ``e_out``). The result therefore differs from the exact mean by at most ``e_in + e_out`` plus the
    mean of the other peers' input errors (``≤ e_in``).

    - ``none``: float32 rounding only (``1e-6`` relative to the largest magnitude);
    - ``fp16``: relative rounding ``2^-11`` of each encoded value, so ``≤ 3 · 2^-11 · max|x|`` plus ``2^-11``
      of the delta's magnitude (``≤ 2 max|x|``);
    - ``8bit`` (hivemind's ``Uniform8BitQuantization``): values inside ``mean ± 3σ`` land in 256 buckets of
      width ``6σ/256`` and decode to their bucket's average, so each encoding errs by less than one bucket
      width. This bound holds for inputs without values beyond ``3σ`` (uniformly distributed test data);
      heavier tails are clipped by the codec.

    :param tensors: the peers' inputs, each of the same shape (any shape)
    :returns: the bound, in the tensors' own units
    """
    stacked = torch.stack([t.detach().float() for t in tensors])
    scale = float(stacked.abs().max())
    if name == "none":
        return 1e-6 * max(scale, 1.0)
    if name == "fp16":
        return 2.0**-11 * (3 * scale + 2 * scale) + 1e-7
    if name == "8bit":
        # bucket width of one encoding of an input part (std of the inputs) and of a delta (std of avg - x_i)
        width_in = 6.0 * float(stacked.std()) / 256
        deltas = stacked.mean(0, keepdim=True) - stacked
        width_out = 6.0 * float(deltas.std()) / 256
        return 2 * width_in + width_out + 1e-6
    raise ValueError(f"unknown compression {name!r}")


# --------------------------------------------------------------------------------------------- byte counting
class TrafficCounter:
    """Payload bytes sent and received by one averager, shared between its process and the trainer's.

    Counts are cumulative; subtract two :meth:`snapshot` values to get the traffic of one outer step.
    """

    FIELDS = ("allreduce_sent", "allreduce_received", "state_sent", "state_received", "failed_reducers")

    def __init__(self):
        self._values = {name: mp.Value(ctypes.c_int64, 0) for name in self.FIELDS}

    def add(self, name: str, nbytes: int) -> None:
        """Add ``nbytes`` (bytes) to counter ``name`` (one of :attr:`FIELDS`)."""
        value = self._values[name]
        with value.get_lock():
            value.value += int(nbytes)

    def snapshot(self) -> Dict[str, int]:
        """The current totals, in bytes, by field."""
        return {name: int(v.value) for name, v in self._values.items()}


class _CountingStub:
    """Wraps a peer's RPC stub so that the all-reduce replies it streams to us are counted as received."""

    def __init__(self, stub, counter: TrafficCounter):
        self._stub, self._counter = stub, counter

    async def rpc_aggregate_part(self, requests, *args, **kwargs):
        replies = await self._stub.rpc_aggregate_part(requests, *args, **kwargs)
        counter = self._counter

        async def counted():
            async for message in replies:
                counter.add("allreduce_received", message.ByteSize())
                yield message

        return counted()

    def __getattr__(self, name):
        return getattr(self._stub, name)


class _CountingAllReduceRunner(AllReduceRunner):
    """hivemind's butterfly all-reduce, counting every ``AveragingData`` message that crosses the wire:
    parts we send to their owners and averaged parts we send back (sent), parts that others send us and the
    averaged parts we get back (received). The local part never leaves the process and is not counted."""

    def __init__(self, *, counter: TrafficCounter, **kwargs):
        self._counter = counter
        super().__init__(**kwargs)

    def _get_peer_stub(self, peer):
        return _CountingStub(super()._get_peer_stub(peer), self._counter)

    async def _communicate_with_peer(self, peer_id):
        # a groupmate that fails to return its averaged part leaves that part un-averaged here (hivemind keeps
        # the local values): count it, so that the outer step can redo the round without that peer
        try:
            await super()._communicate_with_peer(peer_id)
        except BaseException:
            self._counter.add("failed_reducers", 1)
            raise

    async def _generate_input_for_peer(self, peer_index: int):
        async for message in super()._generate_input_for_peer(peer_index):
            self._counter.add("allreduce_sent", message.ByteSize())
            yield message

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        counter = self._counter

        async def counted(incoming):
            async for message in incoming:
                counter.add("allreduce_received", message.ByteSize())
                yield message

        async for reply in super().rpc_aggregate_part(counted(stream), context):
            counter.add("allreduce_sent", reply.ByteSize())
            yield reply


class SyncAverager(DecentralizedAverager):
    """A :class:`~hivemind.averaging.DecentralizedAverager` for DiLoCo outer steps.

    On top of hivemind's averager it counts payload bytes (:attr:`traffic`), serves the trainer's state from
    ``state_fn`` to peers that join (instead of the averaged tensors), and lets the caller set the group key
    bits and the expected group size before each round (:meth:`set_round`).

    :param averaged_tensors: the pseudo-gradient buffers, float32, one per model parameter (same shapes);
      they are moved to shared memory and averaged in place
    :param state_fn: called in this process when a peer downloads our state; returns ``(metadata, tensors)``
    """

    def __init__(self, averaged_tensors: Sequence[torch.Tensor], dht: DHT, *,
                 state_fn: Optional[Callable[[], Tuple[Any, Sequence[torch.Tensor]]]] = None, **kwargs):
        self.traffic = TrafficCounter()
        self._state_fn = state_fn
        super().__init__(averaged_tensors, dht, **kwargs)

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        group_id = group_info.group_id if group_id is None else group_id
        runner = _CountingAllReduceRunner(
            counter=self.traffic, p2p=self._p2p, servicer_type=type(self), prefix=self.prefix, tensors=tensors,
            group_id=group_id, ordered_peer_ids=group_info.peer_ids, **kwargs,
        )
        assert group_id in self._running_groups, f"group {group_id} was not registered"
        self._running_groups[group_id].set_result(runner)
        # the runner yields (averaged - local) per tensor, as the parts come back
        async for tensor, update in azip(as_aiter(*tensors), runner):
            tensor.add_(update, alpha=self._averaging_alpha)
            self.last_updated = get_dht_time()
            self._state_updated.set()

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        async for message in super().rpc_download_state(request, context):
            self.traffic.add("state_sent", message.ByteSize())
            yield message

    def get_current_state(self):
        if self._state_fn is None:
            return super().get_current_state()
        metadata, tensors = self._state_fn()
        return metadata, tensors, None

    def set_round(self, group_bits: str, target_group_size: Optional[int]) -> None:
        """Before a round: only peers with the same ``group_bits`` match (string of ``0``/``1``), and a group
        starts its all-reduce as soon as it has ``target_group_size`` peers (None: only at the deadline)."""
        future = self._send_control("_set_round", group_bits=group_bits, target_group_size=target_group_size)
        future.result(timeout=30)

    def _send_control(self, method: str, **kwargs):
        from hivemind.utils import MPFuture

        future = MPFuture()
        self._outer_pipe.send((method, [], dict(future=future, **kwargs)))
        return future

    async def _set_round(self, group_bits: str, target_group_size: Optional[int], future):
        try:
            self._matchmaking.group_key_manager.group_bits = group_bits
            self._matchmaking.target_group_size = target_group_size
            future.set_result(None)
        except Exception as e:  # pragma: no cover - reported to the caller
            if not future.done():
                future.set_exception(e)


def round_group_bits(outer_step: int, attempt: int = 0, nbits: int = 24) -> str:
    """The group-key bits for attempt ``attempt`` (0..3) of outer step ``outer_step``: both numbers in binary,
    so that only peers at the same outer step (and retry) can match."""
    return format(((outer_step << 2) | (attempt & 3)) % (1 << nbits), f"0{nbits}b")


def group_tiebreak(peer_ids: Sequence[bytes]) -> float:
    """A number in ``[0, 0.5)`` that every member of a group computes alike from the sorted member ids; it
    breaks ties between two groups of equal size that formed at the same outer step."""
    digest = hashlib.sha256(b"".join(sorted(peer_ids))).digest()
    return int.from_bytes(digest[:6], "big") / float(1 << 48) / 2


def sharing_priority(outer_step: int, group_score: float) -> float:
    """State-sharing priority: later outer steps first, then larger groups (``group_score`` is the size of the
    peer's last group plus :func:`group_tiebreak`, < 1000)."""
    return float(outer_step) * 1000.0 + min(group_score, 999.0)


# --------------------------------------------------------------------------------------------- progress records
@dataclass
class ProgressRecord:
    """What a training peer tells the swarm, refreshed every few seconds (a DHT sub-key with a short TTL).

    :param outer_step: the number of outer steps in this peer's anchor (0 before the first)
    :param inner_step: inner steps done since that outer step
    :param steps_per_s: the peer's recent inner-step rate (steps per second)
    :param group_score: size of the group of the peer's last outer step plus a tie-breaker (see
      :func:`group_tiebreak`); 0 before the first outer step
    :param target_inner_steps: how many inner steps this peer runs before its next outer step (H)
    :param time: DHT time (seconds) when the record was made
    :param left: the peer left the run (a graceful leave: nobody should wait for it)
    :param model: the fingerprint of the model the peer trains (:func:`model_fingerprint`; empty: not given)
    """

    outer_step: int
    inner_step: int
    steps_per_s: float
    group_score: float = 0.0
    target_inner_steps: int = 0
    time: float = 0.0
    left: bool = False
    version: int = PROTOCOL_VERSION
    model: str = ""

    def to_wire(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, value: Any) -> Optional["ProgressRecord"]:
        """Parse and validate a record from the DHT; None for anything malformed (records from other peers
        are not trusted)."""
        if not isinstance(value, dict):
            return None
        try:
            record = cls(
                outer_step=int(value["outer_step"]), inner_step=int(value["inner_step"]),
                steps_per_s=float(value["steps_per_s"]), group_score=float(value.get("group_score", 0.0)),
                target_inner_steps=int(value.get("target_inner_steps", 0)), time=float(value.get("time", 0.0)),
                left=bool(value.get("left", False)), version=int(value.get("version", 0)),
                model=value.get("model", ""),
            )
        except (KeyError, TypeError, ValueError):
            return None
        if record.version != PROTOCOL_VERSION or not (0 <= record.outer_step < 1 << 40):
            return None
        if not (0 <= record.inner_step < 1 << 40) or not math.isfinite(record.steps_per_s) or record.steps_per_s < 0:
            return None
        if not math.isfinite(record.group_score) or not math.isfinite(record.time):
            return None
        if not isinstance(record.model, str) or len(record.model) > 64:
            return None
        return record


def model_fingerprint(named_shapes: Sequence[Tuple[str, Sequence[int]]]) -> str:
    """A short fingerprint of a model's parameters (names and shapes, in order): peers of one run must train the
    same model, since their pseudo-gradients are averaged tensor by tensor.

    :param named_shapes: ``(name, shape)`` per parameter, e.g. from ``model.named_parameters()``
    :returns: 16 hex digits
    """
    text = ";".join(f"{name}:{'x'.join(str(int(d)) for d in shape)}" for name, shape in named_shapes)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def progress_key(run_id: str) -> str:
    """The DHT key under which the peers of run ``run_id`` publish their :class:`ProgressRecord`."""
    return f"{run_id}.diloco.progress"


def publish_progress(dht: DHT, run_id: str, record: ProgressRecord, ttl: float = 15.0) -> None:
    """Store ``record`` under this peer's sub-key; it expires after ``ttl`` seconds unless refreshed.
    Returns at once (the store completes in the DHT's process)."""
    record.time = get_dht_time()
    dht.store(progress_key(run_id), subkey=dht.peer_id.to_bytes(), value=record.to_wire(),
              expiration_time=get_dht_time() + ttl, return_future=True)


def fetch_progress(dht: DHT, run_id: str, timeout: float = 5.0) -> Dict[bytes, ProgressRecord]:
    """The live peers' progress records, by peer id bytes (malformed records are dropped)."""
    try:
        found = dht.get(progress_key(run_id), latest=True, return_future=True).result(timeout=timeout)
    except Exception as e:  # a DHT hiccup reads as "nobody is known"
        logger.warning("progress lookup failed: %r", e)
        return {}
    if found is None or not isinstance(found.value, dict):
        return {}
    out = {}
    for subkey, item in found.value.items():
        record = ProgressRecord.from_wire(getattr(item, "value", None))
        if record is not None and isinstance(subkey, bytes):
            out[subkey] = record
    return out


def _ahead(record: ProgressRecord, outer_step: int, group_score: float) -> bool:
    """The peer of ``record`` holds a newer anchor than ours: a later outer step, or the same one reached in a
    better group."""
    same_step_better_group = record.outer_step == outer_step and record.group_score > group_score + 1e-9
    return record.outer_step > outer_step or same_step_better_group


def _in_outer_step_to(record: ProgressRecord, outer_step: int) -> bool:
    """The peer of ``record`` has done its inner steps of the round before ``outer_step`` (it is in its outer step
    to ``outer_step``, or its newer record is not visible yet)."""
    return (record.outer_step == outer_step - 1 and record.target_inner_steps > 0
            and record.inner_step >= record.target_inner_steps)


@dataclass
class OuterPlan:
    """The plan for one outer step, as one peer sees the swarm.

    :param deadline: DHT time (s) by which the all-reduce group must be complete
    :param expected: how many peers (this one included) are expected in the group
    :param behind: True if this peer's anchor is stale (some live peer already finished this outer step, or
      sits in a better group at the same outer step): it should download the state instead of averaging
    """

    deadline: float
    expected: int
    behind: bool


def plan_outer_step(
    progress: Dict[bytes, ProgressRecord], me: bytes, outer_step: int, group_score: float, now: float, *,
    min_wait: float, max_wait: float, slack: float,
) -> OuterPlan:
    """Plan an outer step from the live peers' progress records (a pure function).

    The deadline is when the slowest live peer at the same outer step is predicted to finish its inner steps
    (from its last record, its remaining steps and its step rate), plus ``slack`` seconds, kept within
    ``[now + min_wait, now + max_wait]``: the step then proceeds with whoever is present by the deadline.
    A peer whose record shows the previous outer step with its inner steps done is expected too, after a whole
    round of inner steps: it is in its outer step to ours, or it finished that step with us and its newer record
    is not visible yet (rounds shorter than the records' refresh period).

    :param progress: records by peer id bytes (this peer's own may be among them; it is ignored)
    :param me: this peer's id bytes
    :param outer_step: this peer's outer step number
    :param group_score: this peer's last group score (see :class:`ProgressRecord`)
    :param now: DHT time, seconds
    """
    expected, latest_finish, behind = 1, now, False
    for peer, record in progress.items():
        if peer == me or record.left:
            continue
        if _ahead(record, outer_step, group_score):
            behind = True
            if record.outer_step > outer_step:
                continue
        if _in_outer_step_to(record, outer_step):
            expected += 1
            if record.steps_per_s > 0:
                latest_finish = max(latest_finish, record.time + record.target_inner_steps / record.steps_per_s)
            continue
        if record.outer_step < outer_step:
            continue
        expected += 1
        target = record.target_inner_steps or record.inner_step
        remaining = max(0, target - record.inner_step)
        if remaining and record.steps_per_s > 0:
            latest_finish = max(latest_finish, record.time + remaining / record.steps_per_s)
    deadline = min(max(latest_finish + slack, now + min_wait), now + max_wait)
    return OuterPlan(deadline=deadline, expected=expected, behind=behind)


@dataclass
class FinishPlan:
    """What a peer that has done its last outer step does before it leaves the run.

    :param download: a live peer holds a better final state (same outer step, larger group score, or a later
      step): download it, so that the peers finishing together end with the same model
    :param wait_for: live peers that may still need this peer's state: peers at the same outer step with a lower
      group score (they will download it), and peers still in the previous outer step that are predicted to finish
      their inner steps within the horizon (they will find themselves behind and download it); empty when there is
      nothing to wait for
    """

    download: bool
    wait_for: List[bytes]


def plan_finish(progress: Dict[bytes, ProgressRecord], me: bytes, outer_step: int, group_score: float,
                now: float, horizon: float) -> FinishPlan:
    """Plan the end of a run for a peer at its last outer step ``outer_step`` (a pure function).

    In the middle of a run a peer that falls out of the main group (its side of an all-reduce failed, or it was
    late for the group) catches up at its next outer step by downloading the main group's state
    (:func:`plan_outer_step`). After the last outer step there is no next one, and the others may already be gone:
    so the lagging peer downloads the better state now, and the others wait for it (the caller bounds the wait).

    :param progress: live records by peer id bytes (this peer's own, and records of peers that left, are ignored)
    :param me: this peer's id bytes
    :param outer_step: this peer's outer step number (the run's last)
    :param group_score: this peer's last group score (see :class:`ProgressRecord`)
    :param now: DHT time, seconds
    :param horizon: seconds this peer can still wait: a peer in the previous outer step predicted to finish its
      inner steps later than ``now + horizon`` is not waited for
    """
    download, wait_for = False, []
    for peer, record in progress.items():
        if peer == me or record.left:
            continue
        if _ahead(record, outer_step, group_score):
            download = True
        elif record.outer_step == outer_step and record.group_score < group_score - 1e-9:
            wait_for.append(peer)
        elif _in_outer_step_to(record, outer_step):
            wait_for.append(peer)  # its all-reduce may have failed on its side only
        elif record.outer_step == outer_step - 1 and record.target_inner_steps and record.steps_per_s > 0 and \
                record.time + (record.target_inner_steps - record.inner_step) / record.steps_per_s <= now + horizon:
            wait_for.append(peer)  # late for the last group: it will download our state
    return FinishPlan(download=download, wait_for=[] if download else wait_for)


# --------------------------------------------------------------------------------------------- the outer step
@dataclass
class DiLoCoConfig:
    """Hyper-parameters and timeouts of the outer step.

    :param outer_lr: outer learning rate (paper: 0.7)
    :param outer_momentum: Nesterov momentum (paper: 0.9)
    :param compression: ``none``, ``fp16`` or ``8bit`` (see :func:`make_compression`)
    :param request_timeout: seconds to wait for a matchmaking reply
    :param min_matchmaking_time: seconds a group stays open at least; must exceed ``request_timeout``
      (hivemind's matchmaking can deadlock otherwise)
    :param min_wait, max_wait, slack: deadline planning, seconds (see :func:`plan_outer_step`)
    :param allreduce_timeout: seconds one all-reduce may take
    :param next_chunk_timeout: seconds without a tensor part before a groupmate is dropped from the round
    :param progress_ttl: seconds a progress record lives unless refreshed
    :param lonely_retries: times an outer step that expected others but found no group by its deadline waits
      ``min_wait + slack`` seconds more (same group key) before the peer steps alone
    :param finish_wait: seconds a peer that has done the run's last outer step keeps serving its state to peers
      that still need it (see :func:`plan_finish`) before it leaves
    """

    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    compression: str = "fp16"
    request_timeout: float = 2.0
    min_matchmaking_time: float = 4.0
    min_wait: float = 4.0
    max_wait: float = 90.0
    slack: float = 4.0
    allreduce_timeout: float = 120.0
    next_chunk_timeout: float = 5.0
    progress_ttl: float = 15.0
    lonely_retries: int = 2
    finish_wait: float = 30.0

    def __post_init__(self):
        if self.min_matchmaking_time <= self.request_timeout:
            raise ValueError("min_matchmaking_time must be larger than request_timeout (hivemind matchmaking "
                             f"can deadlock otherwise): {self.min_matchmaking_time} <= {self.request_timeout}")
        make_compression(self.compression)
        if not (self.outer_lr > 0 and 0 <= self.outer_momentum < 1):
            raise ValueError("outer_lr must be > 0 and outer_momentum in [0, 1)")


@dataclass
class OuterStepReport:
    """What one outer step did.

    :param outer_step: the outer step number after this step (1 after the first)
    :param group_size: peers whose pseudo-gradients were averaged (1: this peer alone)
    :param weight_total: the sum of the averaging weights in the group
    :param bytes_sent, bytes_received: all-reduce payload bytes of this step
    :param seconds: wall time of the step (waiting for the group included)
    :param wait_seconds: of which waiting for the group to form and the all-reduce
    :param pseudo_grad_norm: L2 norm of the averaged pseudo-gradient
    :param error: an unexpected failure of the all-reduce (the step then used this peer's pseudo-gradient alone)
    :param retries: rounds redone because a groupmate vanished mid-all-reduce
    :param note: e.g. that nobody else joined by the deadline, or that the groupmates failed mid-all-reduce and
      none was left to redo the round with, so this peer stepped alone (a recovered round, not an error)
    :param stale_anchor: a groupmate came to this step with a higher group score than this peer's: its anchor is
      the main group's and ours is not (this peer stepped alone before, and the others' records were not visible
      when it planned the step), so the same averaged update left the anchors apart: download that state now
    """

    outer_step: int
    group_size: int
    weight_total: float
    bytes_sent: int
    bytes_received: int
    seconds: float
    wait_seconds: float
    pseudo_grad_norm: float
    error: str = ""
    peers: List[str] = field(default_factory=list)
    retries: int = 0
    note: str = ""
    stale_anchor: bool = False


def _gathered_number(data: Any, key: str) -> Optional[float]:
    """A finite number ``data[key]`` from a groupmate's gathered data (not trusted), or None."""
    try:
        value = float(data[key])
    except (KeyError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class DiLoCoSync:
    """One peer's side of DiLoCo: the anchor, the outer optimizer and the averager.

    :param params: the model's parameters (updated in place by :meth:`outer_step` and :meth:`load_state`)
    :param dht: a running hivemind DHT (made with ``protocols.transport.LOCAL_ONLY`` in local runs)
    :param run_id: the run's name; peers with the same ``run_id`` and model shape train together
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], dht: DHT, *, run_id: str,
                 config: Optional[DiLoCoConfig] = None, start: bool = True):
        self.config = config or DiLoCoConfig()
        self.params = list(params)
        self.dht, self.run_id = dht, run_id
        self.anchor = [p.detach().clone().float() for p in self.params]
        self.outer_optimizer = torch.optim.SGD(self.anchor, lr=self.config.outer_lr,
                                               momentum=self.config.outer_momentum, nesterov=True)
        self.pseudo_grads = [torch.zeros_like(a) for a in self.anchor]
        self.outer_step_count = 0
        self.group_score = 0.0
        self._state_lock = threading.Lock()
        prefix = "".join(c if c.isalnum() or c in "_-" else "_" for c in run_id) + "_diloco"
        cfg = self.config
        self.averager = SyncAverager(
            self.pseudo_grads, dht, start=start, prefix=prefix, state_fn=self._shared_state,
            min_group_size=2, min_matchmaking_time=cfg.min_matchmaking_time, request_timeout=cfg.request_timeout,
            allreduce_timeout=cfg.allreduce_timeout, next_chunk_timeout=cfg.next_chunk_timeout,
            compression=make_compression(cfg.compression), declare_state_period=10.0,
        )
        self._update_priority()

    # ---------------------------------------------------------------- state
    def _momentum_buffers(self) -> List[torch.Tensor]:
        out = []
        for a in self.anchor:
            buf = self.outer_optimizer.state.get(a, {}).get("momentum_buffer")
            out.append(buf if buf is not None else torch.zeros_like(a))
        return out

    def _shared_state(self):
        """(metadata, tensors) that a joining peer downloads: anchor tensors then momentum buffers."""
        with self._state_lock:
            metadata = dict(version=PROTOCOL_VERSION, outer_step=self.outer_step_count, group_score=self.group_score,
                            has_momentum=bool(self.outer_optimizer.state), num_tensors=len(self.anchor))
            tensors = [t.clone() for t in self.anchor] + [t.clone() for t in self._momentum_buffers()]
        return metadata, tensors

    def load_state(self, metadata: Dict[str, Any], tensors: Sequence[torch.Tensor]) -> None:
        """Adopt a downloaded or checkpointed state: anchor, outer momentum and outer-step number; the model's
        parameters are set to the anchor.

        :raises ValueError: if the shapes do not match this model
        """
        n = len(self.anchor)
        if int(metadata.get("num_tensors", -1)) != n or len(tensors) != 2 * n:
            raise ValueError(f"state has {len(tensors)} tensors, expected {2 * n}")
        for a, t in zip(self.anchor, tensors[:n]):
            if tuple(a.shape) != tuple(t.shape):
                raise ValueError(f"state tensor of shape {tuple(t.shape)} does not fit {tuple(a.shape)}")
        with self._state_lock, torch.no_grad():
            for a, t in zip(self.anchor, tensors[:n]):
                a.copy_(t)
            self.outer_optimizer.state.clear()
            if metadata.get("has_momentum"):
                for a, t in zip(self.anchor, tensors[n:]):
                    self.outer_optimizer.state[a]["momentum_buffer"] = t.detach().clone().float()
            self.outer_step_count = int(metadata["outer_step"])
            self.group_score = float(metadata.get("group_score", 0.0))
            for p, a in zip(self.params, self.anchor):
                p.copy_(a.to(p.dtype))
        self._update_priority()

    def state_dict(self) -> Dict[str, Any]:
        """For checkpoints: everything :meth:`load_state_dict` needs."""
        metadata, tensors = self._shared_state()
        return dict(metadata=metadata, tensors=tensors)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.load_state(state["metadata"], state["tensors"])

    def _update_priority(self) -> None:
        try:
            self.averager.state_sharing_priority = sharing_priority(self.outer_step_count, self.group_score)
        except Exception as e:  # the averager may be shutting down
            logger.debug("cannot update sharing priority: %r", e)

    def download_state(self, timeout: float = 60.0) -> Optional[Dict[str, Any]]:
        """Download the state of the best live peer (see :func:`sharing_priority`) and adopt it.

        :returns: the downloaded metadata plus ``bytes`` (payload bytes received), or None if no peer served a
            complete state
        """
        loaded = self.averager.load_state_from_peers(timeout=timeout)
        if loaded is None:
            return None
        metadata, tensors = loaded
        if not isinstance(metadata, dict) or metadata.get("version") != PROTOCOL_VERSION:
            logger.warning("ignoring a downloaded state of an unknown version: %r", metadata)
            return None
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        self.averager.traffic.add("state_received", nbytes)
        try:
            self.load_state(metadata, tensors)
        except ValueError as e:  # cut short: the serving peer died mid-download; the caller asks again
            logger.warning("ignoring an incomplete downloaded state: %s", e)
            return None
        return dict(metadata, bytes=nbytes)

    # ---------------------------------------------------------------- the outer step
    def outer_step(self, *, weight: float = 1.0, deadline: Optional[float] = None,
                   expected_group: Optional[int] = None) -> OuterStepReport:
        """Average pseudo-gradients with whoever is present by ``deadline`` and apply Nesterov momentum.

        :param weight: this peer's averaging weight (inner steps done / H: a peer that joined mid-way counts
          less); must be > 0
        :param deadline: DHT time (s) by which the group must be formed (default: now + min_wait)
        :param expected_group: number of peers expected (1: skip the network and step alone); the group starts
          its all-reduce as soon as that many have joined, otherwise at the deadline
        """
        cfg = self.config
        t0 = time.perf_counter()
        now = get_dht_time()
        deadline = deadline if deadline is not None else now + cfg.min_wait
        before = self.averager.traffic.snapshot()
        with torch.no_grad(), self.averager.get_tensors() as buffers:
            for buf, a, p in zip(buffers, self.anchor, self.params):
                torch.sub(a, p.detach().float(), out=buf)
        group_size, weight_total, peers, error, retries = 1, float(weight), [], "", 0
        stale_anchor = False
        t_wait = time.perf_counter()
        # a lone step scores 1 plus a tie-breaker of its own id: two peers that both stepped alone at this outer
        # step hold different anchors, and the lower one must catch up with the other instead of averaging with
        # it from then on (which would keep the anchors apart for the rest of the run). (self.group_score is
        # shared with joining peers: change it only once the step is done)
        new_score = 1.0 + (group_tiebreak([self.dht.peer_id.to_bytes()]) if self.dht is not None else 0.0)
        note = ""
        if expected_group is None or expected_group > 1:
            with self.averager.get_tensors() as buffers:
                local = [b.clone() for b in buffers]
            attempt, waits_more = 0, 0
            while attempt < 3:
                retries = attempt
                failed_before = self.averager.traffic.snapshot()["failed_reducers"]
                try:
                    self.averager.set_round(round_group_bits(self.outer_step_count, attempt), expected_group)
                    gathered = self.averager.step(
                        gather=dict(outer_step=self.outer_step_count, weight=float(weight), score=self.group_score),
                        weight=float(weight),
                        scheduled_time=deadline, timeout=max(deadline - get_dht_time(), 0) + cfg.min_matchmaking_time + 5,
                        allow_retries=True,
                    )
                except Exception as e:
                    gathered, error = None, repr(e)
                failed = self.averager.traffic.snapshot()["failed_reducers"] - failed_before
                if gathered and failed:
                    # a groupmate vanished mid-round: parts of our result are un-averaged. Every survivor sees
                    # the same failure, so all redo the round from their own pseudo-gradients without it.
                    with self.averager.get_tensors() as buffers:
                        for b, x in zip(buffers, local):
                            b.copy_(x)
                    expected_group = max(1, len(gathered) - failed)
                    deadline = get_dht_time() + cfg.min_wait + cfg.slack
                    if expected_group == 1:
                        # nobody left to redo it with: step alone (an expected outcome of a groupmate dying, not an
                        # error; a peer that fell out of the main group downloads its state at the next step)
                        gathered, error = None, ""
                        note = (f"{failed} groupmate(s) failed during the all-reduce and no other peer was left: "
                                "stepped alone")
                        logger.warning("outer step %d: %s", self.outer_step_count + 1, note)
                        break
                    if attempt + 1 >= 3:
                        gathered = None
                        error = f"groupmates failed during the all-reduce in {attempt + 1} attempts: stepped alone"
                        logger.warning("outer step %d: %s", self.outer_step_count + 1, error)
                        break
                    error = f"attempt {attempt}: {failed} groupmate(s) failed during the all-reduce; retrying"
                    logger.warning(error)
                    attempt += 1
                    continue
                if (not gathered and "could not find a group" in error and expected_group is not None
                        and expected_group > 1 and waits_more < cfg.lonely_retries):
                    # other peers were expected but none came by the deadline (a slow or loaded groupmate):
                    # wait once more for them under the same group key rather than step alone
                    waits_more += 1
                    deadline = get_dht_time() + cfg.min_wait + cfg.slack
                    logger.info("outer step %d: no group by the deadline while %d peers were expected; waiting "
                                "%.0f s more", self.outer_step_count + 1, expected_group, cfg.min_wait + cfg.slack)
                    continue
                break
            if gathered:
                error = ""
                group_size = len(gathered)
                peers = [pid.to_base58() for pid in gathered]
                weights = [w for w in (_gathered_number(g, "weight") for g in gathered.values()) if w is not None]
                weight_total = sum(weights) if len(weights) == group_size else weight_total
                steps = {g.get("outer_step") for g in gathered.values() if isinstance(g, dict)}
                if steps != {self.outer_step_count}:  # cannot happen: the group key carries the step number
                    error = f"groupmates at outer steps {sorted(map(str, steps))}"
                new_score = group_size + group_tiebreak([pid.to_bytes() for pid in gathered])
                scores = [x for x in (_gathered_number(g, "score") for g in gathered.values()) if x is not None]
                if scores and max(scores) > self.group_score + 1e-9:
                    # our anchor is not the main group's: keep our lower score (so that a download picks a peer
                    # that holds the main group's anchor) and let the caller download that state
                    stale_anchor, new_score = True, self.group_score
            else:
                if not note and (not error or "could not find a group" in error):
                    note, error = "nobody else joined by the deadline: stepped alone", ""
                with self.averager.get_tensors() as buffers:  # step alone with our own pseudo-gradient
                    for b, x in zip(buffers, local):
                        b.copy_(x)
        wait_s = time.perf_counter() - t_wait
        with self._state_lock, torch.no_grad(), self.averager.get_tensors() as buffers:
            norm = 0.0
            for a, buf in zip(self.anchor, buffers):
                a.grad = buf.clone()
                norm += float(buf.pow(2).sum())
            self.outer_optimizer.step()
            self.outer_optimizer.zero_grad(set_to_none=True)
            for p, a in zip(self.params, self.anchor):
                p.copy_(a.to(p.dtype))
            self.outer_step_count += 1
            self.group_score = new_score
        self._update_priority()
        after = self.averager.traffic.snapshot()
        return OuterStepReport(
            outer_step=self.outer_step_count, group_size=group_size, weight_total=weight_total,
            bytes_sent=after["allreduce_sent"] - before["allreduce_sent"],
            bytes_received=after["allreduce_received"] - before["allreduce_received"],
            seconds=time.perf_counter() - t0, wait_seconds=wait_s, pseudo_grad_norm=math.sqrt(norm), error=error,
            peers=peers, retries=retries, note=note, stale_anchor=stale_anchor,
        )

    def shutdown(self) -> None:
        """Stop the averager process."""
        with contextlib.suppress(Exception):
            self.averager.shutdown()
