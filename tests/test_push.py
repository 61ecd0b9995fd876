"""Peers push step outputs straight to the next peer of the chain; outputs stay equal to transformers'."""

import re
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sims.local_swarm import LocalSwarm
from swarm.client import DistributedModelForCausalLM


def _steps_from_pushes(log_path):
    with open(log_path) as f:
        return [int(n) for n in re.findall(r"closed after \d+ tokens \((\d+) steps from pushes\)", f.read())]


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
        assert len(after) == len(before) + 1
        assert after[-1] >= 6, after  # most of the 11 decode steps (the prefill opens the session: never pushed)
    else:
        assert after == before
