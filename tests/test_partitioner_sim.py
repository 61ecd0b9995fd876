"""The swarm-scale simulator runs the partitioner end to end (small, fast cases)."""

import numpy as np

from partitioner.bound import upper_bound
from partitioner.cost import max_blocks
from sims.scale.sim import evaluate_swarm, run_churn
from sims.scale.swarmgen import make_swarm


def test_random_swarms_are_servable_and_heterogeneous():
    rng = np.random.default_rng(0)
    sw = make_swarm(rng, 30)
    assert 32 <= sw.model.num_blocks <= 80
    assert sum(max_blocks(p, sw.model) for p in sw.peers) >= sw.model.num_blocks
    tps = [p.block_tps for p in sw.peers]
    assert max(tps) / min(tps) > 3
    assert upper_bound(sw.peers, sw.model) > 0


def test_static_comparison_is_consistent():
    rng = np.random.default_rng(1)
    r = evaluate_swarm(make_swarm(rng, 8), rng, exact=True)
    assert 0 < r.ours <= r.bound * (1 + 1e-6)
    assert 0 <= r.petals <= r.petals_flow * (1 + 1e-6) <= r.bound * (1 + 1e-6)


def test_churn_run_records_both_systems():
    res = run_churn(seed=2, num_peers=8, duration=400.0, mean_life=800.0, mass_leave_at=200.0)
    assert len(res.times) == len(res.ours) == len(res.petals) == len(res.bound) > 3
    assert all(o <= b * (1 + 1e-6) + 1e-9 for o, b in zip(res.ours, res.bound))
    assert res.times == sorted(res.times)
