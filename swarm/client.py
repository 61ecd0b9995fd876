"""The client: holds the embeddings, final norm and LM head, and runs the blocks through a chain of peers.

    model = DistributedModelForCausalLM.from_pretrained("path/or/hub-id", initial_peers=[...])
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=32)   # like transformers

A generation keeps one inference session per peer of its chain for its whole length, so each decode step sends
one token's hidden state per hop and the peers' KV caches do the rest.

Routing: an interactive session takes the lowest-latency chain with KV-cache room (``find_chain``); independent
requests (``forward``, and sessions opened with ``routing="throughput"``) are spread over the chains of the swarm's
max-flow solution in proportion to their flow (``FlowRouter``), so each peer gets the share of requests its speed
and position in the swarm can carry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import threading
import time
import uuid
from collections import Counter
from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from partitioner.route import FlowRouter, Hop, NoRouteError, ServerSpan, find_chain
from protocols import PROTOCOL_VERSION
from protocols.codec import decode_tensor, encode_tensor
from protocols.messages import RPC_FORWARD, RPC_INFERENCE, pack, unpack
from protocols.model_spec import Checkpoint, build_meta_model, resolve_dtype
from protocols.records import MODELS_KEY, PeerRecord, model_key, parse_model_index, parse_records
from protocols.transport import (
    create_dht_node, create_p2p, ensure_connected, ping, quiet_closed_streams, start_reaper,
)

logger = logging.getLogger("swarm.client")


class SwarmError(RuntimeError):
    """A request through the swarm failed (a peer error, no route, or a timeout)."""


class _Network:
    """A libp2p client and DHT node running in a background event-loop thread."""

    def __init__(self, initial_peers: Sequence[str]):
        if not initial_peers:
            raise ValueError("initial_peers is empty: pass the multiaddrs printed by `swarm dht` or `swarm sim up`")
        try:
            import uvloop  # a faster event loop (a hivemind dependency)

            self.loop = uvloop.new_event_loop()
        except ImportError:
            self.loop = asyncio.new_event_loop()
        quiet_closed_streams(self.loop)
        self._thread = threading.Thread(target=self.loop.run_forever, name="swarm-network", daemon=True)
        self._thread.start()
        self.closed = False  # set by shutdown: later calls fail at once instead of waiting on a stopped loop
        self.p2p: Optional[P2P] = None
        self.dht = None
        self._connected: Dict[str, tuple] = {}
        self._rtt: Dict[str, tuple] = {}  # peer id -> (measured at, round-trip time in s)
        self.run(self._start(list(initial_peers)), timeout=60)

    async def _start(self, initial_peers):
        self.p2p = await create_p2p(initial_peers=initial_peers, client_mode=True)
        self.dht = await create_dht_node(self.p2p, initial_peers, client_mode=True)

    def run(self, coro, timeout: Optional[float] = None):
        """Run ``coro`` on the network thread and return its result. If the caller stops waiting (Ctrl-C, or
        ``timeout`` seconds), the coroutine is cancelled rather than left running: an interrupted step must not
        go on to fail, ban its peer and retry in the background."""
        if self.closed or not self._thread.is_alive():
            coro.close()
            raise SwarmError("the client is shut down: create a new DistributedModelForCausalLM")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    async def records(self, model_uid: str, any_version: bool = False) -> List[PeerRecord]:
        """The verified records of ``model_uid``'s peers (of this protocol version unless ``any_version``)."""
        found = await self.dht.get(model_key(model_uid), latest=True)
        if found is None or not isinstance(found.value, dict):
            return []
        return [
            r for r in parse_records(found.value)
            if r.model == model_uid and (any_version or r.version == PROTOCOL_VERSION)
        ]

    async def served_models(self, limit: int = 16) -> Dict[str, int]:
        """The models the swarm's index lists (:data:`MODELS_KEY`), at most ``limit``, each with its number of
        online peers."""
        found = await self.dht.get(MODELS_KEY, latest=True)
        entries = found.value if found is not None and isinstance(found.value, dict) else {}
        uids = sorted(parse_model_index(entries))[:limit]

        async def online(uid):
            return sum(r.state == "online" for r in await self.records(uid))

        return dict(zip(uids, await asyncio.gather(*(online(u) for u in uids))))

    async def connect(self, record: PeerRecord) -> None:
        """Connect to a peer at the addresses of its latest record (they change when it restarts)."""
        addrs = tuple(record.addrs)
        if self._connected.get(record.peer_id) != addrs:
            await ensure_connected(self.p2p, PeerID.from_base58(record.peer_id), record.addrs)
            self._connected[record.peer_id] = addrs

    async def rtts(self, records: Sequence[PeerRecord], max_age: float = 60.0) -> Dict[str, Optional[float]]:
        """Round-trip times to these peers, measured with a ping at most ``max_age`` seconds ago (in parallel,
        1 s timeout); None for a peer that did not answer."""
        now = time.time()

        async def one(r):
            cached = self._rtt.get(r.peer_id)
            if cached and now - cached[0] < max_age:
                return
            try:
                await asyncio.wait_for(self.connect(r), 1.0)
                self._rtt[r.peer_id] = (now, await ping(self.p2p, PeerID.from_base58(r.peer_id), timeout=1.0))
            except Exception:
                self._rtt[r.peer_id] = (now, None)

        await asyncio.gather(*(one(r) for r in records))
        return {r.peer_id: self._rtt[r.peer_id][1] for r in records}

    def shutdown(self):
        async def _stop():
            if self.dht is not None:
                await self.dht.shutdown()
            if self.p2p is not None:
                await self.p2p.shutdown()

        async def _cancel_rest():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(_stop(), timeout=10)
            self.run(_cancel_rest(), timeout=5)
        except Exception as e:
            logger.debug("network shutdown: %s", e)
        self.closed = True
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


class _HopStream:
    """One peer's side of an inference session: a persistent bidirectional stream.

    ``history`` keeps every input this hop was sent, as ``(hidden, mask, tokens)`` in step order, so a
    replacement peer can rebuild the KV cache exactly (same chunks, same positions) if this one fails. ``hidden``
    is None for an input the previous peer pushed here and kept (the client fetches it only for a replay).
    """

    def __init__(self, hop: Hop, record: PeerRecord):
        self.hop, self.record = hop, record
        self.queue: asyncio.Queue = asyncio.Queue()
        self.outputs = None
        self.history: List[tuple] = []
        self.pending_open: Optional[Dict[str, Any]] = None
        self.pushed_into = False  # the previous hop of the chain pushes its outputs here (see _link_for_push)
        self.trust_push = True  # False once a push failed to arrive: the client sends every step itself
        self.last_pushed = False  # this peer pushed its last output to the next hop
        self.keeps_outputs = False  # it keeps its outputs and answers pushed steps without them
        self.pending_answer: Optional[asyncio.Future] = None
        self.silent = False  # it does not answer the steps it pushes (the first hop of a chain, see _link_for_push)
        self.skipped_answers = 0  # answers read past while waiting for another (see _answer)
        self.closing = False

    @property
    def peer_id(self) -> str:
        return self.hop.peer_id

    async def _requests(self):
        while True:
            item = await self.queue.get()
            if item is None:
                return
            yield item

    async def open(self, net: "_Network", meta: Dict[str, Any]) -> None:
        self.net = net
        await net.connect(self.record)
        self.outputs = await net.p2p.iterate_protobuf_handler(
            PeerID.from_base58(self.hop.peer_id), RPC_INFERENCE, self._requests(), runtime_pb2.ExpertResponse
        )
        self.pending_open = dict(meta, start=self.hop.start, end=self.hop.end)

    async def open_session(self) -> None:
        """Open the session on this peer now, with no step (a peer that takes pushes must know the session before
        the first push arrives; until then pushes are ignored and the client carries the step)."""
        meta, self.pending_open = self.pending_open, None
        await self.queue.put(runtime_pb2.ExpertRequest(metadata=pack(meta)))

    def expected_seconds(self, tokens: int) -> float:
        """Expected time of a step of ``tokens`` tokens (batch included) from the peer's announced speed."""
        n = self.hop.end - self.hop.start
        if tokens <= 1:
            return n / max(self.record.decode_sps, 1e-3)
        return n * tokens / max(self.record.forward_tps, 1e-3)

    async def send(self, hidden: Optional[torch.Tensor], mask: Optional[torch.Tensor], timeout: float,
                   extra: Optional[Dict[str, Any]] = None, *, pushed_wait: Optional[float] = None,
                   shape: Optional[Sequence[int]] = None, fetch: Optional[Callable[[], Awaitable[torch.Tensor]]] = None
                   ) -> Optional[torch.Tensor]:
        """Run one step (or a replay) on this peer and return its output ``[batch, new_tokens, hidden]``, or None
        if the peer pushed it to the next peer and kept it (see :meth:`fetch_outputs`).

        :param hidden: the step's input, or None if the previous peer pushed it here and kept it: ``fetch`` then
            gets it from there if the client has to send it (``shape`` gives its shape)
        :param pushed_wait: set when the previous peer pushed this step's input here: the client's own copy is
            sent only if no answer came within this many seconds (and then for every later step)
        :raises _PeerFailed: if the peer fails, answers wrongly or misses ``timeout`` (seconds)
        :raises SwarmError: if the peer refuses the step as the caller's mistake
        """
        meta = dict(self.pending_open or {})
        self.pending_open = None
        meta.update(extra or {})
        shape = list(hidden.shape) if hidden is not None else list(shape)
        if self.silent and not meta.get("full") and meta.get("replay") is None:
            # the peer pushes this step to the next one and does not answer it: if the push does not arrive
            # there, the client fetches the output here (fetch_outputs), which also tells whether this peer failed
            if hidden is None:
                hidden = await fetch()
            await self.queue.put(runtime_pb2.ExpertRequest(tensors=self._tensors(hidden, mask), metadata=pack(meta)))
            self.last_pushed = True
            return None
        # an answer awaited by an earlier call whose input could not be fetched is still this step's answer
        answer = self.pending_answer or asyncio.ensure_future(self.outputs.__anext__())
        self.pending_answer = answer
        if pushed_wait is not None:
            await asyncio.wait({answer}, timeout=pushed_wait)
        lost_push = False
        if not answer.done():
            if pushed_wait is not None:
                self.trust_push, lost_push = False, True
            if hidden is None:
                hidden = await fetch()  # on failure the answer stays pending for the retry of this step
            await self.queue.put(runtime_pb2.ExpertRequest(tensors=self._tensors(hidden, mask), metadata=pack(meta)))
        self.pending_answer = None
        step = meta.get("step")
        response, answer_meta = await self._answer(timeout, lambda m: m.get("step") == step, answer)
        if lost_push:  # said once the step is answered: if a peer failed instead, its failover is the one line
            logger.info("peer %s: a pushed step did not arrive within %.2fs; the client sends every step",
                        self.peer_id[-6:], pushed_wait)
        self.last_pushed = answer_meta.get("pushed") is True
        if not response.tensors and self.last_pushed and self.keeps_outputs:
            return None
        return self._decoded(response, shape, "a step's output")

    async def fetch_outputs(self, first: int, end: int, batch: int, hidden_size: int, timeout: float) -> torch.Tensor:
        """The outputs this peer kept for token positions ``first .. end-1`` of the session:
        ``[batch, end - first, hidden_size]`` (the session was opened with ``keep_outputs``).

        :raises _PeerFailed: if the peer fails or answers wrongly
        """
        answer = asyncio.ensure_future(self.outputs.__anext__())
        await self.queue.put(runtime_pb2.ExpertRequest(metadata=pack({"outputs": [first, end]})))
        response, _ = await self._answer(timeout, lambda m: "outputs" in m, answer)
        return self._decoded(response, [batch, end - first, hidden_size], "kept outputs")

    def _decoded(self, response, shape: List[int], what: str) -> torch.Tensor:
        """The response's tensor, which must have ``shape``. :raises _PeerFailed: if it is missing or misshapen"""
        if not response.tensors:
            raise _PeerFailed(self.peer_id, f"answered without {what}")
        out = decode_tensor(response.tensors[0], max_numel=math.prod(shape), ndim=3)
        if list(out.shape) != shape:
            raise _PeerFailed(self.peer_id, f"returned {what} of shape {list(out.shape)}, expected {shape}")
        return out

    @staticmethod
    def _tensors(hidden: torch.Tensor, mask: Optional[torch.Tensor]) -> List[runtime_pb2.Tensor]:
        return [encode_tensor(hidden)] + ([encode_tensor(mask.to(torch.uint8))] if mask is not None else [])

    async def _answer(self, timeout: float, wanted: Callable[[Dict[str, Any]], bool], answer: asyncio.Future):
        """The first of the stream's next responses whose metadata is ``wanted``, with its metadata; answers to
        steps a silent peer answered although the client did not wait for them (its push had failed) are skipped.
        ``timeout`` (seconds) applies to each response."""
        while True:
            response = await self._response(timeout, answer)
            try:
                meta = unpack(response.metadata) if response.metadata else {}
            except ValueError:
                meta = {}
            if wanted(meta):
                return response, meta
            self.skipped_answers += 1
            answer = asyncio.ensure_future(self.outputs.__anext__())

    async def _response(self, timeout: float, answer: asyncio.Future):
        """The answer ``answer`` (the stream's next response) resolves to, with the peer's errors translated."""
        try:
            return await self._await_response(timeout, answer)
        except StopAsyncIteration:
            raise _PeerFailed(self.peer_id, "closed the stream") from None
        except _PeerFailed:
            raise
        except Exception as e:
            text = str(e)
            if "more than its max_length" in text:  # the caller's mistake: no other peer would accept it
                raise SwarmError(text) from e
            # an idle session closed by the peer is not the peer's fault: reopen it there without a ban
            raise _PeerFailed(self.peer_id, text, ban="without a request" not in text) from e

    async def _await_response(self, timeout: float, task: asyncio.Future):
        """Wait for the next response. A libp2p stream does not always notice that the remote host died while
        a request is in flight, so if the answer is late (3x the expected time, at least 0.2 s) the peer is
        probed with a small unary call every 0.5 s: a dead peer fails the probe at once; a live but silent
        one is given up on at ``timeout``."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        wait = max(0.2, 3 * self.expected_seconds(1))
        try:
            while True:
                remaining = timeout - (loop.time() - started)
                if remaining <= 0:
                    raise _PeerFailed(self.peer_id, f"did not answer within {timeout:.1f}s")
                done, _ = await asyncio.wait({task}, timeout=min(wait, remaining))
                if done:
                    return task.result()
                wait = 0.5
                try:
                    await ping(self.net.p2p, PeerID.from_base58(self.peer_id),
                               timeout=min(1.0, max(remaining, 0.05)))
                except asyncio.TimeoutError:
                    pass  # a busy peer may answer slowly; the step deadline decides
                except Exception as e:
                    raise _PeerFailed(self.peer_id, f"connection lost ({type(e).__name__}: {e})") from e
        finally:
            if not task.done():
                task.cancel()

    def close(self) -> None:
        """End this peer's side of the session (call on the network thread). The stream's remaining answers are
        read and dropped in the background, so the stream is closed on the network thread: a stream never read
        (a silent peer's) was otherwise closed by the garbage collector in whatever thread it ran, and uvloop
        crashed (segmentation fault) when that was not the network thread."""
        self.queue.put_nowait(None)
        if self.outputs is not None and not self.closing:
            self.closing = True
            task = asyncio.ensure_future(self._drain())
            _DRAINS.add(task)
            task.add_done_callback(_DRAINS.discard)

    async def _drain(self, timeout: float = 30.0) -> None:
        if self.pending_answer is not None and not self.pending_answer.done():
            self.pending_answer.cancel()  # the generator closes the stream as the cancellation unwinds it
            return
        try:
            async with asyncio.timeout(timeout):
                async for _ in self.outputs:
                    pass
        except BaseException:  # the peer failed or the stream broke: it is closed either way
            pass
        finally:
            with contextlib.suppress(BaseException):
                await self.outputs.aclose()


_DRAINS: set = set()  # hop streams being drained after their session ended (see _HopStream.close)


class _PeerFailed(Exception):
    def __init__(self, peer_id: str, reason: str, ban: bool = True):
        self.peer_id, self.reason, self.ban = peer_id, reason, ban
        super().__init__(f"peer {peer_id} failed: {reason}")


class _InputLost(Exception):
    """The previous peer, which kept a step's input for this one, failed when the client fetched it."""

    def __init__(self, failure: _PeerFailed):
        self.failure = failure
        super().__init__(str(failure))


def _link_for_push(hops: List["_HopStream"], keep_outputs: bool = True) -> None:
    """Ask each peer of a chain to push its step outputs straight to the next peer (as Petals does): a decode
    step then crosses client -> peer 1 -> peer 2 -> ... -> client, one network leg per hop plus one, instead of a
    round trip to the client per hop. The client sends a step to the next peer itself only if the push does not
    answer in time (:meth:`_HopStream.send`'s ``pushed_wait``), so a decode step costs one message per hop plus
    the answers. A peer computes each step once, from whichever copy arrives first. A pushing peer also keeps its
    outputs and answers pushed steps without them (``keep_outputs``; the chain's first peer, ``silent``, does not
    answer them at all): the client fetches them only when it needs them (a replay into a replacement for the
    next peer, or a push that did not arrive)."""
    for prev, nxt in zip(hops, hops[1:]):
        if prev.pending_open is None or nxt.pending_open is None or prev.peer_id == nxt.peer_id:
            continue
        prev.pending_open["push_to"] = nxt.peer_id
        prev.pending_open["push_session"] = nxt.pending_open["session_id"]
        prev.pending_open["push_addrs"] = list(nxt.record.addrs[:8])
        prev.pending_open["keep_outputs"] = prev.keeps_outputs = keep_outputs
        if prev is hops[0] and keep_outputs:  # its input comes from the client, so it always computes its steps
            prev.pending_open["silent"] = prev.silent = True
        nxt.pending_open["push_from"] = prev.peer_id
        nxt.pushed_into = True


def _fill_missing(history: List[tuple], first: int, tensors: Sequence[torch.Tensor]) -> None:
    """Put ``tensors`` (``[batch, tokens, hidden]`` per step, from step ``first`` on) into ``history``'s missing
    inputs (``(None, mask, tokens)``) of the same token count."""
    for k, t in zip(range(first, len(history)), tensors):
        h, m, n = history[k]
        if h is None and t.shape[1] == n:
            history[k] = (t, m, n)


def _concat_history(history: List[tuple]):
    """Join per-step inputs ``(hidden, mask, tokens)`` (none missing) into one replay message: hidden
    ``[batch, sum(n_i), hidden]``, mask or None, [n_i]."""
    hidden = torch.cat([h for h, _, _ in history], dim=1)
    lengths = [n for _, _, n in history]
    if all(m is None for _, m, _ in history):
        return hidden, None, lengths
    masks = [m if m is not None else torch.ones(h.shape[:2], dtype=torch.long) for h, m, _ in history]
    return hidden, torch.cat(masks, dim=1), lengths


class InferenceSession:
    """A generation's state across the swarm: one KV-cache session on each peer of a chain.

    If a peer fails (its connection resets, it misses its step deadline, or it leaves), the session bans it,
    finds a replacement chain for exactly the blocks it served, replays that hop's past inputs (in the
    original step sizes, so the rebuilt KV cache is bit-identical) and continues; outputs do not change.

    :param max_length: the most tokens (prompt + generated, padding included) this session may hold;
        peers reserve KV cache for it and refuse more
    :param batch_size: sequences generated together
    :param routing: ``"latency"`` (default): the lowest-latency chain with KV-cache room (:func:`find_chain`), for
        interactive use; ``"throughput"``: a chain drawn from the max-flow chains of the peers with KV-cache room, in
        proportion to their flow (:class:`FlowRouter` over announced ``decode_sps``), for many independent
        sessions. Either way a failed hop is replaced by the lowest-latency chain over its blocks.
    :raises ValueError: an unknown ``routing``, a ``max_length`` or ``batch_size`` that is not a whole number of
        at least 1, or a ``max_length`` over the model's ``max_position_embeddings``
    """

    def __init__(self, model: "DistributedModelForCausalLM", max_length: int, batch_size: int = 1,
                 routing: str = "latency"):
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        _check_count("max_length", max_length)
        _check_count("batch_size", batch_size)
        limit = model.max_positions
        if limit is not None and max_length > limit:
            raise ValueError(f"max_length {max_length} is over the model's limit of {limit} tokens "
                             "(max_position_embeddings)")
        self.model, self.max_length, self.batch_size = model, max_length, batch_size
        self.routing = routing
        self.session_id = uuid.uuid4().hex
        self.length = 0
        self.last_tokens: Optional[torch.Tensor] = None  # [batch, 1]: generate's last token, not yet run through
        self.hops: List[_HopStream] = []
        self.closed = False
        self.failovers: List[Dict[str, Any]] = []  # one entry per recovered failure: peer, reason, times
        self.hidden_size = 0  # set by the first step

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _open_meta(self) -> Dict[str, Any]:
        # each stream has its own id: one peer may serve two hops of a session (e.g. after it moved)
        return {"session_id": self.session_id[:16] + uuid.uuid4().hex[:16], "max_length": self.max_length,
                "batch_size": self.batch_size}

    async def _chain(self, start: int, end: int, deadline: float) -> List[_HopStream]:
        """Open streams along the best chain of live, unbanned peers for blocks ``[start, end)``; wait for
        peers (up to ``deadline``) while some block has none."""
        model, net = self.model, self.model.net
        delay, started = 0.2, time.monotonic()
        while True:
            records = await model._online_records()
            candidates = [r for r in records.values() if r.peer_id not in model._banned_ids()
                          and r.end > start and r.start < end]
            rtts = await net.rtts(candidates)
            for pid, rtt in rtts.items():
                if rtt is None:
                    model._ban(pid, "did not answer a ping")
            spans = [ServerSpan(r.peer_id, r.start, r.end, r.decode_sps, r.free_cache_tokens, rtt=rtts.get(r.peer_id))
                     for r in records.values()]
            random.shuffle(spans)  # equally good chains are picked at random, spreading sessions over replicas
            need = self.batch_size * self.max_length
            try:
                if self.routing == "throughput" and (start, end) == (0, model.num_blocks):
                    banned = model._banned_ids()
                    roomy = [sp for sp in spans if sp.free_cache_tokens >= need and sp.peer_id not in banned]
                    chain = model._flow_chain("decode", roomy, banned)
                else:
                    chain = find_chain(spans, start, end, banned=model._banned_ids(), min_cache_tokens=need)
                hops = []
                for h in chain:
                    hop = _HopStream(h, records[h.peer_id])
                    try:
                        await hop.open(net, self._open_meta())
                    except Exception as e:
                        model._ban(h.peer_id, f"cannot open a stream: {e}")
                        for opened in hops:
                            opened.close()
                        raise _PeerFailed(h.peer_id, str(e))
                    hops.append(hop)
                if model.push:
                    _link_for_push(hops, model.keep_outputs)
                return hops
            except (NoRouteError, _PeerFailed) as e:
                busy = False  # live peers serve the blocks, but without room for this session's KV cache
                if isinstance(e, NoRouteError):
                    await model._check_model_served(started)
                    _check_cache_budgets(list(records.values()), start, end, need, self.batch_size, self.max_length)
                    try:
                        find_chain(spans, start, end, banned=model._banned_ids())
                        busy = True
                    except NoRouteError:
                        pass
                if time.monotonic() + delay > deadline:
                    if isinstance(e, NoRouteError):
                        unserved = await model._unserved_after_wait()
                        if unserved is not None:
                            raise unserved from e
                        if busy:
                            raise SwarmError(
                                f"the peers serving blocks {start}:{end} have too little free KV cache for "
                                f"{self.batch_size} x {self.max_length} tokens; try a shorter max_length or later"
                            ) from e
                        raise SwarmError(f"{e} (waited {model.retry_timeout:.0f}s for a peer)") from e
                    raise SwarmError(f"could not build a chain for blocks {start}:{end}: {e}") from e
                model.stats["chain_retries"] += 1
                log = logger.info if delay <= 0.2 else logger.debug  # say it once, not every retry
                reason = (f"the peers serving them have too little free KV cache for {need} tokens per block"
                          if busy else e)
                log("no usable chain for blocks %d:%d yet (%s); retrying until %.0fs have passed", start, end, reason,
                    model.retry_timeout)
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 2.0)

    async def _replace(self, index: int, deadline: float) -> Tuple[int, List[tuple]]:
        """Replace hop ``index`` (closed by the caller) by a new chain over the same blocks and replay its history
        into it. Inputs that the previous peer kept are fetched first (:meth:`_fill_history`, which replaces that
        peer too if it is gone). The replay's outputs fill the next hop's missing inputs, since the old peer's
        kept outputs are gone with it.

        :returns: the index of the hop after the new chain, and the replay's outputs as ``(hidden, mask, tokens)``
            per history step (empty if the hop had no history)
        :raises SwarmError: if no replacement can be found and replayed before ``deadline``
        """
        index = await self._fill_history(index, deadline)
        old = self.hops[index]
        while True:
            new_hops = await self._chain(old.hop.start, old.hop.end, deadline)
            inputs = list(old.history)
            try:
                for hop in new_hops:
                    if inputs:
                        hidden, mask, lengths = _concat_history(inputs)
                        timeout = self.model.step_timeout_for(hop, hidden.shape[0] * hidden.shape[1])
                        out = await hop.send(hidden, mask, timeout, {"replay": lengths, "step": -1})
                        hop.history = list(inputs)
                        inputs = [(o, m, n) for o, (_, m, n) in zip(out.split(lengths, dim=1), inputs)]
                break
            except _PeerFailed as e:
                if e.ban:
                    self.model._ban(e.peer_id, e.reason)
                for hop in new_hops:
                    hop.close()
                if time.monotonic() > deadline:
                    raise SwarmError(f"replay to a replacement for blocks {old.hop.start}:{old.hop.end} failed: {e}")
        self.hops[index:index + 1] = new_hops
        after = index + len(new_hops)
        if after < len(self.hops):
            _fill_missing(self.hops[after].history, 0, [o for o, _, _ in inputs])
        return after, inputs

    async def _fill_history(self, index: int, deadline: float) -> int:
        """Fetch the inputs of hop ``index``'s history that the previous peer pushed and kept. If that peer is
        gone it is replaced first, and its replay gives them.

        :returns: hop ``index``'s index afterwards (it moves if the previous hop became a chain of several)
        """
        history = self.hops[index].history
        missing = [k for k, (h, _, _) in enumerate(history) if h is None]
        if not missing:
            return index
        lengths = [n for _, _, n in history]
        try:
            outs = await self._fetch_kept(index, sum(lengths[:missing[0]]), sum(lengths))
        except _PeerFailed as e:  # the previous peer is gone: its replacement's replay fills them
            return (await self._fail_over(index - 1, e, deadline))[0]
        _fill_missing(history, missing[0], outs.split(lengths[missing[0]:], dim=1))
        return index

    async def _fetch_kept(self, index: int, first: int, end: int) -> torch.Tensor:
        """The outputs of token positions ``first .. end-1`` that hop ``index - 1`` pushed to hop ``index`` and
        kept: ``[batch, end - first, hidden]``. :raises _PeerFailed: if that peer fails"""
        prev = self.hops[index - 1]
        out = await prev.fetch_outputs(first, end, self.batch_size, self.hidden_size,
                                       self.model.step_timeout_for(prev, self.batch_size * (end - first)))
        self.model.stats["outputs_fetched"] += 1
        return out

    async def _fail_over(self, index: int, e: "_PeerFailed", deadline: float) -> Tuple[int, List[tuple]]:
        """Hop ``index`` failed (``e``): ban its peer (if ``e.ban``), close it, replace it (:meth:`_replace`) and
        record the failover. :returns: what :meth:`_replace` returns"""
        hop = self.hops[index]
        failed_at = time.time()
        if e.ban:
            self.model._ban(e.peer_id, e.reason, log=False)
        hop.close()
        # one line per failure, the ban included; an idle session the peer closed (its --session-timeout) is
        # routine: INFO, a failure is a warning
        logger.log(logging.WARNING if e.ban else logging.INFO, "session %s: %s; %s blocks %d:%d%s",
                   self.session_id[:8], e, "replacing" if e.ban else "reopening", hop.hop.start, hop.hop.end,
                   self.model._ban_note() if e.ban else "")
        replaced = await self._replace(index, deadline)
        self.model.stats["failovers"] += 1
        self.failovers.append({"peer_id": e.peer_id, "reason": e.reason, "detected_at": failed_at,
                               "recovered_at": time.time(), "blocks": (hop.hop.start, hop.hop.end)})
        return replaced

    async def _step(self, hidden: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        deadline = time.monotonic() + self.model.retry_timeout
        if not self.hops:
            self.hops = await self._chain(0, self.model.num_blocks, deadline)
            for hop in self.hops[1:]:
                if hop.pushed_into and self.hops[0].keeps_outputs:
                    await hop.open_session()  # before the first push arrives there
            logger.info("session %s: chain %s", self.session_id[:8],
                        " -> ".join(f"{h.peer_id[-6:]}[{h.hop.start}:{h.hop.end}]" for h in self.hops))
        shape = list(hidden.shape)
        self.hidden_size = shape[2]
        tokens = shape[0] * shape[1]
        i = 0
        while i < len(self.hops):
            hop = self.hops[i]
            fetched = []

            async def fetch(i=i):  # this step's input, kept by the previous peer (which pushed it)
                try:
                    out = await self._fetch_kept(i, self.length, self.length + shape[1])
                except _PeerFailed as e:
                    raise _InputLost(e) from None
                fetched.append(out)
                return out

            try:
                timeout = self.model.step_timeout_for(hop, tokens)
                pushed_wait = None
                if (i > 0 and hop.pending_open is None and hop.pushed_into and hop.trust_push
                        and self.hops[i - 1].last_pushed):
                    # the session's first push may still wait for its stream to open
                    prev = self.hops[i - 1]  # a silent one's step time is not awaited separately
                    expected = hop.expected_seconds(tokens) + (prev.expected_seconds(tokens) if prev.silent else 0.0)
                    pushed_wait = max(0.25 if hop.history else 1.0, 4 * expected)
                extra = {"step": self.length}
                if i + 1 < len(self.hops) and not (self.hops[i + 1].pushed_into and self.hops[i + 1].trust_push):
                    extra["full"] = True  # the next peer does not take this one's pushes: the client carries them
                out = await hop.send(hidden, mask, timeout, extra, pushed_wait=pushed_wait, shape=shape, fetch=fetch)
                self.model.stats["lost_pushes"] += pushed_wait is not None and not hop.trust_push
            except _InputLost as e:  # the previous peer failed: replace it; its replay gives this step's input
                i, outputs = await self._fail_over(i - 1, e.failure, deadline)
                hidden = outputs[-1][0]  # the previous hop's history ends with this step
                continue
            except _PeerFailed as e:
                await self._fail_over(i, e, deadline)
                continue
            hop.history.append((fetched[0] if fetched else hidden, mask, shape[1]))
            hidden = out
            i += 1
        if hidden is None:
            raise SwarmError("the last peer of the chain answered without its output")
        return hidden

    def step(self, hidden: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run new tokens' hidden states through all blocks, extending every peer's KV cache.

        :param hidden: ``[batch, new_tokens, hidden_size]``
        :param attention_mask: ``[batch, new_tokens]`` (1 real, 0 left padding), or None if no padding
        :returns: ``[batch, new_tokens, hidden_size]``, the last block's output
        :raises ValueError: if the session would hold more than ``max_length`` tokens
        :raises SwarmError: if the swarm cannot serve the step before the client's ``retry_timeout``
        """
        if self.closed:
            raise SwarmError("the inference session is closed")
        b, q, _ = hidden.shape
        if b != self.batch_size:
            raise ValueError(f"batch of {b} sequences does not match the session's batch_size {self.batch_size}")
        if self.length + q > self.max_length:
            raise ValueError(
                f"the session would hold {self.length + q} tokens, more than its max_length of {self.max_length}"
            )
        device = hidden.device
        out = self.model.net.run(self._step(hidden.cpu(), None if attention_mask is None else attention_mask.cpu()))
        out = out.to(device)
        self.length += q
        now = time.time()
        for f in self.failovers:
            f.setdefault("next_token_at", now)
        return out

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True

        async def _close():
            for hop in self.hops:
                hop.close()

        try:
            self.model.net.run(_close(), timeout=5)
        except Exception:
            pass


ROUTINGS = ("latency", "throughput")
SMALL_HEAD_MACS = 64 * 2**20  # an LM head this small per step runs on one client thread (see threads_for)

# a peer's refusal that is the request's fault on that peer (e.g. its message-size limit): skip it for this call
_REFUSALS = ("over this peer's limit", "do not fit", "attention mask")


class DistributedModelForCausalLM:
    """A causal LM whose blocks live in the swarm; ``generate`` works like ``transformers``' ``generate``.

    Use :meth:`from_pretrained`. Only the embeddings, final norm and LM head are loaded here.

    During ``generate`` on a CPU, the client's own compute runs with :meth:`threads_for` torch threads
    (``client_threads``: ``"auto"`` by default, one thread for a small LM head; torch's setting is restored after,
    and it is process-wide meanwhile).

    A request waits up to ``retry_timeout`` seconds for peers of missing blocks, then raises :class:`SwarmError`
    naming them. If the DHT has no record at all of this model while it lists other models (the swarm serves
    something else: another checkpoint, or the same one under another folder name), and this client never saw
    one, it raises after ``unknown_model_timeout`` seconds instead: "no peer serves model X; the swarm serves:
    Y (N peers online)".
    """

    def __init__(self, checkpoint: Checkpoint, initial_peers: Sequence[str], *, dtype: str = "auto",
                 device: str = "cpu", retry_timeout: float = 60.0, min_step_timeout: float = 3.0, step_timeout_factor: float = 20.0,
                 ban_seconds: float = 30.0, push: bool = True, unknown_model_timeout: float = 3.0,
                 client_threads: Union[int, str, None] = "auto"):
        if not (client_threads in ("auto", None) or (isinstance(client_threads, int) and client_threads >= 1)):
            raise ValueError(f"client_threads must be 'auto', None or a whole number >= 1, got {client_threads!r}")
        self.client_threads = client_threads
        self.checkpoint = checkpoint
        # a model the DHT has no record of while it lists other models is not coming: fail after this many seconds
        self.unknown_model_timeout = unknown_model_timeout
        self.seen_records = False  # some lookup found a record of this model
        self.push = push  # peers of a chain send their outputs straight to the next peer (see _link_for_push)
        # and keep them instead of sending them back: the client fetches one only for a failover or a lost push
        self.keep_outputs = True
        self.config = checkpoint.config
        self.model_uid = checkpoint.model_uid
        self.num_blocks = checkpoint.num_blocks
        self.dtype = resolve_dtype(dtype, self.config)
        self.retry_timeout = retry_timeout
        self.min_step_timeout, self.step_timeout_factor = min_step_timeout, step_timeout_factor
        self.step_timeout = max(min_step_timeout, 30.0)  # for requests without a known expected time
        self.ban_seconds = ban_seconds
        self._bans: Dict[str, tuple] = {}  # peer id -> (banned at, reason)
        # over this client's life: failed hops recovered, waits for a usable chain, peers banned
        # forward_retries: forward hops re-sent after a failure; router_builds: max-flow solves for FlowRouter
        self.stats: Dict[str, int] = {"failovers": 0, "chain_retries": 0, "bans": 0, "lost_pushes": 0,
                                      "outputs_fetched": 0, "forward_retries": 0, "router_builds": 0}
        self.forward_served: Counter = Counter()  # peer id -> forward hops it answered (see forward)
        self.last_forward_chain: List[Hop] = []  # the hops that computed the last forward's output
        self._routers: Dict[str, tuple] = {}  # figure ("forward"/"decode") -> (key of the spans, FlowRouter)
        meta = build_meta_model(self.config)
        base = meta.base_model
        prefix = meta.base_model_prefix
        names = {f"{prefix}.embed_tokens.weight": base.embed_tokens, f"{prefix}.norm.weight": base.norm}
        state = checkpoint.read_tensors(list(names))
        base.embed_tokens.load_state_dict({"weight": state[f"{prefix}.embed_tokens.weight"]}, assign=True)
        base.norm.load_state_dict({"weight": state[f"{prefix}.norm.weight"]}, assign=True)
        if checkpoint.tensor_names(["lm_head.weight"]) and not getattr(self.config, "tie_word_embeddings", False):
            head = checkpoint.read_tensors(["lm_head.weight"])["lm_head.weight"]
        else:
            head = base.embed_tokens.weight
        meta.lm_head.load_state_dict({"weight": head}, assign=True)
        self.device = torch.device(device)
        self.embed_tokens = base.embed_tokens.to(self.device, self.dtype).eval().requires_grad_(False)
        self.norm = base.norm.to(self.device, self.dtype).eval().requires_grad_(False)
        self.lm_head = meta.lm_head.to(self.device, self.dtype).eval().requires_grad_(False)
        self.generation_config = _load_generation_config(checkpoint)
        self._start_reaper()
        self.net = _Network(initial_peers)

    _reaper = None

    def threads_for(self, batch: int) -> int:
        """Torch threads for this client's own compute during a ``generate`` of ``batch`` sequences (embeddings,
        final norm, LM head): ``client_threads`` if a number; with ``"auto"``, 1 if the LM head's multiply-adds per
        step (``batch x hidden x vocabulary``) are at most ``SMALL_HEAD_MACS``, else torch's setting; with None,
        torch's setting.

        Why: between its short computations the client waits for the swarm, and OpenMP's idle threads busy-wait for
        milliseconds after each parallel operation, each taking a core from whatever else runs on the machine (in
        a local swarm, the peers). For a small head one core is as fast: the default model's head at batch 4 took
        6.71 ms on one thread and 6.64 ms on two on a 2-core machine, and its swarm steps took 15% less time with
        one client thread (18.6 against 22.0 ms, ``make bench``'s swarm)."""
        if isinstance(self.client_threads, int):
            return self.client_threads
        if self.client_threads == "auto":
            macs = batch * self.lm_head.in_features * self.lm_head.out_features
            if macs <= SMALL_HEAD_MACS:
                return 1
        return torch.get_num_threads()

    def step_timeout_for(self, hop: _HopStream, tokens: int) -> float:
        """A step's deadline: ``step_timeout_factor`` times the peer's expected time, at least
        ``min_step_timeout`` seconds; a silent peer is declared failed after it."""
        return max(self.min_step_timeout, self.step_timeout_factor * hop.expected_seconds(tokens))

    def _ban(self, peer_id: str, reason: str, log: bool = True) -> None:
        """Route around ``peer_id`` for ``ban_seconds``; ``log=False`` where the caller's own line says so
        (:meth:`_ban_note`), so that one failure is one log line."""
        if log:
            logger.info("not using peer %s for %.0fs: %s", peer_id, self.ban_seconds, reason)
        self.stats["bans"] += 1
        self._bans[peer_id] = (time.time(), reason)

    def _ban_note(self) -> str:
        return f" (not using the peer for {self.ban_seconds:.0f}s)"

    def _banned_ids(self) -> set:
        now = time.time()
        return {p for p, (t, _) in self._bans.items() if now - t < self.ban_seconds}

    def _unban_restarted(self, records) -> None:
        """A banned peer that announced itself again after the ban (a restart) is trusted again."""
        for r in records:
            ban = self._bans.get(r.peer_id)
            if ban is not None and r.timestamp > ban[0] + 0.5:
                del self._bans[r.peer_id]

    async def _online_records(self) -> Dict[str, PeerRecord]:
        """The online peers' records of this model by peer id (noting that some record of it was seen, and lifting
        the bans of peers that restarted since)."""
        found = await self.net.records(self.model_uid)
        self.seen_records = self.seen_records or bool(found)
        records = {r.peer_id: r for r in found if r.state == "online"}
        self._unban_restarted(records.values())
        return records

    async def _unserved_after_wait(self) -> Optional[SwarmError]:
        """After ``retry_timeout`` without a route: :meth:`_unserved_model_error`'s error if this client never saw a
        record of its model, else None."""
        return None if self.seen_records else await self._unserved_model_error(waited=self.retry_timeout)

    async def _unserved_model_error(self, waited: Optional[float] = None) -> Optional[SwarmError]:
        """If the DHT holds no record at all of this model, an error that names the models the swarm does serve
        (with ``waited``, the seconds spent waiting, also when it serves none); else None.

        Without ``waited`` the error is only returned if other models are served: then no peer of this model has
        even joined (a joining peer announces itself before loading its blocks), so waiting would not help.
        """
        if await self.net.records(self.model_uid, any_version=True):
            return None
        served = await self.net.served_models()
        served.pop(self.model_uid, None)
        if not served and waited is None:
            return None
        name = self.checkpoint.name
        what = f"model {self.model_uid}" + (f" ({name})" if name != self.model_uid else "")
        if not served:
            return SwarmError(f"no peer serves {what}, and the swarm serves no model yet (waited {waited:.0f}s)")
        listed = ", ".join(f"{uid} ({n} peer{'s' if n != 1 else ''} online)" for uid, n in served.items())
        text = f"no peer serves {what}; the swarm serves: {listed}"
        digest = self.model_uid.rsplit("-", 1)[-1]
        same = [uid for uid in served if uid.rsplit("-", 1)[-1] == digest]
        if same:  # the same checkpoint under another name: an id is the folder's name + a hash of config and weights
            text += (f". {same[0]} has the same config and weights: a model's id is its checkpoint folder's name plus "
                     f"a hash of its config and weights, so load the checkpoint from a folder named as the peers' one")
        return SwarmError(text)

    async def _check_model_served(self, started: float) -> None:
        """Raise :meth:`_unserved_model_error`'s error once ``unknown_model_timeout`` seconds have passed since
        ``started`` (monotonic), if this client has never seen a record of its model (a client that has, e.g. one
        whose peers all restart, waits up to ``retry_timeout`` as usual)."""
        if self.seen_records or time.monotonic() - started < self.unknown_model_timeout:
            return
        error = await self._unserved_model_error()
        if error is not None:
            raise error

    @classmethod
    def _start_reaper(cls):
        if DistributedModelForCausalLM._reaper is None:
            DistributedModelForCausalLM._reaper = start_reaper()

    @classmethod
    def from_pretrained(cls, model: str, initial_peers: Sequence[str], **kwargs) -> "DistributedModelForCausalLM":
        """Load the client side of ``model`` (a local path or hub id) and connect to the swarm.

        :raises ModelSpecError: unknown or unsupported model
        :raises ValueError: empty ``initial_peers``
        """
        return cls(Checkpoint(model), initial_peers, **kwargs)

    def shutdown(self) -> None:
        self.net.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    def inference_session(self, max_length: int, batch_size: int = 1, routing: str = "latency") -> InferenceSession:
        """Open a session that can hold ``max_length`` tokens per sequence (see :class:`InferenceSession`;
        ``routing`` is ``"latency"`` or ``"throughput"``).

        :raises ValueError: ``max_length`` or ``batch_size`` below 1 (or not a whole number), ``max_length`` over the
            model's ``max_position_embeddings``, or an unknown ``routing``
        """
        return InferenceSession(self, max_length, batch_size, routing=routing)

    @property
    def max_positions(self) -> Optional[int]:
        """The most tokens a sequence may hold (the config's ``max_position_embeddings``), or None if unset."""
        limit = getattr(self.config, "max_position_embeddings", None)
        return int(limit) if limit else None

    def _flow_chain(self, figure: str, spans: Sequence[ServerSpan], banned=()) -> List[Hop]:
        """The next chain of the :class:`FlowRouter` over ``spans`` (live, unbanned peers whose ``decode_sps``
        field holds the per-block figure named by ``figure``). The router (one max-flow solve) is cached and
        rebuilt only when the peers, their spans or their figures change, so its smooth round-robin keeps its
        state across calls. If no peer announces a positive figure, falls back to :func:`find_chain`.

        :raises NoRouteError: naming the blocks no peer in ``spans`` serves (or none, if every chain goes through
            a ``banned`` peer)
        """
        key = tuple(sorted((sp.peer_id, sp.start, sp.end, round(sp.decode_sps, 6)) for sp in spans))
        cached = self._routers.get(figure)
        if cached is None or cached[0] != key:
            router = FlowRouter.from_spans(sorted(spans, key=lambda sp: sp.peer_id), self.num_blocks)
            self.stats["router_builds"] += 1
            cached = self._routers[figure] = (key, router)
        if len(cached[1]) == 0:
            return find_chain(spans, 0, self.num_blocks, banned=banned)
        return cached[1].pick(banned)

    def peers(self) -> List[PeerRecord]:
        """The verified DHT records of the peers serving this model."""
        return self.net.run(self.net.records(self.model_uid), timeout=30)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits for every position, computed through the swarm without a KV cache (one ``swarm.forward`` request
        per hop).

        Each call is an independent request: it goes through the next chain of a :class:`FlowRouter` over the
        live, unbanned peers, so calls are spread over replicas in proportion to the max flow of the swarm. The
        flow is solved on each peer's announced ``forward_tps`` (tokens/s through one block in a forward pass of
        many tokens, the work a forward call does; ``decode_sps`` measures one-token steps), with no network limit.
        A hop that fails (connection error, an error from the peer, or no answer within ``step_timeout_factor``
        times its expected time, at least ``min_step_timeout`` s) bans the peer and the call continues from the
        last block boundary it reached, on the next chain that avoids the banned peers (a peer that refuses the
        request as too large is only skipped for this call). ``forward_served`` counts the hops each peer
        answered; ``last_forward_chain`` holds the hops that computed this call's output.

        :param input_ids: ``[batch, tokens]``
        :param attention_mask: ``[batch, tokens]``, 0 for left padding
        :returns: ``[batch, tokens, vocab_size]`` float32 logits
        :raises ValueError: ``input_ids`` not ``[batch >= 1, tokens >= 1]``, longer than the model's
            ``max_position_embeddings``, or an ``attention_mask`` of another shape
        :raises SwarmError: if no chain serves the call before ``retry_timeout`` seconds, or every peer able to
            serve it refused the request
        """
        if input_ids.ndim != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be [batch >= 1, tokens >= 1], got shape {list(input_ids.shape)}")
        limit = self.max_positions
        if limit is not None and input_ids.shape[1] > limit:
            raise ValueError(f"{input_ids.shape[1]} tokens are over the model's limit of {limit} tokens "
                             "(max_position_embeddings)")
        _check_mask(input_ids, attention_mask)
        hidden = self.embed_tokens(input_ids.to(self.device)).cpu()
        mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.long().cpu()
        hidden = self.net.run(self._forward(hidden, mask), timeout=self.retry_timeout + self.step_timeout * 4)
        return self.lm_head(self.norm(hidden.to(self.device))).float().cpu()

    async def _forward(self, hidden: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Run ``hidden`` ``[batch, tokens, hidden_size]`` through all blocks (see :meth:`forward`)."""
        deadline = time.monotonic() + self.retry_timeout
        reached = {0: hidden}  # block boundary -> hidden states after the blocks before it
        made_by: Dict[int, Hop] = {}  # block boundary -> the hop that computed reached[boundary]
        skip: set = set()  # peers that refused this call's request (not banned)
        delay, last_error, started = 0.2, None, time.monotonic()
        while True:
            records = await self._online_records()
            banned = self._banned_ids()
            spans = [ServerSpan(r.peer_id, r.start, r.end, r.forward_tps) for r in records.values()
                     if r.peer_id not in banned]
            try:
                chain = self._flow_chain("forward", spans, banned | skip)
            except NoRouteError as e:
                if skip:  # the request itself was refused: waiting would not help
                    raise SwarmError(f"forward: no chain avoids the peers that refused the request ({last_error})") from e
                await self._check_model_served(started)
                if time.monotonic() + delay > deadline:
                    unserved = await self._unserved_after_wait()
                    if unserved is not None:
                        raise unserved from e
                    raise SwarmError(f"forward: {last_error or e} (waited {self.retry_timeout:.0f}s for a peer)") from e
                self.stats["chain_retries"] += 1
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 2.0)
                continue
            first = max(i for i, h in enumerate(chain) if h.start in reached)  # resume where a failed try stopped
            try:
                for hop in chain[first:]:
                    reached[hop.end] = await self._forward_hop(records[hop.peer_id], hop, reached[hop.start], mask)
                    made_by[hop.end] = hop
                    self.forward_served[hop.peer_id] += 1
                hops, b = [], self.num_blocks
                while b > 0:
                    hops.append(made_by[b])
                    b = made_by[b].start
                self.last_forward_chain = hops[::-1]
                return reached[self.num_blocks]
            except _PeerFailed as e:
                last_error = e
                if e.ban:
                    self._ban(e.peer_id, e.reason, log=False)
                else:
                    skip.add(e.peer_id)
                self.stats["forward_retries"] += 1
                logger.warning("forward: %s; retrying on another chain%s", e, self._ban_note() if e.ban else "")
                if time.monotonic() > deadline:
                    raise SwarmError(f"forward failed: {e}") from e

    async def _forward_hop(self, record: PeerRecord, hop: Hop, hidden: torch.Tensor,
                           mask: Optional[torch.Tensor]) -> torch.Tensor:
        """One ``swarm.forward`` request: blocks ``[hop.start, hop.end)`` of ``hidden`` ``[batch, tokens, hidden]``;
        returns the output, same shape.

        :raises _PeerFailed: on a connection error, a peer error, a late or malformed answer
        """
        n, tokens = hop.end - hop.start, hidden.shape[0] * hidden.shape[1]
        timeout = max(self.min_step_timeout, self.step_timeout_factor * n * tokens / max(record.forward_tps, 1e-3))
        tensors = [encode_tensor(hidden)] + ([encode_tensor(mask.to(torch.uint8))] if mask is not None else [])
        req = runtime_pb2.ExpertRequest(tensors=tensors, metadata=pack({"start": hop.start, "end": hop.end}))
        try:
            await asyncio.wait_for(self.net.connect(record), timeout)
            resp = await asyncio.wait_for(self.net.p2p.call_protobuf_handler(
                PeerID.from_base58(hop.peer_id), RPC_FORWARD, _aiter([req]), runtime_pb2.ExpertResponse
            ), timeout)
            out = decode_tensor(resp.tensors[0], max_numel=hidden.numel(), ndim=3)
        except asyncio.TimeoutError:
            raise _PeerFailed(hop.peer_id, f"did not answer a forward within {timeout:.1f}s") from None
        except Exception as e:
            text = f"{type(e).__name__}: {e}"
            raise _PeerFailed(hop.peer_id, text, ban=not any(r in text for r in _REFUSALS)) from e
        if out.shape != hidden.shape:
            raise _PeerFailed(hop.peer_id, f"returned shape {list(out.shape)}, expected {list(hidden.shape)}")
        return out

    __call__ = forward

    @torch.inference_mode()
    def generate(
        self,
        input_ids: Optional[torch.Tensor],
        attention_mask: Optional[torch.Tensor] = None,
        *,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        repetition_penalty: Optional[float] = None,
        streamer: Any = None,
        eos_token_id: Optional[Any] = None,
        pad_token_id: Optional[int] = None,
        session: Optional[InferenceSession] = None,
        generator: Optional[torch.Generator] = None,
        routing: str = "latency",
    ) -> torch.Tensor:
        """Generate tokens like ``transformers``' ``generate``: greedy by default, or sampling.

        :param input_ids: ``[batch, prompt_tokens]``, left-padded if prompts have different lengths
        :param attention_mask: ``[batch, prompt_tokens]``, 0 marks padding
        :param max_new_tokens: tokens to generate per sequence
        :param streamer: an object with ``put(tensor)`` and ``end()`` (e.g. ``transformers.TextStreamer``)
        :param session: an open :class:`InferenceSession` to continue; if None a new one is opened and closed. A
            session that generated before first runs the last token it generated (which no step has carried yet),
            then ``input_ids``, so a conversation continues exactly as one long ``transformers`` generation; with
            such a session ``input_ids`` may be None (continue from that token alone)
        :param routing: the chain of a new session: ``"latency"`` (interactive, the default) or ``"throughput"``
            (see :class:`InferenceSession`); ignored when ``session`` is given
        :returns: ``[batch, prompt_tokens + generated]`` token ids (fewer than ``max_new_tokens`` if every
            sequence reached an end-of-sequence token; finished sequences are filled with ``pad_token_id``)
        :raises ValueError: if ``max_new_tokens`` is below 1, ``attention_mask`` is not shaped like ``input_ids``,
            the prompt plus ``max_new_tokens`` is longer than the session's max_length (or, for a new session, the
            model's ``max_position_embeddings``), or an unknown ``routing``
        :raises SwarmError: if the swarm cannot serve the request
        """
        _check_count("max_new_tokens", max_new_tokens)
        pending = session.last_tokens if session is not None else None
        if input_ids is None:
            if pending is None:
                raise ValueError("input_ids is None: pass a prompt, or a session that has generated before")
            input_ids = pending.new_zeros((pending.shape[0], 0))
            attention_mask = None
        elif input_ids.ndim != 2 or input_ids.shape[0] < 1 or (input_ids.shape[1] < 1 and pending is None):
            raise ValueError(f"input_ids must be [batch >= 1, tokens >= 1], got shape {list(input_ids.shape)}")
        batch, prompt_len = input_ids.shape
        _check_mask(input_ids, attention_mask)
        if pending is not None and pending.shape[0] != batch:
            raise ValueError(f"batch of {batch} sequences does not match the session's batch of {pending.shape[0]}")
        gc = self.generation_config
        eos = eos_token_id if eos_token_id is not None else gc.get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        pad = pad_token_id if pad_token_id is not None else gc.get("pad_token_id")
        if pad is None:
            pad = eos[0] if eos else 0
        own_session = session is None
        if own_session:
            session = self.inference_session(prompt_len + max_new_tokens, batch, routing=routing)
        carried = 0 if pending is None else 1
        needed = session.length + carried + prompt_len + max_new_tokens - 1
        if needed > session.max_length:
            raise ValueError(
                f"generating {max_new_tokens} tokens after a {prompt_len}-token prompt needs a session of "
                f"{needed} tokens, but the session's max_length is {session.max_length}"
            )
        processors = _logits_processors(do_sample, temperature, top_k, top_p, repetition_penalty)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.long()
        sequences = input_ids
        unfinished = torch.ones(batch, dtype=torch.long)
        next_input, next_mask = input_ids, mask
        if pending is not None:
            next_input = torch.cat([pending.to(input_ids.device), input_ids], dim=1)
            next_mask = None if mask is None else torch.cat([torch.ones(batch, 1, dtype=torch.long), mask], dim=1)
        threads = torch.get_num_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(self.threads_for(batch))  # see threads_for; restored below
        try:
            for _ in range(max_new_tokens):
                hidden = self.embed_tokens(next_input.to(self.device))
                hidden = session.step(hidden, next_mask)
                logits = self.lm_head(self.norm(hidden[:, -1:]))[:, -1].float().cpu()
                scores = processors(sequences, logits) if processors else logits
                if do_sample:
                    probs = torch.softmax(scores, dim=-1)
                    next_tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                else:
                    next_tokens = torch.argmax(scores, dim=-1)
                if eos:
                    next_tokens = next_tokens * unfinished + pad * (1 - unfinished)
                sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
                if streamer is not None:
                    streamer.put(next_tokens.cpu())
                if eos:
                    unfinished = unfinished & ~torch.isin(next_tokens, torch.tensor(eos))
                    if not bool(unfinished.any()):
                        break
                next_input = next_tokens[:, None]
                next_mask = None if mask is None else torch.ones(batch, 1, dtype=torch.long)
            session.last_tokens = sequences[:, -1:].cpu()
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            if streamer is not None:
                streamer.end()
            if own_session:
                session.close()
        return sequences


def _check_cache_budgets(records: Sequence[PeerRecord], start: int, end: int, need: int, batch: int,
                         max_length: int) -> None:
    """:raises SwarmError: if live peers serve blocks ``[start, end)`` but no chain of them could hold a session of
    ``need`` = ``batch x max_length`` KV-cache tokens per block even when idle (each peer's whole budget,
    ``--max-cache-tokens``, is below it): waiting for cache room would not help."""
    spans = [ServerSpan(r.peer_id, r.start, r.end, r.decode_sps, r.max_cache_tokens) for r in records]
    try:
        find_chain(spans, start, end)
    except NoRouteError:
        return  # some block has no live peer at all: worth waiting for one
    try:
        find_chain(spans, start, end, min_cache_tokens=need)
    except NoRouteError:
        most = max((r.max_cache_tokens for r in records if r.end > start and r.start < end), default=0)
        raise SwarmError(
            f"no peer serving blocks {start}:{end} can ever hold this session: it needs {batch} x {max_length} = "
            f"{need} KV-cache tokens per block, and they hold at most {most} per block (their --max-cache-tokens); "
            "use a shorter max_length or a smaller batch"
        ) from None


def _check_mask(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> None:
    """:raises ValueError: if ``attention_mask`` is given with another shape than ``input_ids``."""
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask of shape {list(attention_mask.shape)} does not match input_ids of shape "
                         f"{list(input_ids.shape)}")


def _check_count(name: str, value: Any) -> None:
    """:raises ValueError: unless ``value`` is a whole number of at least 1."""
    import operator

    try:
        ok = not isinstance(value, bool) and operator.index(value) >= 1
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")


def _logits_processors(do_sample, temperature, top_k, top_p, repetition_penalty) -> Optional[Callable]:
    from transformers.generation.logits_process import (
        LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()
    if repetition_penalty is not None and repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if do_sample:
        if temperature is not None and temperature != 1.0:
            procs.append(TemperatureLogitsWarper(temperature))
        if top_k is not None and top_k != 0:
            procs.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p))
    return procs or None


def _load_generation_config(checkpoint: Checkpoint) -> Dict[str, Any]:
    out = {"eos_token_id": getattr(checkpoint.config, "eos_token_id", None),
           "pad_token_id": getattr(checkpoint.config, "pad_token_id", None)}
    try:
        import json

        with open(checkpoint._file("generation_config.json")) as f:
            gc = json.load(f)
        out.update({k: gc[k] for k in ("eos_token_id", "pad_token_id") if gc.get(k) is not None})
    except Exception:
        pass
    return out


async def _aiter(items):
    for item in items:
        yield item
