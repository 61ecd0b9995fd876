"""The placement MILP (partitioner.milp): its optimum against exhaustive search, its dual bound against placements,
the grid restriction and relaxation, and rebalancing within a move budget."""

import numpy as np
import pytest

from partitioner.bound import upper_bound
from partitioner.cost import max_blocks
from partitioner.flow import max_flow, placed_peers
from partitioner.milp import best_rebalance, grid_bound, grid_for, improve_placement, solve
from partitioner.rebalance import check_plan, milp_plan, order_moves, plan_rebalance, unserved_blocks

from tests.test_partitioner import _exhaustive_best, _random_placement, _random_swarm, _tiny_swarm


def _flow(peers, model, pl):
    return max_flow(placed_peers(peers, model, pl), model.num_blocks).throughput


@pytest.mark.parametrize("n,L,seed", [(3, 4, s) for s in range(8)] + [(4, 4, s) for s in (6, 10, 11)]
                         + [(2, 6, s) for s in range(3)])
def test_milp_optimum_equals_exhaustive_search(n, L, seed):
    rng = np.random.default_rng(seed)
    model, peers = _tiny_swarm(rng, n, L)
    best = _exhaustive_best(model, peers)
    res = solve(peers, model, time_limit=30)
    assert res.status == 0
    # the incumbent, measured by the evaluator, is the exhaustive optimum, and so is the dual bound
    assert _flow(peers, model, res.placement) == pytest.approx(best, rel=1e-5)
    assert res.value == pytest.approx(best, rel=2e-4)  # the MILP's own lam, within the solver's tolerances
    assert best <= res.bound <= best * (1 + 2e-4)  # HiGHS stops at a relative gap of 1e-4
    # and it never exceeds the relaxation bound
    assert res.bound <= upper_bound(peers, model) * (1 + 2e-4)
    for p in peers:
        if p.peer_id in res.placement:
            s, e = res.placement[p.peer_id]
            assert 0 <= s < e <= L and e - s <= max_blocks(p, model)


@pytest.mark.parametrize("seed", range(4))
def test_milp_bound_with_a_cutoff_proves_the_optimum(seed):
    # cut off at the exhaustive optimum: nothing better exists, and the bound says so
    rng = np.random.default_rng(seed)
    model, peers = _tiny_swarm(rng, 3, 4)
    best = _exhaustive_best(model, peers)
    res = solve(peers, model, time_limit=30, lower=best)
    # nothing better exists (an incumbent at the cutoff may come back, within the solver's tolerance)
    assert res.placement is None or _flow(peers, model, res.placement) <= best * (1 + 1e-6)
    assert best <= res.bound <= best * (1 + 2e-4)


@pytest.mark.parametrize("seed", range(5))
def test_dual_bound_is_above_random_placements_even_when_stopped_early(seed):
    rng = np.random.default_rng(1500 + seed)
    model, peers = _random_swarm(rng, int(rng.integers(3, 7)), L=int(rng.integers(6, 14)))
    ub = upper_bound(peers, model)
    early = solve(peers, model, time_limit=0.05, upper=ub)  # stopped by the limit: the dual bound, not the incumbent
    full = solve(peers, model, time_limit=20, upper=ub)
    relaxed = grid_bound(peers, model, 3, time_limit=20, upper=ub)
    assert full.bound <= early.bound * (1 + 1e-6) and full.bound <= ub * (1 + 1e-5)
    for _ in range(8):
        thr = _flow(peers, model, _random_placement(peers, model, rng))
        assert thr <= early.bound * (1 + 1e-6)
        assert thr <= full.bound * (1 + 1e-6)
        assert thr <= relaxed.bound * (1 + 1e-6)
    if full.status == 0:
        assert _flow(peers, model, full.placement) >= full.bound * (1 - 2e-4)  # mip_rel_gap 1e-4


def test_upper_bound_with_milp_is_no_looser_and_still_above_the_optimum():
    rng = np.random.default_rng(28)  # the knapsack bound is 1.5x the optimum here (test_partitioner_bound)
    model, peers = _tiny_swarm(rng, 3, 4)
    best = _exhaustive_best(model, peers)
    plain = upper_bound(peers, model)
    tight = upper_bound(peers, model, milp_time_limit=10)
    assert best <= tight * (1 + 1e-6) and tight <= plain * (1 + 1e-9)
    assert tight == pytest.approx(best, rel=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_grid_restriction_places_on_the_grid_and_is_evaluated_exactly(seed):
    rng = np.random.default_rng(1600 + seed)
    model, peers = _random_swarm(rng, 4, L=12)
    grid = grid_for(12, 4)
    res = solve(peers, model, time_limit=20, grid=grid)
    assert res.bound == float("inf")  # a restriction bounds nothing
    assert res.placement
    for s, e in res.placement.values():
        assert s in grid and e in grid
    # for grid-aligned spans the per-group program is the max-flow LP itself
    assert res.value == pytest.approx(_flow(peers, model, res.placement), rel=1e-4)


def _left(seed, n, L, leave):
    from partitioner.placement import plan_placement

    rng = np.random.default_rng(seed)
    model, peers = _random_swarm(rng, n, L=L)
    pl = plan_placement(peers, model)
    keep = [p for p in peers if rng.random() > leave] or peers[:1]
    return model, keep, {p.peer_id: pl[p.peer_id] for p in keep}


@pytest.mark.parametrize("seed,n,budget", [(0, 6, 1), (1, 6, 1), (2, 7, 2), (3, 5, 1)])
def test_rebalance_milp_never_exceeds_its_move_budget(seed, n, budget):
    model, keep, rest = _left(1700 + seed, n, 10, 0.3)
    res = best_rebalance(keep, model, rest, budget, time_limit=20)
    if res.placement:
        changed = [pid for pid in rest if res.placement[pid] != rest[pid]]
        assert len(changed) <= budget
        assert res.value <= res.bound * (1 + 1e-6)
    # the single-program path (a binary "moved" per peer) keeps the budget too
    one = best_rebalance(keep, model, rest, budget, time_limit=20, subset_limit=0)
    if one.placement:
        assert sum(one.placement[pid] != rest[pid] for pid in rest) <= budget
    plan = milp_plan(rest, keep, model, budget, time_limit=20)
    assert len({m.peer_id for m in plan.moves}) == len(plan.moves) <= budget
    assert check_plan(rest, plan, model.num_blocks) == []
    # no plan within the budget beats the bound: try every single move of every peer
    if budget == 1 and res.status == 0:
        for p in keep:
            for k in range(1, max_blocks(p, model) + 1):
                for s in range(model.num_blocks - k + 1):
                    trial = dict(rest)
                    trial[p.peer_id] = (s, s + k)
                    moves = order_moves(rest, trial, keep, model)
                    if len(moves) == 1:  # a safe move, the only kind the bound covers
                        assert _flow(keep, model, trial) <= res.bound * (1 + 1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_plan_rebalance_with_milp_is_safe_within_budget_and_no_worse(seed):
    model, keep, rest = _left(1800 + seed, 7, 12, 0.25)
    budget = max(1, int(0.3 * len(keep)))
    plain = plan_rebalance(keep, model, rest, search_budget=20)
    plan = plan_rebalance(keep, model, rest, search_budget=20, milp_time_limit=10)
    assert len({m.peer_id for m in plan.moves}) == len(plan.moves) <= budget
    assert check_plan(rest, plan, model.num_blocks) == []
    end, end0 = plan.apply(rest), plain.apply(rest)
    assert len(unserved_blocks(end, model.num_blocks)) <= len(unserved_blocks(end0, model.num_blocks))
    if not unserved_blocks(end0, model.num_blocks):
        assert _flow(keep, model, end) >= _flow(keep, model, end0) * (1 - 1e-9)
    if upper_bound(keep, model) > 0:
        assert plan.budget_bound is not None and _flow(keep, model, end) <= plan.budget_bound * (1 + 1e-6)


def test_plan_placement_takes_the_milp_incumbent_only_when_better():
    from partitioner.placement import plan_placement

    rng = np.random.default_rng(1900)
    model, peers = _random_swarm(rng, 4, L=10)
    base = plan_placement(peers, model)
    with_milp = plan_placement(peers, model, milp_time_limit=10)
    assert _flow(peers, model, with_milp) >= _flow(peers, model, base) * (1 - 1e-9)
    assert set(with_milp) == set(base)
    res = solve(peers, model, time_limit=10)
    if res.status == 0:
        assert _flow(peers, model, with_milp) == pytest.approx(res.value, rel=2e-4)


def _serving_placement(peers, model, rng):
    """A random placement (:func:`_random_placement`) that serves something."""
    while True:
        start = _random_placement(peers, model, rng)
        if _flow(peers, model, start) > 0:
            return start


@pytest.mark.parametrize("n,L,seed", [(3, 4, s) for s in range(6)] + [(4, 4, s) for s in (6, 10, 11)])
def test_milp_started_from_a_placement_reaches_the_exhaustive_optimum(n, L, seed):
    # from a random covering placement as the first incumbent (highspy), the solve still ends at the optimum
    rng = np.random.default_rng(seed)
    model, peers = _tiny_swarm(rng, n, L)
    best = _exhaustive_best(model, peers)
    start = _serving_placement(peers, model, rng)
    res = solve(peers, model, time_limit=30, initial=start)
    assert res.status == 0
    assert _flow(peers, model, res.placement) == pytest.approx(best, rel=1e-5)
    assert best <= res.bound <= best * (1 + 2e-4)
    pl, _ = improve_placement(peers, model, start, time_limit=30)
    assert set(pl) == set(start)
    assert _flow(peers, model, pl) == pytest.approx(best, rel=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_improve_placement_is_never_worse_even_when_stopped_at_once(seed):
    rng = np.random.default_rng(2600 + seed)
    model, peers = _random_swarm(rng, 6, L=12)
    start = _serving_placement(peers, model, rng)
    for limit in (0.01, 5.0):
        pl, res = improve_placement(peers, model, start, time_limit=limit)
        assert set(pl) == set(start)
        assert not unserved_blocks(pl, model.num_blocks)
        assert _flow(peers, model, pl) >= _flow(peers, model, start) * (1 - 1e-9)
        assert res.bound >= _flow(peers, model, pl) * (1 - 1e-6)  # a true bound, however early it stopped


@pytest.mark.parametrize("seed", range(3))
def test_neighbourhood_search_improves_a_random_placement_and_keeps_every_peer(seed):
    # above full_max_peers: the large-neighbourhood search (3 peers move per program), from a random placement
    rng = np.random.default_rng(2700 + seed)
    model, peers = _random_swarm(rng, 6, L=12)
    start = _serving_placement(peers, model, rng)
    pl, res = improve_placement(peers, model, start, time_limit=4.0, full_max_peers=3, neighborhood=3,
                                solve_time=1.0, upper=upper_bound(peers, model))
    assert set(pl) == set(start)
    assert not unserved_blocks(pl, model.num_blocks)
    assert all(e - s <= max_blocks(p, model) for p in peers for s, e in [pl[p.peer_id]])
    assert _flow(peers, model, pl) > _flow(peers, model, start) * 1.01
    assert res.value == pytest.approx(_flow(peers, model, pl))


def test_improve_placement_refuses_a_placement_it_cannot_start_from():
    rng = np.random.default_rng(2800)
    model, peers = _random_swarm(rng, 4, L=8)
    good = _serving_placement(peers, model, rng)
    missing = dict(good)
    missing.pop(peers[0].peer_id)
    with pytest.raises(ValueError, match="no span"):
        improve_placement(peers, model, missing, time_limit=1)
    for bad in [(0, max_blocks(peers[1], model) + 1), (-1, 1), (3, 3), (7, 9), None, (1.5, 3), (1, 2, 3)]:
        pl = dict(good)
        pl[peers[1].peer_id] = bad
        with pytest.raises(ValueError, match="span"):
            improve_placement(peers, model, pl, time_limit=1)
        with pytest.raises(ValueError, match="span"):
            solve(peers, model, time_limit=1, initial=pl)  # a start it cannot use is refused, not dropped
    with pytest.raises(ValueError, match="not among the peers"):
        improve_placement(peers, model, {**good, "ghost": (0, 1)}, time_limit=1)
    with pytest.raises(ValueError, match="no span"):
        solve(peers, model, time_limit=1, initial=missing)
    with pytest.raises(ValueError, match="below what the placement already serves"):
        improve_placement(peers, model, good, time_limit=1, upper=0.5 * _flow(peers, model, good))


def test_improve_placement_returns_at_once_when_memory_cannot_hold_the_model():
    rng = np.random.default_rng(2801)
    model, peers = _random_swarm(rng, 6, L=12)
    few = sorted(peers, key=lambda p: max_blocks(p, model))[:2]
    assert sum(max_blocks(p, model) for p in few) < model.num_blocks
    start = {p.peer_id: (0, max_blocks(p, model)) for p in few}
    for full_max_peers in (8, 1):  # whole program, and the neighbourhood search
        pl, res = improve_placement(few, model, start, time_limit=30, full_max_peers=full_max_peers)
        assert pl == start and res.status == 2 and res.bound == 0.0 and res.seconds < 5


def test_an_incumbent_that_serves_nothing_is_no_placement():
    # in this swarm HiGHS's first incumbent within a short time is the trivial one (no span, nothing served): it
    # used to come back as the placement {}, which callers then passed on as a placement of no peer
    from sims.scale.swarmgen import make_swarm

    swarm = make_swarm(np.random.default_rng(13), 5, num_blocks=40)
    res = solve(swarm.peers, swarm.model, time_limit=0.05)
    assert res.placement is None or (res.placement and res.value > 0)
    assert res.placement is not None or res.value == 0.0
