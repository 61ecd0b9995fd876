"""The swarm-scale simulator runs the partitioner end to end (small, fast cases)."""

import numpy as np
import pytest

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


def test_bench_swarm_is_reproducible_and_the_milp_improvement_is_never_worse():
    # each bench swarm has its own random stream (so --jobs does not change the figures); the MILP started from
    # our placement (improve_time) serves at least what the heuristics alone serve, and never above the bound
    from sims.bench_partitioner import one_swarm

    plain, reb = one_swarm(8, 3, 0, 8, milp_time=0.0, improve_time=0.0)
    again, _ = one_swarm(8, 3, 0, 8, milp_time=0.0, improve_time=0.0)
    better, _ = one_swarm(8, 3, 0, 8, milp_time=0.0, improve_time=2.0)
    assert plain["bound"] == again["bound"] == better["bound"] > 0 and plain["ours"] == again["ours"]
    assert plain["ours"] * (1 - 1e-9) <= better["ours"] <= better["bound"] * (1 + 1e-6)
    assert reb is not None and (not reb["coverable"] or reb["unsafe_blocks"] == 0)


def test_bench_progress_line_leaves_out_figures_a_size_does_not_have():
    # found by a user: a size without the rebalancing MILP printed "best within the move budget <= nan"
    from sims.bench_partitioner import progress_line

    s = dict(swarms=3, static_s_med=1.0, ours_med=0.9, ours_p10=0.8, ours_loose_med=0.9, petals_med=0.1,
             reb_after_med=0.7, reb_after_p10=0.5)
    line = progress_line(20, s, 12.0)
    assert "nan" not in line and "move budget" not in line and "before the MILP" not in line, line
    assert "0.900 of the bound" in line and "after 20% leave 0.700" in line and "left out" not in line
    assert "Petals 0.100 of the bound" in line
    line = progress_line(4, dict(s, reb_uncoverable=2), 12.0)
    assert "(p10 0.500; 2 of 3 swarms left out: their remaining peers cannot hold the model)" in line, line
    line = progress_line(8, dict(s, reb_budget_bound_med=0.71, ours_loose_med=0.85), 12.0)
    assert "the best plan within the move budget serves <= 0.710" in line and "0.850 of the bound before" in line


def test_resilience_ceiling_measures_the_benchmarks_swarms_with_foreknowledge(tmp_path, capsys):
    # sims.resilience_ceiling: the benchmark's swarms and leavers; the placement planned for the one departure that
    # then happens keeps its share of the bound, and the benchmark's plan from it stays safe and within one move
    import json

    from sims import resilience_ceiling

    resilience_ceiling.main(["--size", "4", "--count", "2", "--time", "1", "--improve-time", "1", "--keep", "0.9",
                             "--jobs", "1", "--out", str(tmp_path)])
    assert "| knew, keep 0.9 |" in capsys.readouterr().out
    out = json.loads((tmp_path / "resilience_ceiling.json").read_text())
    covered = [s for s in out["swarms"] if s["rows"]["ours"]["coverable"]]
    assert covered and out["summary"][1]["swarms"] == len(covered)
    for s in covered:
        knew = s["rows"]["knew, keep 0.9"]
        assert len(s["leave"]) == 1
        assert knew["static"] >= min(0.9 * s["bound"], s["ours"]) * (1 - 1e-6)
        assert knew["moved"] <= 1 and knew["unsafe_blocks"] == 0
        assert 0 <= knew["after"] <= knew["new_bound"] * (1 + 1e-6)


def test_resilience_ceiling_refuses_bad_arguments_before_any_work(tmp_path, capsys):
    from sims import resilience_ceiling

    afile = tmp_path / "a_file"
    afile.write_text("")
    for bad in (["--keep", "abc"], ["--keep", "0"], ["--keep", "1.5"], ["--time", "nan"], ["--time", "0"],
                ["--jobs", "0"], ["--size", "1"], ["--count", "0"], ["--milp-time", "-1"], ["--out", str(afile)]):
        with pytest.raises(SystemExit) as e:
            resilience_ceiling.main(bad)
        assert e.value.code == 2, bad
        assert "error:" in capsys.readouterr().err
