"""The peer daemon: serves a span of blocks over hivemind streaming RPC and announces it in the DHT.

One asyncio event loop runs the libp2p transport, the DHT node, the RPC handlers and the announcer; the
blocks run on a single compute thread, so requests from different sessions never race on the device.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import logging
import os
import signal
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Dict, List, Optional, Tuple

import torch
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time

from protocols import PROTOCOL_VERSION
from protocols.codec import TensorError, decode_tensor, encode_tensor
from protocols.identity import Identity
from protocols.messages import (
    MAX_BATCH, MAX_PING_BYTES, MAX_REPLAY_CHUNKS, MAX_SESSION_ID, RPC_FORWARD, RPC_INFERENCE, RPC_INFO,
    RPC_PING, RPC_PUSH, ProtocolError, get_int,
    get_str, pack, unpack,
)
from protocols.model_spec import Checkpoint, resolve_dtype
from protocols.records import MODELS_KEY, PeerRecord, model_key, parse_records, sign_record
from protocols.transport import (
    create_dht_node, create_p2p, daemon_alive, ensure_connected, measure_link, quiet_closed_streams,
)

from peer.backend import SpanBackend, positions_for
from peer.throughput import measure_throughput

logger = logging.getLogger("peer")


EARLY_PUSH_SECONDS = 5.0  # how long a push that arrived before its session's open request is held
EARLY_PUSHES = 64  # sessions whose early pushes are held at once
EARLY_PUSH_BYTES = 256 << 20  # and their bytes
INLINE_TOKENS = 8  # steps of at most this many tokens (batch x new tokens) run on the event-loop thread


def block_ranges(blocks) -> str:
    """Sorted block indices as ``start:end`` runs, e.g. ``[0, 1, 5, 6, 7]`` -> ``"0:2, 5:8"``."""
    runs: list = []
    for b in blocks:
        if runs and b == runs[-1][1]:
            runs[-1][1] = b + 1
        else:
            runs.append([b, b + 1])
    return ", ".join(f"{a}:{z}" for a, z in runs)


def _internal_error(e: Exception, what: str) -> Exception:
    """The error a handler sends back for ``e``: expected errors (bad input, a peer leaving) as they are; anything
    else is logged with its traceback and named by type, so neither the peer's log nor the client sees an
    empty message."""
    if isinstance(e, (ValueError, PeerLeaving, SessionIdle)):
        return e
    logger.error("%s failed: %s: %s", what, type(e).__name__, e, exc_info=e)
    return RuntimeError(f"internal error in {what}: {type(e).__name__}: {e}")


def _naming_errors(what: str):
    """Wrap a streaming RPC handler (an async generator) so its unexpected errors pass through
    :func:`_internal_error`."""
    def wrap(handler):
        @functools.wraps(handler)
        async def wrapped(self, requests, context):
            try:
                async for response in handler(self, requests, context):
                    yield response
            except Exception as e:
                raise _internal_error(e, what) from e
        return wrapped
    return wrap


class SessionIdle(TimeoutError):
    """A session got no request within the peer's session timeout and was closed (routine: the client reopens it)."""


class PeerLeaving(RuntimeError):
    """Sent to a session's client when the peer leaves: the client should move to another peer."""


@dataclass
class PeerOptions:
    """Settings of one peer daemon (the ``swarm peer`` options)."""

    model: str
    blocks: Optional[Tuple[int, int]] = None
    num_blocks: Optional[int] = None
    rebalance_period: float = 3.0  # balancing peers check the swarm's placement this often (s, x0.5..1.5 jitter)
    balance: bool = False  # a peer started with --blocks moves itself too (--num-blocks implies it)
    rebalance_delay: float = 0.0  # seconds after start before the first placement check
    rebalance_min_gain: float = 0.1  # hysteresis: move only for this fraction more estimated throughput
    move_grace: float = 3.0  # after a move, sessions may still open on the old span this long (s)
    initial_peers: List[str] = field(default_factory=list)
    new_swarm: bool = False
    host_maddrs: List[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    announce_maddrs: List[str] = field(default_factory=list)
    device: str = "cpu"
    dtype: str = "auto"
    identity_path: Optional[str] = None
    max_cache_tokens: int = 65536
    max_chunk_tokens: int = 8192
    cuda_graphs: bool = True  # decode steps as CUDA graphs on a CUDA device (peer.backend.GraphCache)
    session_timeout: float = 300.0
    record_ttl: float = 10.0
    num_threads: Optional[int] = None
    throughput: Optional[float] = None
    throttle: float = 1.0
    # testing only: SIGKILL this process when the N-th inference step arrives / stop answering at it
    crash_at_step: Optional[int] = None
    hang_at_step: Optional[int] = None
    drop_pushes: bool = False  # testing only: say a step was pushed but never send it


class Session:
    """One client's inference session on this peer: its KV cache and the attention mask seen so far."""

    def __init__(self, session_id: str, start: int, end: int, batch_size: int, max_length: int, cache):
        self.session_id, self.start, self.end = session_id, start, end
        self.batch_size, self.max_length = batch_size, max_length
        self.cache = cache
        self.length = 0  # tokens (including padding) in the cache
        self.real = torch.zeros(batch_size, dtype=torch.long)  # real tokens per row
        self.mask: Optional[torch.Tensor] = None  # [batch, length] once any padding was seen
        self.reserved = batch_size * max_length * (end - start)
        self.backend: Optional[SpanBackend] = None  # the span it was opened on (a peer may move later)
        self.ended = asyncio.Event()  # set when the peer moves away from this span
        # push (see protocols.messages): where this session's outputs go, whose pushes it takes, and those
        # pushes by step until the session reaches them
        self.push_to: Optional[PeerID] = None
        self.push_session = ""  # the next peer's id for this session
        self.push_queue: Optional[asyncio.Queue] = None  # messages for the push stream, None ends it
        self.push_from: Optional[str] = None
        self.keep_outputs = False  # keep every output; answer pushed steps without it (the client fetches it)
        self.silent = False  # with keep_outputs: pushed steps get no answer at all
        self.kept: List[torch.Tensor] = []  # those outputs in host memory, [batch, tokens, hidden] per step
        self.pushed: Dict[int, runtime_pb2.ExpertRequest] = {}
        self.push_event = asyncio.Event()
        self.request_task: Optional[asyncio.Future] = None  # the client's next request, while a push is awaited
        self.pushed_steps = 0  # steps computed from a push
        self.client_steps = 0  # steps the client sent itself (used, or dropped because the push came first)
        self.steps = 0  # steps computed (prefill and decode)
        self.compute_s = 0.0  # their time: the blocks and the output's copy to host memory


class Peer:
    """A running peer. Use :meth:`start`, then :meth:`serve_forever` or :meth:`shutdown`."""

    def __init__(self, opts: PeerOptions):
        self.opts = opts
        self.checkpoint = Checkpoint(opts.model)
        self.model_uid = self.checkpoint.model_uid
        self.dtype = resolve_dtype(opts.dtype, self.checkpoint.config)
        self.identity = Identity.load_or_create(opts.identity_path) if opts.identity_path else Identity.generate()
        self.peer_id = self.identity.peer_id
        self.sessions: Dict[str, Session] = {}
        self._push_tasks: set = set()
        # pushes that arrived before their session's open request: session id -> (arrival time, sender, step, request)
        self._early_pushes: "collections.OrderedDict[str, list]" = collections.OrderedDict()
        self._early_bytes = 0
        self.reserved_tokens = 0
        self.state = "joining"
        self.backend: Optional[SpanBackend] = None
        self.start_block = self.end_block = 0
        self.forward_tps = self.decode_sps = 0.0
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compute")
        self.leaving = asyncio.Event()
        self.daemon_lost = asyncio.Event()  # its libp2p daemon exited: nobody can reach this peer any more
        self._tasks: List[asyncio.Task] = []
        self._rejoin_task: Optional[asyncio.Task] = None
        self.p2p = self.dht = None
        self._identity_file: Optional[str] = None
        self.steps_received = 0
        self.network: Dict[str, List[float]] = {}  # peer id -> [rtt_s, bandwidth_bytes_per_s]
        # placement: spans left by a move, still serving their open sessions -> until when new ones may open there
        self._retired: Dict[SpanBackend, float] = {}
        self.moving_since = 0.0  # when the current move began (announced, so that no other peer moves meanwhile)
        self.rebalancer = None

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Join the swarm, load the span, measure it, start serving and announce the peer online.

        :raises PortInUseError: if a listen port is taken
        :raises ValueError: on a bad span
        """
        opts = self.opts
        if not opts.initial_peers and not opts.new_swarm:
            raise ValueError("give --initial-peers to join a swarm, or --new-swarm to start one")
        total = self.checkpoint.num_blocks
        if opts.blocks is not None and not 0 <= opts.blocks[0] < opts.blocks[1] <= total:
            raise ValueError(f"--blocks {opts.blocks[0]}:{opts.blocks[1]} is outside the model's {total} blocks "
                             f"(0:{total})")
        if opts.num_blocks is not None and not 1 <= opts.num_blocks <= total:
            raise ValueError(f"--num-blocks {opts.num_blocks} must be between 1 and the model's {total} blocks")
        identity_path = opts.identity_path
        if identity_path is None:
            import tempfile

            fd, identity_path = tempfile.mkstemp(prefix="swarm-peer-", suffix=".key")
            os.close(fd)
            self.identity.save(identity_path)
            self._identity_file = identity_path
        try:
            self.p2p = await create_p2p(
                host_maddrs=opts.host_maddrs, announce_maddrs=opts.announce_maddrs,
                initial_peers=opts.initial_peers, identity_path=identity_path,
            )
        finally:
            if self._identity_file:  # the daemon has read it; a key made for this run leaves no file behind
                os.unlink(self._identity_file)
                self._identity_file = None
        self.dht = await create_dht_node(self.p2p, opts.initial_peers)
        self.maddrs = [str(m) for m in await self.p2p.get_visible_maddrs()]
        self.start_block, self.end_block = await self._choose_span()
        logger.info("peer %s joining: blocks %d:%d of %s", self.peer_id, self.start_block, self.end_block, self.model_uid)
        await self.announce()

        loop = asyncio.get_running_loop()
        self.backend = await loop.run_in_executor(
            self.pool, lambda: SpanBackend(self.checkpoint, self.start_block, self.end_block, opts.device, self.dtype,
                                       use_graphs=opts.cuda_graphs)
        )
        if opts.throughput is not None:
            self.forward_tps = self.decode_sps = float(opts.throughput)
        else:
            self.forward_tps, self.decode_sps = await loop.run_in_executor(
                self.pool, lambda: measure_throughput(self.backend, self.model_uid)
            )
        if opts.throttle > 1:
            self.forward_tps /= opts.throttle
            self.decode_sps /= opts.throttle
        await self.p2p.add_protobuf_handler(RPC_INFO, self.rpc_info, runtime_pb2.ExpertRequest)
        await self.p2p.add_protobuf_handler(RPC_PING, self.rpc_ping, runtime_pb2.ExpertRequest)
        await self.p2p.add_protobuf_handler(
            RPC_PUSH, self.rpc_push, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True
        )
        await self.p2p.add_protobuf_handler(
            RPC_FORWARD, self.rpc_forward, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True
        )
        await self.p2p.add_protobuf_handler(
            RPC_INFERENCE, self.rpc_inference, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True
        )
        self.state = "online"
        await self.announce()
        self._tasks.append(asyncio.create_task(self._announce_loop()))
        self._tasks.append(asyncio.create_task(self._network_loop()))
        if opts.blocks is None or opts.balance:
            from peer.rebalancer import Rebalancer

            self.rebalancer = Rebalancer(self, period=opts.rebalance_period, min_gain=opts.rebalance_min_gain,
                                         record_ttl=opts.record_ttl, stale_move=opts.session_timeout + 30,
                                         delay=opts.rebalance_delay)
            self._tasks.append(asyncio.create_task(self.rebalancer.run()))
        logger.info(
            "peer %s online: blocks %d:%d, %.0f tokens/s forward and %.1f decode steps/s per block, listening on %s",
            self.peer_id, self.start_block, self.end_block, self.forward_tps, self.decode_sps, " ".join(self.maddrs),
        )

    async def _choose_span(self) -> Tuple[int, int]:
        total = self.checkpoint.num_blocks
        if self.opts.blocks is not None:
            start, end = self.opts.blocks
            if not 0 <= start < end <= total:
                raise ValueError(f"--blocks {start}:{end} is outside the model's {total} blocks (0:{total})")
            return start, end
        from peer.rebalancer import join_span, peer_spec

        n = min(self.opts.num_blocks or total, total)
        me = None
        try:
            forward_tps, decode_sps = await self._own_figures()
            mine = PeerRecord(peer_id=self.peer_id_str, model=self.model_uid, start=0, end=n, state="online",
                              forward_tps=forward_tps, decode_sps=decode_sps, max_blocks=n, balancing=True,
                              timestamp=time.time())
            me = peer_spec(mine, self.model_spec())
        except Exception as e:  # no figures of its own: the Petals rule
            logger.warning("could not measure this peer before joining (%s); placing it with the Petals rule", e)
        others = [r for r in await self.fetch_records() if r.peer_id != self.peer_id_str]
        (start, end), rule = join_span(me, self.model_spec(), others, n, max_age=1.5 * self.opts.record_ttl)
        logger.info("placement: blocks %d:%d (%s, at most %d blocks)", start, end, rule, n)
        return start, end

    async def _own_figures(self) -> Tuple[float, float]:
        """This peer's per-block (forward tokens/s, decode steps/s) before its span is chosen: ``--throughput``,
        else measured on a one-block probe (cached per model and device, so loading its span does not measure
        again)."""
        if self.opts.throughput is not None:
            forward_tps = decode_sps = float(self.opts.throughput)
        else:
            def probe():
                return measure_throughput(SpanBackend(self.checkpoint, 0, 1, self.opts.device, self.dtype),
                                          self.model_uid)

            forward_tps, decode_sps = await asyncio.get_running_loop().run_in_executor(self.pool, probe)
        throttle = max(self.opts.throttle, 1.0)
        return forward_tps / throttle, decode_sps / throttle

    @property
    def peer_id_str(self) -> str:
        return self.peer_id.to_base58()

    def capacity(self) -> int:
        """Most blocks this peer holds (``--num-blocks``, else its ``--blocks`` span)."""
        if self.opts.num_blocks is not None:
            return min(self.opts.num_blocks, self.checkpoint.num_blocks)
        if self.opts.blocks is not None:
            return self.opts.blocks[1] - self.opts.blocks[0]
        return self.checkpoint.num_blocks

    def model_spec(self):
        """The partitioner's view of the model (peer/rebalancer.py)."""
        if getattr(self, "_model_spec", None) is None:
            from peer.rebalancer import model_spec_from_config

            size = torch.tensor([], dtype=self.dtype).element_size()
            self._model_spec = model_spec_from_config(self.checkpoint.config, self.checkpoint.num_blocks, size)
        return self._model_spec

    async def heal_gaps(self) -> None:
        """The Petals fallback (used while some peer announces no figures): if some block has no online peer
        and every block of this peer's span has another server, move to the weakest window (which contains the
        gap)."""
        await self._maybe_move()

    async def _maybe_move(self) -> None:
        total = self.checkpoint.num_blocks
        now = time.time()
        others = [
            r for r in await self.fetch_records()
            if r.peer_id != self.peer_id.to_base58() and r.state == "online"
            and now - r.timestamp < self.opts.record_ttl * 1.5
        ]
        coverage = [0] * total
        for r in others:
            for b in range(r.start, min(r.end, total)):
                coverage[b] += 1
        mine = range(self.start_block, self.end_block)
        gaps = [b for b in range(total) if coverage[b] == 0 and b not in mine]
        if not gaps or any(coverage[b] == 0 for b in mine):
            return
        from partitioner.placement import choose_span

        n = self.end_block - self.start_block
        start = choose_span(total, n, [(r.start, r.end, r.decode_sps) for r in others])
        if start == self.start_block:
            return
        await self.move(start, start + n, reason=f"block(s) {gaps} had no peer")

    async def move(self, start: int, end: int, reason: str = "", check=None) -> bool:
        """Serve blocks ``[start, end)`` instead of the current span, make before break: the new span loads on a
        loader thread while the old one keeps serving (blocks both spans hold are not read again: the new span
        shares their tensors, see :class:`SpanBackend`'s ``reuse``); then (unless the coroutine ``check()`` returns
        a reason not to) the peer switches and announces the new span. Sessions open on the old span keep running on it,
        and new ones may still open there for ``move_grace`` seconds (clients that read the record just before);
        the old blocks are dropped once those sessions end, or after ``session_timeout`` (the rest then get a
        'moved' error and re-route). Returns whether the peer moved."""
        old_span = (self.start_block, self.end_block)
        logger.info("moving from blocks %d:%d to %d:%d: %s", *old_span, start, end, reason)
        loop = asyncio.get_running_loop()
        backend = await loop.run_in_executor(  # not the compute thread: open sessions keep being served
            None, lambda: SpanBackend(self.checkpoint, start, end, self.opts.device, self.dtype,
                                      use_graphs=self.opts.cuda_graphs, reuse=self.backend)
        )
        if check is not None:
            why = await check()
            if why:
                logger.info("move to blocks %d:%d called off: %s", start, end, why)
                return False
        old = self.backend
        self._retired[old] = time.time() + self.opts.move_grace
        self.backend, self.start_block, self.end_block = backend, start, end
        await self.announce()
        logger.info("now serving blocks %d:%d; blocks %d:%d stay loaded for %d open sessions", start, end, *old_span,
                    sum(s.backend is old for s in self.sessions.values()))
        t0 = time.monotonic()
        try:
            while True:
                left = [s for s in self.sessions.values() if s.backend is old]
                waited = time.monotonic() - t0
                if not left and waited >= self.opts.move_grace:
                    break
                if waited >= self.opts.session_timeout:
                    logger.info("ending %d sessions still open on blocks %d:%d", len(left), *old_span)
                    for s in left:
                        s.ended.set()
                    break
                await asyncio.sleep(0.1)
        finally:
            self._retired.pop(old, None)
        freed = [b for b in range(*old_span) if not start <= b < end]  # the others are the new span's now
        if freed:
            logger.info("dropped blocks %s after %.1fs", block_ranges(freed), time.monotonic() - t0)
        else:
            logger.info("released the old span %d:%d after %.1fs (the new span holds all its blocks)", *old_span,
                        time.monotonic() - t0)
        return True

    def _backend_for(self, meta) -> SpanBackend:
        """The span a new session opens on: the current one or, within ``move_grace`` of a move, the one the
        peer left, if the requested range lies there (a client may have read the record just before the move)."""
        start, end = meta.get("start"), meta.get("end")
        if isinstance(start, int) and isinstance(end, int) and not self.start_block <= start < end <= self.end_block:
            now = time.time()
            for backend, until in self._retired.items():
                if now < until and backend.start <= start < end <= backend.end:
                    return backend
        return self.backend

    async def fetch_records(self) -> List[PeerRecord]:
        found = await self.dht.get(model_key(self.model_uid), latest=True)
        if found is None or not isinstance(found.value, dict):
            return []
        return parse_records(found.value)

    def record(self) -> PeerRecord:
        backend = self.backend
        block_bytes = backend.parameter_bytes() // max(backend.num_blocks, 1) if backend else 0
        per_token = backend.cache_bytes_per_token() if backend else 0
        return PeerRecord(
            peer_id=self.peer_id.to_base58(), model=self.model_uid, start=self.start_block, end=self.end_block,
            state=self.state, device=self.opts.device.split(":")[0], device_name=_device_name(self.opts.device),
            dtype=str(self.dtype).replace("torch.", ""), forward_tps=self.forward_tps, decode_sps=self.decode_sps,
            free_cache_tokens=self.free_cache_tokens(), max_cache_tokens=self.opts.max_cache_tokens,
            block_memory_bytes=block_bytes, cache_memory_bytes=per_token * self.opts.max_cache_tokens,
            addrs=self.maddrs, network=dict(list(self.network.items())[:16]), version=PROTOCOL_VERSION,
            timestamp=time.time(), max_blocks=self.capacity(), balancing=self.opts.blocks is None or self.opts.balance,
            moving=self.moving_since,
        )

    def free_cache_tokens(self) -> int:
        """KV-cache tokens (batch x length) a new session over the whole span can still reserve.
        ``--max-cache-tokens`` is the capacity of each block; a session over k blocks reserves its tokens in each."""
        n = max(self.end_block - self.start_block, 1)
        return max(self.opts.max_cache_tokens * n - self.reserved_tokens, 0) // n

    async def announce(self) -> bool:
        """Store this peer's signed record under its model's key (and, unless offline, in the swarm's index of
        served models, :data:`protocols.records.MODELS_KEY`). Returns whether the model's record was stored."""
        value = sign_record(self.record(), self.identity)
        expiration = get_dht_time() + self.opts.record_ttl
        stores = [self.dht.store(model_key(self.model_uid), value, expiration, subkey=self.peer_id.to_base58())]
        if self.state != "offline":
            stores.append(self.dht.store(MODELS_KEY, value, expiration, subkey=self.model_uid))
        stored, *index = await asyncio.gather(*stores, return_exceptions=True)
        if isinstance(stored, BaseException):
            raise stored
        if index and isinstance(index[0], Exception):
            logger.debug("could not store the model-index entry: %s", index[0])
        return bool(stored)

    async def _announce_loop(self) -> None:
        while True:
            await asyncio.sleep(self.opts.record_ttl / 3)
            if not daemon_alive(self.p2p):
                logger.error("the libp2p daemon exited: this peer can no longer be reached; stopping")
                self.daemon_lost.set()
                return
            try:
                if not await self.announce():
                    logger.warning("could not store this peer's DHT record; retrying in %.0fs", self.opts.record_ttl / 3)
            except Exception as e:
                logger.warning("announce failed: %s", e)
            if self.opts.initial_peers and (self._rejoin_task is None or self._rejoin_task.done()):
                # in the background: an unreachable bootstrap node must not delay the next announcement
                self._rejoin_task = asyncio.create_task(self._rejoin_initial_peers())

    async def _rejoin_initial_peers(self) -> None:
        try:
            await rejoin_initial_peers(self.dht, self.opts.initial_peers)
        except Exception as e:
            logger.debug("could not re-join the initial peers: %r", e)

    async def shutdown(self) -> None:
        """Announce offline, end every session with a 'moved' error, and stop the transport."""
        if self.p2p is None:  # never joined: nothing to undo
            self.pool.shutdown(wait=False, cancel_futures=True)
            return
        n = len(self.sessions)
        logger.info("peer %s leaving: announcing offline and closing %d session%s", self.peer_id, n, "" if n == 1 else "s")
        self.state = "offline"
        self.leaving.set()
        for t in self._tasks + ([self._rejoin_task] if self._rejoin_task is not None else []):
            t.cancel()
        # p2pd runs in its own session (protocols.transport.create_p2p), so a signal to this process's group leaves it
        # running; if it died anyway (killed on its own), calls into it would only time out: skip them
        alive = daemon_alive(self.p2p)
        if not alive:
            logger.warning("the libp2p daemon is already gone: leaving without announcing offline "
                           "(the record expires within %.0fs)", self.opts.record_ttl)
        elif self.dht is not None:  # every step is still bounded
            try:
                await asyncio.wait_for(self.announce(), timeout=5)
            except Exception as e:
                logger.warning("could not announce offline: %s", e or type(e).__name__)
            await asyncio.sleep(0.2)  # let handlers send their errors
            await _bounded(self.dht.shutdown(), 5, "DHT shutdown")
        if self.p2p is not None:
            await _bounded(self.p2p.shutdown(), 5, "libp2p daemon shutdown")
        if self._identity_file and os.path.exists(self._identity_file):
            os.unlink(self._identity_file)
        self.pool.shutdown(wait=False, cancel_futures=True)
        logger.info("peer %s stopped", self.peer_id)

    # ---------------------------------------------------------------- RPC handlers
    async def rpc_info(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        r = self.record()
        return runtime_pb2.ExpertResponse(metadata=pack(r.to_dict()))

    async def rpc_ping(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        if len(request.metadata) > MAX_PING_BYTES:
            raise ProtocolError(f"ping payload over {MAX_PING_BYTES} bytes")
        return runtime_pb2.ExpertResponse(metadata=pack({"bytes": len(request.metadata)}))

    async def _network_loop(self, period: float = 60.0, max_peers: int = 8) -> None:
        """Measure round-trip time and bandwidth to up to ``max_peers`` other peers of the model, announced in
        this peer's record (``network``) for the partitioner's cost model."""
        import random

        await asyncio.sleep(2.0)
        while True:
            try:
                others = [r for r in await self.fetch_records()
                          if r.peer_id != self.peer_id.to_base58() and r.state == "online"]
                random.shuffle(others)
                measured = {}
                for r in others[:max_peers]:
                    try:
                        pid = PeerID.from_base58(r.peer_id)
                        await ensure_connected(self.p2p, pid, r.addrs)
                        rtt, bw = await measure_link(self.p2p, pid)
                        measured[r.peer_id] = [round(rtt, 6), round(bw, 1)]
                    except Exception as e:
                        logger.debug("could not measure the link to %s: %s", r.peer_id, e)
                self.network = measured
                if measured:
                    logger.info("measured links to %d peers: median round trip %.1f ms", len(measured),
                                1000 * sorted(v[0] for v in measured.values())[len(measured) // 2])
            except Exception as e:
                logger.warning("network measurement failed: %s", e)
            await asyncio.sleep(period)

    def _check_range(self, meta, backend: Optional[SpanBackend] = None) -> Tuple[int, int]:
        lo, hi = (backend.start, backend.end) if backend is not None else (self.start_block, self.end_block)
        start = get_int(meta, "start", lo, hi - 1)
        end = get_int(meta, "end", start + 1, hi)
        return start, end

    def _decode_hidden(self, request, batch_size: Optional[int] = None):
        if not 1 <= len(request.tensors) <= 2:
            raise ProtocolError("expected [hidden_states] or [hidden_states, attention_mask]")
        limit = self.opts.max_chunk_tokens * self.backend.hidden_size * (batch_size or MAX_BATCH)
        hidden = decode_tensor(request.tensors[0], max_numel=limit, ndim=3, dtypes=["float32", "float16", "bfloat16"])
        b, q, h = hidden.shape
        if h != self.backend.hidden_size or q < 1 or b < 1 or (batch_size is not None and b != batch_size):
            raise ProtocolError(
                f"hidden states of shape {list(hidden.shape)} do not fit: expected [{batch_size or 'batch'}, "
                f"tokens >= 1, {self.backend.hidden_size}]"
            )
        if q > self.opts.max_chunk_tokens:
            raise ProtocolError(f"{q} tokens in one message is over this peer's limit of {self.opts.max_chunk_tokens}")
        mask = None
        if len(request.tensors) == 2:
            mask = decode_tensor(request.tensors[1], max_numel=b * q, ndim=2)
            if list(mask.shape) != [b, q]:
                raise ProtocolError(f"attention mask of shape {list(mask.shape)} does not match hidden states [{b}, {q}]")
            mask = mask.to(torch.long)
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ProtocolError("attention mask must hold only 0 and 1")
        return hidden, mask

    @_naming_errors("a forward pass")
    async def rpc_forward(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext):
        async for request in requests:
            meta = unpack(request.metadata)
            start, end = self._check_range(meta)
            hidden, mask = self._decode_hidden(request)
            if mask is None:
                mask = torch.ones(hidden.shape[:2], dtype=torch.long)
            full = None if bool(mask.all()) else mask
            pos = positions_for(mask, torch.zeros(hidden.shape[0], dtype=torch.long))
            out = await asyncio.get_running_loop().run_in_executor(
                self.pool, self._timed, lambda: self.backend.forward(hidden, start=start, end=end, position_ids=pos, attention_mask=full)
            )
            yield runtime_pb2.ExpertResponse(tensors=[encode_tensor(out)])

    def _timed(self, fn):
        if self.opts.throttle <= 1:
            return fn()
        t0 = time.perf_counter()
        out = fn()
        time.sleep((time.perf_counter() - t0) * (self.opts.throttle - 1))
        return out

    def _open_session(self, meta) -> Session:
        session_id = get_str(meta, "session_id", MAX_SESSION_ID)
        if session_id in self.sessions:
            raise ProtocolError(f"session {session_id} is already open on this peer")
        backend = self._backend_for(meta)  # the current span, or the one a move just left (placement code)
        start, end = self._check_range(meta, backend)
        batch_size = get_int(meta, "batch_size", 1, MAX_BATCH)
        limit = int(getattr(self.checkpoint.config, "max_position_embeddings", 1 << 20))
        max_length = get_int(meta, "max_length", 1, 1 << 24)
        if max_length > limit:
            raise ProtocolError(f"max_length {max_length} is over the model's limit of {limit} tokens")
        need = batch_size * max_length * (end - start)
        free = self.opts.max_cache_tokens * (self.end_block - self.start_block) - self.reserved_tokens
        if need > free:
            raise ProtocolError(
                f"not enough KV cache: the session needs {batch_size * max_length} tokens per block "
                f"(batch {batch_size} x max_length {max_length}) and this peer has "
                f"{max(free, 0) // max(end - start, 1)} free"
            )
        session = Session(session_id, start, end, batch_size, max_length, backend.new_cache(batch_size, max_length))
        session.backend = backend
        self.sessions[session_id] = session
        self.reserved_tokens += session.reserved
        logger.info("session %s opened: blocks %d:%d, batch %d, max_length %d", session_id[:8], start, end, batch_size, max_length)
        return session

    def _close_session(self, session: Session) -> None:
        if self.sessions.pop(session.session_id, None) is not None:
            self.reserved_tokens -= session.reserved
            session.cache = None
            logger.info("session %s closed after %d tokens in %d steps, %.1f ms per step computing%s",
                        session.session_id[:8], session.length, session.steps,
                        1e3 * session.compute_s / max(session.steps, 1),
                        f" ({session.pushed_steps} steps from pushes, {session.client_steps} sent by the client)"
                        if session.push_from is not None else "")

    def _run_step(self, session: Session, hidden: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        b, q, _ = hidden.shape
        if mask is None:
            mask = torch.ones(b, q, dtype=torch.long)
        if session.mask is None and not bool(mask.all()):
            session.mask = torch.ones(b, session.length, dtype=torch.long)
        if session.mask is not None:
            session.mask = torch.cat([session.mask, mask], dim=1)
        pos = positions_for(mask, session.real)
        session.real += mask.sum(-1)
        out = session.backend.forward(
            hidden, start=session.start, end=session.end, position_ids=pos, attention_mask=session.mask,
            cache=session.cache,
        )
        session.length += q
        return out

    def _run_steps(self, session: Session, hidden: torch.Tensor, mask: Optional[torch.Tensor], chunks: List[int]):
        outs, offset = [], 0
        for n in chunks:
            part_mask = None if mask is None else mask[:, offset : offset + n]
            outs.append(self._run_step(session, hidden[:, offset : offset + n], part_mask))
            offset += n
        return torch.cat(outs, dim=1)

    async def _stopped(self, session: Optional[Session]) -> None:
        """Resolves when the peer leaves or, for a session, when the peer moves away from its span."""
        waits = [asyncio.ensure_future(self.leaving.wait())]
        if session is not None:
            waits.append(asyncio.ensure_future(session.ended.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def _next_request(self, requests: AsyncIterator, timeout: float, session: Optional[Session] = None,
                            stopped: Optional[asyncio.Future] = None):
        """The next request of a stream, or None at its end. ``stopped`` (from :meth:`_stopped`) is reused
        across requests, so waiting costs one new task per request.

        :raises PeerLeaving: if the peer leaves or moves meanwhile
        :raises TimeoutError: after ``timeout`` seconds without a request
        """
        own = stopped is None
        if own:
            stopped = asyncio.ensure_future(self._stopped(session))
        next_task = asyncio.ensure_future(requests.__anext__())
        try:
            done, _ = await asyncio.wait({next_task, stopped}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if own:
                stopped.cancel()
        if next_task in done:
            try:
                return next_task.result()
            except StopAsyncIteration:
                return None
        next_task.cancel()
        if self.leaving.is_set():
            raise PeerLeaving(f"peer {self.peer_id} is leaving the swarm; moved: continue on another peer")
        if session is not None and session.ended.is_set():
            raise PeerLeaving(f"peer {self.peer_id} moved to blocks {self.start_block}:{self.end_block}; "
                              "continue on another peer")
        raise SessionIdle(f"session closed after {timeout:.0f}s without a request")

    async def _testing_faults(self) -> None:
        self.steps_received += 1
        if self.opts.crash_at_step == self.steps_received:
            logger.warning("crashing on purpose at inference step %d (--crash-at-step)", self.steps_received)
            os.kill(os.getpid(), signal.SIGKILL)
        if self.opts.hang_at_step == self.steps_received:
            logger.warning("going silent on purpose at inference step %d (--hang-at-step)", self.steps_received)
            await asyncio.sleep(3600)

    @_naming_errors("an inference session")
    async def rpc_inference(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext):
        if self.leaving.is_set():
            raise PeerLeaving(f"peer {self.peer_id} is leaving the swarm; moved: continue on another peer")
        request = await self._next_request(requests, self.opts.session_timeout)
        if request is None:
            return
        meta = unpack(request.metadata)
        session = self._open_session(meta)
        self._setup_push(session, meta)
        loop = asyncio.get_running_loop()
        stopped = asyncio.ensure_future(self._stopped(session))
        pushed = False
        try:
            while request is not None:
                if session.ended.is_set():  # a move's old span was dropped before this session ended
                    raise PeerLeaving(f"peer {self.peer_id} moved to blocks {self.start_block}:{self.end_block}; "
                                      "continue on another peer")
                step = meta.get("step")
                if len(request.tensors) == 0 and "outputs" in meta:
                    yield self._kept_outputs(session, meta)
                duplicate = (not pushed and session.push_from is not None and meta.get("replay") is None
                             and isinstance(step, int) and 0 <= step < session.length)  # its push came first
                session.client_steps += not pushed and len(request.tensors) > 0 and meta.get("replay") is None
                if len(request.tensors) > 0 and not duplicate:
                    try:
                        hidden, mask = self._decode_hidden(request, session.batch_size)
                    except ValueError as e:
                        if not pushed:
                            raise
                        logger.debug("session %s: ignored a bad push: %s", session.session_id[:8], e)
                        hidden = None
                if len(request.tensors) > 0 and not duplicate and hidden is not None:
                    await self._testing_faults()
                    session.pushed_steps += pushed
                    q = hidden.shape[1]
                    if session.length + q > session.max_length:
                        raise ProtocolError(
                            f"session {session.session_id[:8]} would hold {session.length + q} tokens, more than "
                            f"its max_length of {session.max_length} tokens declared when it was opened"
                        )
                    chunks = meta.get("replay")
                    if chunks is not None:
                        if (not isinstance(chunks, list) or len(chunks) > MAX_REPLAY_CHUNKS
                                or not all(isinstance(n, int) and n > 0 for n in chunks) or sum(chunks) != q):
                            raise ProtocolError("replay must list positive chunk lengths that add up to the tokens sent")
                    else:
                        chunks = [q]
                    t0 = time.perf_counter()
                    if hidden.shape[0] * hidden.shape[1] <= INLINE_TOKENS and self.opts.throttle <= 1:
                        # a decode step of a few tokens takes about a millisecond: running it here saves two
                        # thread hand-offs, and the event loop is blocked only that long
                        out = self._run_steps(session, hidden, mask, chunks)
                    else:
                        out = await loop.run_in_executor(
                            self.pool, self._timed, lambda: self._run_steps(session, hidden, mask, chunks)
                        )
                    out = out.detach().cpu()
                    encoded = encode_tensor(out)
                    if session.keep_outputs:
                        session.kept.append(out)
                    session.steps += 1
                    session.compute_s += time.perf_counter() - t0
                    pushing = (session.push_to is not None and meta.get("replay") is None and isinstance(step, int)
                               and step >= 0)
                    if pushing:
                        self._push(session, step, encoded, request)
                    # a pushed output the client does not need now stays here until it asks (a failover)
                    omit = pushing and session.keep_outputs and not meta.get("full")
                    if not (omit and session.silent):
                        yield runtime_pb2.ExpertResponse(
                            tensors=[] if omit else [encoded],
                            metadata=pack({"step": meta.get("step", 0), "length": session.length, "pushed": pushing}),
                        )
                if session.push_from is None:
                    request, pushed = await self._next_request(requests, self.opts.session_timeout, session, stopped), False
                else:
                    request, pushed = await self._next_input(requests, session, stopped)
                if request is not None:
                    meta = unpack(request.metadata)
        finally:
            stopped.cancel()
            if session.request_task is not None:
                session.request_task.cancel()
            if session.push_queue is not None:
                session.push_queue.put_nowait(None)
            self._close_session(session)

    def _setup_push(self, session: Session, meta) -> None:
        """Read a session's optional push links (see :mod:`protocols.messages`)."""
        if "push_to" in meta:
            session.push_session = get_str(meta, "push_session", MAX_SESSION_ID)
            try:
                session.push_to = PeerID.from_base58(get_str(meta, "push_to", 128))
            except Exception as e:
                raise ProtocolError(f"push_to must be a peer id: {e}") from None
            addrs = meta.get("push_addrs", [])
            if not isinstance(addrs, list) or len(addrs) > 16 or not all(isinstance(a, str) and len(a) < 512 for a in addrs):
                raise ProtocolError("push_addrs must be a list of at most 16 multiaddrs")
            # the stream opens now, while the first step computes, not on the first step's critical path
            session.push_queue = asyncio.Queue()
            task = asyncio.ensure_future(self._push_stream(session, session.push_queue, addrs))
            self._push_tasks.add(task)
            task.add_done_callback(self._push_tasks.discard)
        if "push_from" in meta:
            session.push_from = get_str(meta, "push_from", 128)
            self._take_early_pushes(session)
        session.keep_outputs = meta.get("keep_outputs") is True
        session.silent = session.keep_outputs and meta.get("silent") is True

    def _kept_outputs(self, session: Session, meta) -> runtime_pb2.ExpertResponse:
        """Answer an outputs request ``{"outputs": [a, b]}`` of a session opened with ``keep_outputs``: the
        outputs of token positions ``a .. b-1`` (``[batch, b - a, hidden]``), e.g. for the client to replay them
        into a replacement for the next peer.

        :raises ProtocolError: if the session keeps no outputs or the range is not within its tokens
        """
        if not session.keep_outputs:
            raise ProtocolError("this session was not opened with keep_outputs: its outputs were not kept")
        held = sum(t.shape[1] for t in session.kept)
        span = meta["outputs"]
        if not (isinstance(span, list) and len(span) == 2 and all(isinstance(x, int) for x in span)
                and 0 <= span[0] < span[1] <= held):
            raise ProtocolError(f"outputs must be [a, b] with 0 <= a < b <= {held} (the tokens this session holds)")
        outputs = torch.cat(session.kept, dim=1)[:, span[0]:span[1]]
        return runtime_pb2.ExpertResponse(tensors=[encode_tensor(outputs)], metadata=pack({"outputs": span}))

    def _push(self, session: Session, step: int, encoded: runtime_pb2.Tensor, request) -> None:
        """Send a step's output (and the step's attention mask, if any) to the session's next peer, in the
        background, over one stream per session (opened when the session opens, closed with it). A failed
        stream stops pushing for this session: the peer then answers with its outputs and the client sends every
        step itself."""
        if self.opts.drop_pushes:
            return
        message = runtime_pb2.ExpertRequest(
            tensors=[encoded, *request.tensors[1:2]], metadata=pack({"session_id": session.push_session, "step": step})
        )
        session.push_queue.put_nowait(message)

    async def _push_stream(self, session: Session, queue: asyncio.Queue, addrs: List[str]) -> None:
        async def messages():
            while True:
                item = await queue.get()
                if item is None:
                    return
                yield item

        try:
            if addrs and session.push_to != self.p2p.peer_id:
                await ensure_connected(self.p2p, session.push_to, addrs)
            outputs = await self.p2p.iterate_protobuf_handler(session.push_to, RPC_PUSH, messages(),
                                                              runtime_pb2.ExpertResponse)
            async for _ in outputs:  # the next peer answers nothing; this ends when the stream does
                pass
        except Exception as e:
            if session.push_to is not None and session.session_id in self.sessions:
                logger.info("session %s: push to %s failed (%s); the client carries its steps",
                            session.session_id[:8], str(session.push_to)[-6:], type(e).__name__)
        finally:
            session.push_to = None

    async def rpc_push(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext):
        """Previous peers' outputs for steps of sessions open here (see :mod:`protocols.messages`); answers
        nothing. A malformed push ends the stream (the client carries those steps)."""
        sender = context.remote_id.to_base58()
        async for request in requests:
            meta = unpack(request.metadata)
            session_id = get_str(meta, "session_id", MAX_SESSION_ID)
            session = self.sessions.get(session_id)
            step = get_int(meta, "step", 0, 1 << 30)
            if session is None:  # its open request may still be on its way from the client: hold it a while
                self._hold_early_push(session_id, sender, step, request)
            elif session.push_from == sender and step >= session.length and len(session.pushed) < 4:
                session.pushed[step] = request
                session.push_event.set()
        return
        yield  # an async generator that yields nothing

    def _hold_early_push(self, session_id: str, sender: str, step: int, request) -> None:
        """Keep a push for a session not open here (yet) for ``EARLY_PUSH_SECONDS``: the previous peer's push
        stream and the client's request that opens the session race, and the push may win. At most
        ``EARLY_PUSHES`` sessions' pushes (4 each) and ``EARLY_PUSH_BYTES`` in all are held; the oldest go first."""
        now = time.monotonic()
        size = request.ByteSize()
        if size <= EARLY_PUSH_BYTES and len(self._early_pushes.get(session_id, ())) < 4:
            self._early_pushes.setdefault(session_id, []).append((now, sender, step, request, size))
            self._early_bytes += size
        while self._early_pushes and (
                len(self._early_pushes) > EARLY_PUSHES or self._early_bytes > EARLY_PUSH_BYTES
                or next(iter(self._early_pushes.values()))[0][0] < now - EARLY_PUSH_SECONDS):
            _, dropped = self._early_pushes.popitem(last=False)
            self._early_bytes -= sum(entry[4] for entry in dropped)

    def _take_early_pushes(self, session: Session) -> None:
        """Give a session that takes pushes the ones that arrived before it opened (from its ``push_from`` only)."""
        held = self._early_pushes.pop(session.session_id, [])
        self._early_bytes -= sum(entry[4] for entry in held)
        for at, sender, step, request, _ in held:
            if sender == session.push_from and at >= time.monotonic() - EARLY_PUSH_SECONDS:
                session.pushed[step] = request
                session.push_event.set()

    async def _next_input(self, requests: AsyncIterator, session: Session, stopped: asyncio.Future):
        """The next input of a session that takes pushes: ``(request, pushed)``, where a push for the session's
        next step wins over a client request not yet received; ``(None, False)`` at the stream's end.

        :raises PeerLeaving: if the peer leaves or moves meanwhile
        :raises TimeoutError: after the session timeout without any input
        """
        timeout = self.opts.session_timeout
        while True:
            for s in [s for s in session.pushed if s < session.length]:
                del session.pushed[s]
            request = session.pushed.pop(session.length, None)
            if request is not None:
                return request, True
            if session.request_task is None:
                session.request_task = asyncio.ensure_future(requests.__anext__())
            session.push_event.clear()
            push_wait = asyncio.ensure_future(session.push_event.wait())
            try:
                done, _ = await asyncio.wait({session.request_task, push_wait, stopped}, timeout=timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                push_wait.cancel()
            if session.request_task in done:
                task, session.request_task = session.request_task, None
                try:
                    return task.result(), False
                except StopAsyncIteration:
                    return None, False
            if push_wait in done:
                continue
            if self.leaving.is_set():
                raise PeerLeaving(f"peer {self.peer_id} is leaving the swarm; moved: continue on another peer")
            if session.ended.is_set():
                raise PeerLeaving(f"peer {self.peer_id} moved to blocks {self.start_block}:{self.end_block}; "
                                  "continue on another peer")
            raise SessionIdle(f"session closed after {timeout:.0f}s without a request")


async def rejoin_initial_peers(node, initial_peers: List[str], timeout: float = 3.0) -> List[str]:
    """Ping each of ``initial_peers`` (multiaddrs ending in ``/p2p/<peer id>``) that the DHT node's routing table
    no longer holds, e.g. a bootstrap node that was restarted: hivemind drops a node that stops answering and never
    asks it again. A node that answers is back in the routing table and adds this one to its own, so the next
    announcement stores the peer's record with it too and a client that bootstraps only from it finds the peer.

    :param node: a running ``hivemind.dht.DHTNode``
    :returns: the peer ids (base58) that answered and were added back
    """
    from hivemind.utils.multiaddr import Multiaddr

    protocol, back = node.protocol, []
    wanted = {}
    for maddr in initial_peers:
        try:
            wanted[PeerID.from_base58(Multiaddr(maddr)["p2p"])] = maddr
        except Exception:  # an address without a peer id: nothing to check
            continue
    lost = [pid for pid in wanted if pid != node.peer_id and protocol.routing_table.get(peer_id=pid) is None]
    if not lost:
        return back
    answers = await asyncio.gather(*(asyncio.wait_for(protocol.call_ping(pid), timeout) for pid in lost),
                                   return_exceptions=True)
    for peer_id, node_id in zip(lost, answers):
        if node_id is not None and not isinstance(node_id, BaseException):
            node.blacklist.register_success(peer_id)
            back.append(peer_id.to_base58())
            logger.info("initial peer %s answers again: re-joined it", wanted[peer_id])
    return back


async def _bounded(coro, timeout: float, what: str) -> None:
    try:
        await asyncio.wait_for(coro, timeout)
    except Exception as e:
        logger.warning("%s did not finish cleanly: %s", what, e or type(e).__name__)


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return platform.processor() or platform.machine()


async def _serve(opts: PeerOptions) -> int:
    peer = Peer(opts)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    quiet_closed_streams(loop)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    try:
        await peer.start()
        print(f"PEER_READY {peer.peer_id} {peer.start_block}:{peer.end_block}", flush=True)
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(peer.daemon_lost.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
    finally:
        await peer.shutdown()
    return 1 if peer.daemon_lost.is_set() else 0


def run_peer(opts: PeerOptions) -> int:
    """Run a peer until SIGTERM/SIGINT. Returns the process exit code."""
    from protocols.transport import start_reaper

    if opts.num_threads:
        torch.set_num_threads(opts.num_threads)
    start_reaper()  # kills p2pd if this process is SIGKILLed; exits by itself after this process
    try:
        import uvloop  # a faster event loop (a hivemind dependency)

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(_serve(opts))
