"""Live routing: the client's chain avoids a slow peer when a faster replica exists."""

import pytest
import torch

from sims.local_swarm import LocalSwarm
from swarm.client import DistributedModelForCausalLM


def test_throttled_peer_is_avoided(mha_model):
    spans = [(0, 4), (0, 4)]
    args = [["--throttle", "20"], []]  # peer 0 runs (and announces) 20x slower
    with LocalSwarm(mha_model, spans=spans, peer_args=args) as swarm:
        slow, fast = swarm.peer_id(0), swarm.peer_id(1)
        with DistributedModelForCausalLM.from_pretrained(mha_model, initial_peers=swarm.initial_peers) as client:
            speeds = {r.peer_id: r.decode_sps for r in client.peers()}
            assert speeds[slow] * 10 < speeds[fast]
            for _ in range(5):  # ties are broken at random, so one lucky pick would not prove anything
                with client.inference_session(max_length=16) as session:
                    client.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, session=session)
                    assert [h.peer_id for h in session.hops] == [fast]


def test_peers_announce_measured_links(mha_model):
    import time

    with LocalSwarm(mha_model, spans=[(0, 2), (2, 4)]) as swarm:
        with DistributedModelForCausalLM.from_pretrained(mha_model, initial_peers=swarm.initial_peers) as client:
            deadline = time.time() + 20
            while time.time() < deadline:
                records = {r.peer_id: r for r in client.peers()}
                if all(len(r.network) == 1 for r in records.values()) and len(records) == 2:
                    break
                time.sleep(0.5)
            a, b = swarm.peer_id(0), swarm.peer_id(1)
            rtt, bandwidth = records[a].network[b]
            assert 0 < rtt < 1.0 and bandwidth > 1e5  # loopback: well under a second, over 100 kB/s
            assert b in records[a].network and a in records[b].network


def test_forward_calls_follow_the_flow(mha_model):
    """Independent forward calls are spread over two replicas by the max flow (3:1 here), sessions still take the
    fastest chain, outputs equal transformers', and a dead replica is banned and routed around."""
    from transformers import AutoModelForCausalLM

    from partitioner.route import Hop

    # fixed figures (100 tokens/s per block, the throttled peer announces a third of it): the flow is exactly 3:1
    args = [["--throughput", "100", "--throttle", "3"], ["--throughput", "100"]]
    reference = AutoModelForCausalLM.from_pretrained(mha_model, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with LocalSwarm(mha_model, spans=[(0, 4), (0, 4)], peer_args=args) as swarm:
        slow, fast = swarm.peer_id(0), swarm.peer_id(1)
        with DistributedModelForCausalLM.from_pretrained(mha_model, initial_peers=swarm.initial_peers) as client:
            records = {r.peer_id: r for r in client.peers()}
            assert records[fast].forward_tps == pytest.approx(3 * records[slow].forward_tps)

            def check_forward():
                ids = torch.randint(0, 600, (2, 12), generator=gen)
                mask = torch.ones_like(ids)
                mask[1, :4] = 0  # the second row is left-padded
                with torch.no_grad():
                    expected = reference(input_ids=ids, attention_mask=mask).logits
                got = client(ids, attention_mask=mask)
                torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)

            calls = 40
            for _ in range(calls):
                check_forward()
                assert len(client.last_forward_chain) == 1
            served = dict(client.forward_served)
            share = served.get(fast, 0) / calls
            print(f"forward calls served: fast {served.get(fast, 0)}, slow {served.get(slow, 0)} (fast share {share:.2f})")
            assert served.get(fast, 0) + served.get(slow, 0) == calls and served.get(slow, 0) > 0
            assert 0.6 <= share <= 0.9  # the flow says 0.75; latency routing would give 1.0, a coin 0.5
            assert client.stats["router_builds"] <= 3  # solved once (again only if the records changed), not per call

            for _ in range(3):  # interactive sessions: the lowest-latency chain, i.e. the fast replica
                with client.inference_session(max_length=16) as session:
                    client.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, session=session)
                    assert [h.peer_id for h in session.hops] == [fast]
            prompt = torch.tensor([[5, 6, 7, 8]])
            expected = reference.generate(prompt, max_new_tokens=6, do_sample=False)
            chosen = []
            for _ in range(4):  # throughput routing for sessions: decode_sps 100 vs 33, so 3 fast for 1 slow
                with client.inference_session(max_length=10, routing="throughput") as session:
                    got = client.generate(prompt, max_new_tokens=6, session=session)
                    assert torch.equal(got, expected)
                    chosen.append(session.hops[0].peer_id)
            assert chosen.count(fast) == 3 and chosen.count(slow) == 1, chosen

            swarm.kill_peer(1)  # the fast replica dies; its record stays in the DHT for a while
            for _ in range(4):
                check_forward()
                assert client.last_forward_chain == [Hop(slow, 0, 4)]
            assert fast in client._banned_ids() and client.stats["forward_retries"] >= 1
