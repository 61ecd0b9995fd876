"""The cover-LP tightening of the upper bound: minimal covers, and the bound against exhaustive search on tiny swarms."""

import itertools

import numpy as np
import pytest

from partitioner.bound import minimal_covers, upper_bound
from partitioner.flow import max_flow, placed_peers

from tests.test_partitioner import _exhaustive_best, _tiny_swarm


@pytest.mark.parametrize("seed", range(20))
def test_minimal_covers_match_brute_force(seed):
    rng = np.random.default_rng(900 + seed)
    caps = rng.uniform(0, 0.95, int(rng.integers(1, 9)))
    caps[rng.random(len(caps)) < 0.15] = 0.0
    want = set()
    for r in range(1, len(caps) + 1):
        for s in itertools.combinations(range(len(caps)), r):
            tot = caps[list(s)].sum()
            if tot >= 1 - 1e-9 and all(tot - caps[i] < 1 - 1e-9 for i in s):
                want.add(frozenset(s))
    got = minimal_covers(caps)
    assert len(got) == len(set(map(frozenset, got)))  # no duplicates
    assert set(map(frozenset, got)) == want
    assert minimal_covers(np.full(12, 0.1), limit=10) is None  # C(12, 10) = 66 minimal covers: over the limit


# (peers, blocks, seed) of tiny swarms where the cover LP is strictly below the knapsack bound (found by scanning
# seeds 0..200 of _tiny_swarm; every scanned swarm, binding or not, was checked against exhaustive search too)
BINDING = [(3, 4, s) for s in (27, 28, 30, 39, 57, 69, 113, 128, 164, 188)] + [(3, 5, s) for s in (12, 20, 58)] + [
    (4, 4, s) for s in (6, 10)]


@pytest.mark.parametrize("n,L,seed", BINDING)
def test_cover_lp_bound_is_above_exhaustive_search_and_tighter(n, L, seed):
    rng = np.random.default_rng(seed)
    model, peers = _tiny_swarm(rng, n, L)
    best = _exhaustive_best(model, peers)
    knapsack = upper_bound(peers, model, cover_lp=False)
    ub = upper_bound(peers, model)
    assert best <= ub * (1 + 1e-6)  # still a true upper bound
    assert ub < knapsack * (1 - 1e-3)  # and strictly tighter on these swarms


def test_cover_lp_bound_is_exact_where_slow_links_cannot_pair():
    # seed 28: the knapsack bound is 1.5x the best placement; the cover LP finds that the slow peers' blocks cannot
    # all get partners with enough link capacity, and meets the exhaustive optimum
    rng = np.random.default_rng(28)
    model, peers = _tiny_swarm(rng, 3, 4)
    best = _exhaustive_best(model, peers)
    assert upper_bound(peers, model, cover_lp=False) > 1.4 * best
    assert upper_bound(peers, model) == pytest.approx(best, rel=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_cover_lp_bound_is_above_searched_placements_of_bench_sized_swarms(seed):
    from partitioner.placement import plan_placement, search_with_flow
    from sims.scale.swarmgen import make_swarm

    rng = np.random.default_rng(1200 + seed)
    sw = make_swarm(rng, int(rng.integers(4, 12)))
    ub = upper_bound(sw.peers, sw.model)
    assert ub <= upper_bound(sw.peers, sw.model, cover_lp=False) * (1 + 1e-12)
    pl = search_with_flow(plan_placement(sw.peers, sw.model), sw.peers, sw.model, budget=60)
    assert max_flow(placed_peers(sw.peers, sw.model, pl), sw.model.num_blocks).throughput <= ub * (1 + 1e-6)


@pytest.mark.parametrize("n,budget", [(3, 1), (6, 1), (16, 4)])
def test_rebalance_budget_rounds_down_to_at_most_30_percent(n, budget):
    # every peer starts on the same span, so a plan would like to move nearly all of them; the default budget is
    # floor(0.3 n) peers (at least one), never the nearest count above 30%
    from partitioner.cost import ModelSpec, PeerSpec
    from partitioner.rebalance import check_plan, plan_rebalance

    model = ModelSpec(num_blocks=12, block_bytes=1e9, hidden_bytes=8192, cache_bytes_per_token=4096,
                      context_tokens=1000)
    mem = 12 * (1e9 + 8 * 4096 * 1000)
    peers = [PeerSpec(f"p{i}", block_tps=1000.0, decode_sps=20.0, memory_bytes=mem, bandwidth=1e8) for i in range(n)]
    start = {p.peer_id: (0, 12) if i == 0 else (0, 3) for i, p in enumerate(peers)}
    plan = plan_rebalance(peers, model, start)
    assert len(plan.moves) == budget  # all of the budget is used (many peers want to move), and no more
    assert check_plan(start, plan, 12) == []
