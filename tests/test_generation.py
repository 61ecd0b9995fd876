"""Distributed greedy generation equals transformers' generate, token for token (float32)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sims.local_swarm import LocalSwarm
from swarm.client import DistributedModelForCausalLM

PROMPTS = ["The swarm holds", "a", "Peers announce their spans and clients route through them"]


@pytest.fixture(scope="module", params=["mha", "gqa_odd"])
def setup(request, model_dir):
    path = model_dir(request.param)
    with LocalSwarm(path, num_peers=3) as swarm:
        client = DistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
        try:
            yield path, swarm, client
        finally:
            client.shutdown()


def _reference(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    return model, tok


def test_spans_need_several_hops(setup):
    path, swarm, client = setup
    assert len(swarm.spans) == 3
    assert all(e - s < swarm.num_blocks for s, e in swarm.spans)
    records = client.peers()
    assert len([r for r in records if r.state == "online"]) == 3


def test_greedy_batch1_equals_transformers(setup):
    path, swarm, client = setup
    model, tok = _reference(path)
    enc = tok(PROMPTS[0], return_tensors="pt")
    expected = model.generate(**enc, max_new_tokens=24, do_sample=False)
    got = client.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=24)
    assert got.shape == expected.shape
    assert torch.equal(got, expected), (got, expected)
    assert len(set(got[0, enc["input_ids"].shape[1]:].tolist())) > 4  # the check is not trivially a repeated token


def test_continuing_a_session_equals_one_long_generation(setup):
    """Found by a new user: a second ``generate`` in the same session lost the first one's last token (it was
    sampled but never run through the blocks), so a multi-turn conversation silently diverged."""
    path, swarm, client = setup
    model, tok = _reference(path)
    ids = tok(PROMPTS[0], return_tensors="pt")["input_ids"]
    more = tok(" and then", return_tensors="pt", add_special_tokens=False)["input_ids"]
    with client.inference_session(max_length=64) as session:
        first = client.generate(ids, max_new_tokens=5, session=session)
        second = client.generate(more, max_new_tokens=5, session=session)
        third = client.generate(None, max_new_tokens=4, session=session)  # continue from the last token alone
    assert second.shape[1] == more.shape[1] + 5 and third.shape[1] == 4
    whole = torch.cat([first, second, third], dim=1)
    prefix = torch.cat([first, more], dim=1)
    expected = model.generate(prefix, attention_mask=torch.ones_like(prefix), max_new_tokens=9, do_sample=False)
    assert torch.equal(whole, expected), (whole, expected)


def test_greedy_batch_of_different_lengths_equals_transformers(setup):
    path, swarm, client = setup
    model, tok = _reference(path)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    assert not bool(enc["attention_mask"].all())  # really padded
    expected = model.generate(**enc, max_new_tokens=16, do_sample=False)
    got = client.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=16)
    assert torch.equal(got, expected), (got, expected)


def test_logits_equal_transformers(setup):
    path, swarm, client = setup
    model, tok = _reference(path)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**enc).logits
    got = client(enc["input_ids"], attention_mask=enc["attention_mask"])
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


def test_sampling_with_seed_is_reproducible_and_matches_transformers(setup):
    path, swarm, client = setup
    model, tok = _reference(path)
    enc = tok(PROMPTS[2], return_tensors="pt")
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=50, top_p=0.9)
    torch.manual_seed(123)
    expected = model.generate(**enc, **kwargs)
    torch.manual_seed(123)
    got = client.generate(enc["input_ids"], attention_mask=enc["attention_mask"], **kwargs)
    assert torch.equal(got, expected)


def test_streamer_receives_every_token(setup):
    path, swarm, client = setup
    _, tok = _reference(path)
    enc = tok(PROMPTS[0], return_tensors="pt")

    class Collect:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, t):
            self.chunks.append(t.clone())

        def end(self):
            self.ended = True

    s = Collect()
    out = client.generate(enc["input_ids"], max_new_tokens=5, streamer=s)
    assert s.ended and torch.equal(s.chunks[0], enc["input_ids"])
    assert torch.equal(torch.cat([c.reshape(-1) for c in s.chunks[1:]]), out[0, enc["input_ids"].shape[1]:])


def test_generation_longer_than_session_fails_clearly(setup):
    path, swarm, client = setup
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with client.inference_session(max_length=10) as session:
        with pytest.raises(ValueError, match="max_length is 10"):
            client.generate(ids, max_new_tokens=8, session=session)


def test_peer_refuses_more_tokens_than_declared(setup):
    """The peer enforces the session's declared max_length even if a client skips its own check."""
    path, swarm, client = setup
    from swarm.client import SwarmError

    with client.inference_session(max_length=6) as session:
        hidden = client.embed_tokens(torch.tensor([[1, 2, 3, 4]]))
        session.step(hidden)
        with pytest.raises(SwarmError, match="max_length of 6"):
            client.net.run(session._step(client.embed_tokens(torch.tensor([[5, 6, 7]])), None), timeout=30)


def test_bad_lengths_are_clear_value_errors(setup):
    """Found by a user test: ``inference_session(max_length=0)`` was accepted, and a forward pass longer than the
    model's max_position_embeddings went to the peers."""
    path, swarm, client = setup
    limit = client.config.max_position_embeddings
    for kwargs, text in (({"max_length": 0}, "max_length must be"), ({"max_length": -3}, "max_length must be"),
                         ({"max_length": 2.5}, "max_length must be"), ({"max_length": limit + 1}, "limit"),
                         ({"max_length": 8, "batch_size": 0}, "batch_size must be")):
        with pytest.raises(ValueError, match=text):
            client.inference_session(**kwargs)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        client(torch.zeros(1, limit + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens >= 1"):
        client(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        client(torch.ones(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="max_new_tokens must be"):
        client.generate(torch.tensor([[1, 2]]), max_new_tokens=0)
    with pytest.raises(ValueError, match="limit"):
        client.generate(torch.tensor([[1, 2]]), max_new_tokens=limit)
    # found by a user test: a mask of another shape went to the peers, which refused it; the client banned a healthy
    # peer and waited 60 s before "no live peer serves block(s)"
    with pytest.raises(ValueError, match="attention_mask"):
        client.generate(torch.tensor([[1, 2, 3, 4]]), attention_mask=torch.zeros(1, 2), max_new_tokens=2)
    assert client.stats["bans"] == 0
    assert client(torch.tensor([[1, 2, 3]])).shape[:2] == (1, 3)  # the client still works


def test_a_shut_down_client_fails_at_once(setup):
    """Found by a user test: ``generate`` after ``shutdown()`` waited forever on the stopped network thread."""
    from swarm.client import SwarmError

    path, swarm, _ = setup
    client = DistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
    client.shutdown()
    with pytest.raises(SwarmError, match="shut down"):
        client.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)
    with pytest.raises(SwarmError, match="shut down"):
        client(torch.tensor([[1, 2, 3]]))


def test_a_small_head_is_computed_on_one_thread_during_generate(setup):
    """Idle OpenMP threads of the client busy-wait while it waits on the swarm and take cores from peers on the same
    machine; a small LM head runs as fast on one thread, so generate uses one and restores torch's setting."""
    import torch as t

    path, swarm, client = setup
    seen = []

    class Threads:
        def put(self, _):
            seen.append(t.get_num_threads())

        def end(self):
            pass

    before = t.get_num_threads()
    t.set_num_threads(2)
    try:
        client.generate(t.tensor([[5, 6, 7]]), max_new_tokens=3, streamer=Threads())
        assert seen[1:] == [1, 1, 1] and t.get_num_threads() == 2  # the prompt's put comes before the loop
        seen.clear()
        client.client_threads = None  # torch's setting
        client.generate(t.tensor([[5, 6, 7]]), max_new_tokens=3, streamer=Threads())
        assert seen[1:] == [2, 2, 2]
    finally:
        client.client_threads = "auto"
        t.set_num_threads(before)
