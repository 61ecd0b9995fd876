"""Peers push step outputs straight to the next peer of the chain; outputs stay equal to transformers'."""

import re
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sims.local_swarm import LocalSwarm
from swarm.client import DistributedModelForCausalLM


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
        # every one of the 11 decode steps came from the first peer's push, and the client sent only the prefill
        # (which opens the session) itself: a decode step costs one message per hop plus the last answer
        assert len(after) == len(before) + 1
        assert after[-1] == (11, 1), after
        assert client.stats["lost_pushes"] == 0
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
            assert client.stats["failovers"] == 0 and client.stats["bans"] == 0
    assert torch.equal(got, expected), (got, expected)
