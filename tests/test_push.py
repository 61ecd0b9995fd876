"""Peers push step outputs straight to the next peer of the chain; outputs stay equal to transformers'."""

import re
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from partitioner.route import Hop
from sims.local_swarm import LocalSwarm
from swarm.client import DistributedModelForCausalLM, InferenceSession, _PeerFailed


def _steps_from_pushes(log_path):
    """``(steps from pushes, steps sent by the client)`` of each closed session, from a peer's log."""
    with open(log_path) as f:
        found = re.findall(r"closed after \d+ tokens in \d+ steps, [\d.]+ ms per step computing \((\d+) steps from pushes, (\d+) sent by the client\)", f.read())
    return [(int(a), int(b)) for a, b in found]


@pytest.fixture(scope="module")
def swarm(model_dir, tmp_path_factory):
    path = model_dir("mha")
    logs = tmp_path_factory.mktemp("push-logs")
    with LocalSwarm(path, spans=[(0, 2), (2, 4)], log_dir=str(logs)) as s:
        yield path, s


@pytest.mark.parametrize("push", [True, False])
def test_padded_batch_equal_with_and_without_push(swarm, push):
    path, s = swarm
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    enc = tok(["Peers push", "a longer prompt with more tokens in it"], return_tensors="pt", padding=True)
    expected = model.generate(**enc, max_new_tokens=12, do_sample=False)
    before = _steps_from_pushes(s.peers[1].log_path)
    with DistributedModelForCausalLM.from_pretrained(path, initial_peers=s.initial_peers, push=push) as client:
        got = client.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=12)
        assert client.stats["failovers"] == 0
    assert torch.equal(got, expected), (got, expected)
    # the second peer's log says how many of the session's steps came from the first peer's pushes
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(_steps_from_pushes(s.peers[1].log_path)) == len(before) and push:
        time.sleep(0.1)
    after = _steps_from_pushes(s.peers[1].log_path)
    if push:
        # every step (the prefill and the 11 decode steps) came from the first peer's push: the client opened the
        # session there without a step and never needed the first peer's output (kept there, not sent back)
        assert len(after) == len(before) + 1
        assert after[-1] == (12, 0), after
        assert client.stats["lost_pushes"] == 0 and client.stats["outputs_fetched"] == 0
    else:
        assert after == before


def test_a_lost_push_costs_one_wait_then_the_client_sends_every_step(model_dir):
    """A peer that says it pushed but did not (``--drop-pushes``): the client waits once, then carries every
    step to the next peer itself; outputs stay equal."""
    path = model_dir("mha")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.tensor([[5, 9, 2, 7]])
    expected = model.generate(ids, max_new_tokens=8, do_sample=False)
    with LocalSwarm(path, spans=[(0, 2), (2, 4)], peer_args=[["--drop-pushes"], []]) as s:
        with DistributedModelForCausalLM.from_pretrained(path, initial_peers=s.initial_peers) as client:
            got = client.generate(ids, max_new_tokens=8)
            assert client.stats["lost_pushes"] == 1
            # the dropped step's input was fetched from the first peer, which then sent its outputs back again
            assert client.stats["outputs_fetched"] == 1
            assert client.stats["failovers"] == 0 and client.stats["bans"] == 0
    assert torch.equal(got, expected), (got, expected)


def test_kept_outputs_are_the_first_peers_outputs_and_bad_requests_are_refused(swarm):
    """A pushing peer keeps its outputs instead of sending them back (the chain's first peer does not even answer a
    step it pushed); fetched, they equal transformers' hidden states after its blocks. A request for a range it does not hold, or to a peer that keeps nothing, is refused."""
    path, s = swarm
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.tensor([[5, 9, 2, 7], [3, 8, 1, 6]])
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True).hidden_states[2]  # after blocks 0:2
    with DistributedModelForCausalLM.from_pretrained(path, initial_peers=s.initial_peers) as client:
        with client.inference_session(max_length=8, batch_size=2) as session:
            hidden = client.embed_tokens(ids)
            session.step(hidden[:, :3])
            session.step(hidden[:, 3:])
            first, last = session.hops
            assert first.keeps_outputs and not last.keeps_outputs
            assert [h is None for h, _, _ in last.history] == [True, True]  # pushed there, never sent back
            kept = client.net.run(first.fetch_outputs(0, 4, 2, hidden.shape[2], 10.0))
            assert first.silent and first.skipped_answers == 0  # it answered neither pushed step
            assert torch.allclose(kept, expected, atol=1e-5), (kept - expected).abs().max()
            with pytest.raises(_PeerFailed, match="keep_outputs"):
                client.net.run(last.fetch_outputs(0, 4, 2, hidden.shape[2], 10.0))
            with pytest.raises(_PeerFailed, match=r"outputs must be \[a, b\] with 0 <= a < b <= 4"):
                client.net.run(first.fetch_outputs(2, 9, 2, hidden.shape[2], 10.0))


def test_a_closed_session_closes_every_hop_stream_on_the_network_thread(swarm):
    """The first peer of a chain answers nothing while it pushes, so the client never reads its stream. Left to the
    garbage collector, that stream was closed in whatever thread collected it, and uvloop crashed the client
    (segmentation fault) about every other benchmark run. Closing a session now drains every hop's stream."""
    path, s = swarm
    with DistributedModelForCausalLM.from_pretrained(path, initial_peers=s.initial_peers) as client:
        session = client.inference_session(max_length=8)
        hidden = client.embed_tokens(torch.tensor([[5, 9, 2, 7]]))
        session.step(hidden)
        hops = list(session.hops)
        assert hops[0].silent
        session.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(h.outputs.ag_frame is not None for h in hops):
            time.sleep(0.05)
        assert all(h.outputs.ag_frame is None for h in hops), "a hop's stream reader is still open"


class _FakeHop:
    """A peer of a scripted chain: adds ``add`` to its inputs; keeps its outputs if it pushes."""

    def __init__(self, peer_id, start, end, add, chain, pushes=False):
        self.hop = Hop(peer_id, start, end)
        self.peer_id, self.add, self.chain = peer_id, add, chain
        self.history, self.pending_open, self.pushed_into, self.trust_push = [], None, False, True
        self.last_pushed, self.keeps_outputs, self.pending_answer = False, pushes, None
        self.kept, self.dead, self.drop_next_push, self.inbox, self.silent = [], False, False, None, False

    def expected_seconds(self, tokens):
        return 0.001

    def close(self):
        pass

    async def send(self, hidden, mask, timeout, extra=None, *, pushed_wait=None, shape=None, fetch=None):
        if self.dead:
            raise _PeerFailed(self.peer_id, "connection lost")
        if hidden is None:  # the previous hop pushed it here, unless the push got lost
            hidden = self.inbox if not self.drop_next_push else await fetch()
            self.drop_next_push = False
        out = hidden + self.add
        nxt = self.chain.get(self.peer_id)
        if self.keeps_outputs and nxt is not None and "replay" not in (extra or {}):
            self.kept.append(out)
            nxt.inbox = out
            self.last_pushed = True
            return None
        return out

    async def fetch_outputs(self, first, end, batch, hidden_size, timeout):
        if self.dead:
            raise _PeerFailed(self.peer_id, "connection lost")
        return torch.cat(self.kept, dim=1)[:, first:end]


class _FakeModel:
    retry_timeout, num_blocks, push, keep_outputs = 10.0, 2, True, True

    def __init__(self):
        self.stats = {"failovers": 0, "lost_pushes": 0, "outputs_fetched": 0}
        self.banned = []

    def step_timeout_for(self, hop, tokens):
        return 1.0

    def _ban(self, peer_id, reason, log=True):
        self.banned.append(peer_id)

    def _ban_note(self):
        return " (not using the peer)"


def test_a_peer_that_dies_holding_the_next_ones_input_is_replaced_and_outputs_stay_exact():
    """The first peer pushes and keeps its outputs; it dies after answering a step whose push then gets lost. The
    client's fetch fails, so it replaces that peer, whose replay gives both the step's input and the history the
    second peer was pushed (the client never held them)."""
    import asyncio

    chain = {}
    a = _FakeHop("A", 0, 1, 1.0, chain, pushes=True)
    b = _FakeHop("B", 1, 2, 10.0, chain)
    b.pushed_into = True
    chain["A"] = b
    replacement = _FakeHop("A2", 0, 1, 1.0, chain)
    session = InferenceSession.__new__(InferenceSession)
    session.model, session.batch_size, session.length, session.session_id = _FakeModel(), 1, 0, "s" * 32
    session.hops, session.failovers, session.hidden_size = [a, b], [], 4

    async def new_chain(start, end, deadline):
        assert (start, end) == (0, 1)
        return [replacement]

    session._chain = new_chain
    x = [torch.randn(1, n, 4) for n in (3, 1, 1)]
    outs = []
    for i, h in enumerate(x):
        if i == 2:
            b.drop_next_push = True  # a answers the step, then dies; its push never arrives
            original = a.send

            async def send_then_die(*args, **kwargs):
                out = await original(*args, **kwargs)
                a.dead = True
                return out

            a.send = send_then_die
        outs.append(asyncio.run(session._step(h, None)))
        session.length += h.shape[1]
    for h, out in zip(x, outs):
        assert torch.equal(out, (h + 1.0) + 10.0)
    assert session.hops == [replacement, b] and session.model.banned == ["A"]
    assert session.model.stats["failovers"] == 1
    # b's history is complete again (filled from the replacement's replay), in the original step sizes
    assert [hh.shape[1] for hh, _, _ in b.history] == [3, 1, 1]
    assert all(torch.equal(hh, h + 1.0) for (hh, _, _), h in zip(b.history, x))


def test_a_push_that_arrives_before_its_session_opens_is_held_for_it(monkeypatch):
    """The previous peer's push stream and the client's request that opens the session race; a push that wins is
    held (for its session's push_from only, for a few seconds, within a byte budget), not dropped. Dropping it cost
    the session's first step a 1 s wait and sent every later step through the client."""
    import peer.server as server
    from peer.server import Peer, Session

    class Request:
        def __init__(self, size):
            self.size = size

        def ByteSize(self):
            return self.size

    p = Peer.__new__(Peer)
    p._early_pushes, p._early_bytes = server.collections.OrderedDict(), 0
    p._hold_early_push("s1", "prev", 0, Request(100))
    p._hold_early_push("s1", "intruder", 1, Request(100))
    p._hold_early_push("s2", "prev", 0, Request(100))
    session = Session("s1", 0, 2, 1, 8, cache=None)
    session.push_from = "prev"
    p._take_early_pushes(session)
    assert list(session.pushed) == [0] and session.push_event.is_set()  # the intruder's push is not taken
    assert list(p._early_pushes) == ["s2"] and p._early_bytes == 100
    # old pushes expire; the byte budget drops the oldest first
    monkeypatch.setattr(server, "EARLY_PUSH_BYTES", 250)
    p._hold_early_push("s3", "prev", 0, Request(100))
    p._hold_early_push("s4", "prev", 0, Request(100))
    assert list(p._early_pushes) == ["s3", "s4"] and p._early_bytes == 200
    now = server.time.monotonic()
    monkeypatch.setattr(server.time, "monotonic", lambda: now + server.EARLY_PUSH_SECONDS + 1)
    p._hold_early_push("s5", "prev", 0, Request(10))
    assert list(p._early_pushes) == ["s5"] and p._early_bytes == 10
