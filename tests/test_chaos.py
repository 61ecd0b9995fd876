"""A short chaos run: concurrent generations while peers are SIGKILLed and restarted; a gap is healed."""

from sims.chaos import run_gap, run_replicas


def test_chaos_with_replicas(mha_model):
    r = run_replicas(mha_model, generations=6, new_tokens=40, clients=3, kill_every=1.0, restart_after=3.0)
    assert r["errors"] == []
    assert r["completed"] == r["equal"] == 6
    assert r["kills"] >= 1
    assert r["processes_left"] == []


def test_gap_is_healed_by_a_spare_peer(mha_model):
    r = run_gap(mha_model, new_tokens=20, kill_at_token=5)
    assert r["equal"]
    assert r["resumed_after_s"] < 30
    assert r["processes_left"] == []
