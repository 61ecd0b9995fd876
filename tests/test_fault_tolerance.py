"""Generation survives peers dying: the output equals a run with no failure."""

import logging
import os
import signal
import subprocess
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sims.local_swarm import LocalSwarm
from swarm.client import DistributedModelForCausalLM, SwarmError

PROMPTS = ["Recovery must not change a token", "short"]
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def swarm(mha_model):
    # a 3-hop chain F[0:1] -> M[1:3] -> L[3:4], and R[0:4], a slow replica of everything. F, M and L announce
    # 10 ms per block, so a faulty peer (below) is preferred by a margin far above loopback round-trip noise
    spans = [(0, 1), (1, 3), (3, 4), (0, 4)]
    args = [["--throughput", "100"]] * 3 + [["--throughput", "1"]]
    with LocalSwarm(mha_model, spans=spans, peer_args=args) as s:
        yield s


@pytest.fixture(scope="module")
def reference(mha_model):
    model = AutoModelForCausalLM.from_pretrained(mha_model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(mha_model)
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    return enc, model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False)


_speed = iter(range(1, 1000))


def _add_faulty(swarm, span, *flags):
    """A peer faster than everything else on ``span`` (so routes prefer it) that fails on purpose."""
    speed = 1e5 * next(_speed)
    return swarm.add_peer_with_args(span, ["--throughput", str(speed), "--record-ttl", "6", *flags])


@pytest.mark.parametrize("where,span,step", [
    ("middle, during prefill", (1, 3), 1),
    ("middle, first decode step", (1, 3), 2),
    ("middle, mid-generation", (1, 3), 6),
    ("first peer", (0, 1), 4),
    ("last peer", (3, 4), 4),
])
def test_crash_changes_no_token(swarm, mha_model, reference, where, span, step, caplog):
    enc, expected = reference
    faulty = _add_faulty(swarm, span, "--crash-at-step", str(step))
    faulty_id = faulty.ready_line.split()[1]
    caplog.set_level(logging.INFO, logger="swarm.client")
    with DistributedModelForCausalLM.from_pretrained(mha_model, initial_peers=swarm.initial_peers) as client:
        session = client.inference_session(max_length=64, batch_size=2)
        got = client.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=NEW_TOKENS,
                              session=session)
        session.close()
    assert torch.equal(got, expected), (where, got, expected)
    try:  # it really crashed (the chain went through it); if not, say which chains the session used
        code = faulty.proc.wait(10)
    except subprocess.TimeoutExpired:
        code = None
    assert code == -signal.SIGKILL, (code, session.failovers, [h.hop for h in session.hops], faulty.tail(15))
    assert faulty_id in [f["peer_id"] for f in session.failovers], session.failovers
    # one failure, one log line: what failed, what the session does, and that the peer is not used for a while
    said = [r for r in caplog.records if faulty_id in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING, [r.getMessage() for r in said]
    assert "replacing blocks" in said[0].getMessage() and "not using the peer for" in said[0].getMessage()
    # nor a line blaming the next peer for the push the failed one never sent, just before its failover
    mine = [r for r in caplog.records if r.name == "swarm.client"]
    k = mine.index(said[0])
    assert k == 0 or "pushed step did not arrive" not in mine[k - 1].getMessage(), mine[k - 1].getMessage()


def test_silent_peer_is_replaced_after_its_step_deadline(swarm, mha_model, reference):
    enc, expected = reference
    faulty = _add_faulty(swarm, (1, 3), "--hang-at-step", "3")
    faulty_id = faulty.ready_line.split()[1]
    try:
        with DistributedModelForCausalLM.from_pretrained(mha_model, initial_peers=swarm.initial_peers,
                                                         min_step_timeout=2.0) as client:
            session = client.inference_session(max_length=64, batch_size=2)
            t0 = time.time()
            got = client.generate(enc["input_ids"], attention_mask=enc["attention_mask"],
                                  max_new_tokens=NEW_TOKENS, session=session)
            elapsed = time.time() - t0
            session.close()
    finally:
        faulty.proc.kill()
    assert torch.equal(got, expected)
    failed = [f for f in session.failovers if f["peer_id"] == faulty_id]
    assert failed and "did not answer" in failed[0]["reason"]
    assert elapsed < 30  # a step deadline of seconds, not minutes


def test_restarted_peer_is_used_again(swarm, mha_model, reference, tmp_path):
    enc, expected = reference
    identity = str(tmp_path / "peer.key")
    speed = str(1e5 * next(_speed))
    first = swarm.add_peer_with_args((1, 3), ["--throughput", speed, "--identity", identity, "--record-ttl", "6"])
    peer_id = first.ready_line.split()[1]
    with DistributedModelForCausalLM.from_pretrained(mha_model, initial_peers=swarm.initial_peers) as client:
        with client.inference_session(max_length=64, batch_size=2) as s1:
            client.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=3, session=s1)
        assert peer_id in [h.peer_id for h in s1.hops]
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        with client.inference_session(max_length=64, batch_size=2) as s2:
            client.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=3, session=s2)
        assert peer_id not in [h.peer_id for h in s2.hops]
        again = swarm.add_peer_with_args((1, 3), ["--throughput", speed, "--identity", identity, "--record-ttl", "6"])
        assert again.ready_line.split()[1] == peer_id
        with client.inference_session(max_length=64, batch_size=2) as s3:
            got = client.generate(enc["input_ids"], attention_mask=enc["attention_mask"],
                                  max_new_tokens=NEW_TOKENS, session=s3)
        assert peer_id in [h.peer_id for h in s3.hops]
        assert torch.equal(got, expected)
        again.proc.kill()


def test_no_chain_names_the_missing_blocks(mha_model):
    with LocalSwarm(mha_model, spans=[(0, 2)]) as partial:
        with DistributedModelForCausalLM.from_pretrained(mha_model, initial_peers=partial.initial_peers,
                                                         retry_timeout=2.0) as client:
            t0 = time.time()
            with pytest.raises(SwarmError, match=r"block\(s\) 2-3"):
                client.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)
            assert time.time() - t0 < 10  # bounded by the caller's deadline, no endless retry
