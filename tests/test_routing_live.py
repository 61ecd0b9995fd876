"""Live routing: the client's chain avoids a slow peer when a faster replica exists."""

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
