"""Training peers (peer.trainer, `swarm train`): resume from a checkpoint, join and leave a running swarm."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from sims.bench_train import Processes, read_metrics, start_bootstrap

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from swarm.default_model import build_model

    path = tmp_path_factory.mktemp("model") / "tiny"
    build_model(str(path), num_hidden_layers=2, hidden_size=64, intermediate_size=172, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=259, max_position_embeddings=256)
    return str(path)


@pytest.fixture(scope="module")
def swarm_home(tmp_path_factory):
    """Token caches go to a temporary SWARM_HOME (shared by the tests of this module)."""
    home = tmp_path_factory.mktemp("swarm_home")
    old = os.environ.get("SWARM_HOME")
    os.environ["SWARM_HOME"] = str(home)
    yield str(home)
    if old is None:
        os.environ.pop("SWARM_HOME", None)
    else:
        os.environ["SWARM_HOME"] = old


def _config(model, run_dir, **kw):
    from peer.trainer import TrainConfig

    base = dict(model=model, run_dir=str(run_dir), run_id=f"resume_{run_dir.name}", inner_steps=5, outer_steps=4,
                batch_size=4, seq_len=32, warmup=3, eval_sequences=4, log_every=5, save_model=False,
                progress_period=0.5)
    base.update(kw)
    return TrainConfig(**base)


def _params(peer):
    return {k: v.detach().clone() for k, v in peer.model.state_dict().items()}


def test_a_restarted_peer_resumes_from_its_checkpoint_exactly(tiny_model, swarm_home, tmp_path):
    from peer.trainer import TrainingPeer

    straight = TrainingPeer(_config(tiny_model, tmp_path / "straight"))
    summary = straight.run()
    assert summary["finished"] and summary["outer_steps"] == 4
    reference = _params(straight)

    first = TrainingPeer(_config(tiny_model, tmp_path / "interrupted", stop_after=2))
    assert not first.run()["finished"]
    state = torch.load(tmp_path / "interrupted" / "checkpoint.pt", weights_only=False)
    assert state["sync"]["metadata"]["outer_step"] == 2 and state["batches_used"] == 10
    assert len(state["sync"]["tensors"]) == 2 * len(list(first.model.parameters()))  # anchor + outer momentum
    assert state["inner_optimizer"]["state"], "the AdamW state is part of the checkpoint"

    second = TrainingPeer(_config(tiny_model, tmp_path / "interrupted"))
    summary = second.run()
    assert summary["finished"] and summary["outer_steps"] == 4
    for name, tensor in _params(second).items():
        assert torch.equal(tensor, reference[name]), f"{name} differs after resuming"
    events = read_metrics(tmp_path / "interrupted")
    assert [e["outer_step"] for e in events if e["kind"] == "outer"] == [1, 2, 3, 4]
    assert (tmp_path / "straight" / "loss.png").stat().st_size > 1000


def _start(procs, model, run_dir, boot, shard, extra=()):
    args = [sys.executable, "-m", "swarm.cli", "train", "--model", model, "--run-dir", str(run_dir),
            "--run-id", "join_leave", "--shard", f"{shard}/3", "--inner-steps", "40", "--outer-steps", "10",
            "--batch-size", "8", "--seq-len", "128", "--warmup", "5", "--compression", "none",
            "--eval-sequences", "4", "--log-every", "20", "--min-wait", "3", "--initial-peers", *boot, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    return procs.start(args, run_dir / "peer.log", env=env)


def _outer_events(run_dir):
    return [e for e in read_metrics(run_dir) if e.get("kind") == "outer"]


def _sessions_alive(pids):
    import psutil

    alive = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) in pids and p.status() != psutil.STATUS_ZOMBIE:
                alive.append((p.pid, p.name(), p.ppid(), os.getpgid(p.pid), " ".join(p.cmdline())[:80]))
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return alive


def test_peers_die_and_join_without_losing_an_outer_step(tiny_model, swarm_home, tmp_path):
    with Processes() as procs:
        boot = start_bootstrap(procs, tmp_path / "boot.log")
        a = _start(procs, tiny_model, tmp_path / "a", boot, 0)
        b = _start(procs, tiny_model, tmp_path / "b", boot, 1)
        deadline = time.time() + 120
        while not _outer_events(tmp_path / "a") and time.time() < deadline:
            assert a.poll() is None and b.poll() is None, "a peer exited early"
            time.sleep(0.3)
        assert _outer_events(tmp_path / "a")[0]["group_size"] == 2
        # c joins the run (it boots while a and b train); b dies in the middle of round 2 (SIGKILL: no goodbye)
        c = _start(procs, tiny_model, tmp_path / "c", boot, 2)
        while time.time() < deadline:
            inner = [e["step"] for e in read_metrics(tmp_path / "b") if e.get("kind") == "inner"]
            if inner and inner[-1] >= 60:
                break
            time.sleep(0.2)
        Processes.kill(b, signal.SIGKILL)
        for proc in (a, c):
            proc.wait(timeout=240)
        assert a.returncode == 0 and c.returncode == 0, (a.returncode, c.returncode)
        sessions = {p.pid for p in procs.procs}
    time.sleep(1.5)  # the reapers of SIGKILLed peers poll twice a second
    leftovers = _sessions_alive(sessions)
    assert not leftovers, f"processes of the test swarm are still running: {leftovers}"

    outer_a = _outer_events(tmp_path / "a")
    assert [e["outer_step"] for e in outer_a] == list(range(1, 11)), "peer a lost an outer step"
    assert all(not e["error"] for e in outer_a), [e["error"] for e in outer_a]
    joins = [e for e in read_metrics(tmp_path / "c") if e.get("kind") == "join"]
    assert joins and joins[0]["bytes_received"] > 0, "the newcomer did not download the swarm's state"
    outer_c = _outer_events(tmp_path / "c")
    assert outer_c and outer_c[-1]["outer_step"] == 10
    assert all(not e["error"] for e in outer_c), [e["error"] for e in outer_c]
    # c averages with a in every round, except a round whose all-reduce lost its groupmate (on a loaded machine a
    # stream can fail even between two live peers): c then steps alone and must catch up with the main group
    events_c = read_metrics(tmp_path / "c")
    for i, e in enumerate(events_c):
        if e.get("kind") == "outer" and e["group_size"] < 2:
            assert "failed during the all-reduce" in e["note"], e
            assert any(later.get("reason") == "caught up" for later in events_c[i + 1:]), "c did not catch up"
    assert outer_a[-1]["group_size"] == 2, "a did not average with the newcomer at the end"
    # the two survivors hold the same model (compression none: equal up to float32 rounding)
    from safetensors.torch import load_file

    wa, wc = (load_file(str(tmp_path / p / "model" / "model.safetensors")) for p in ("a", "c"))
    assert max(float((wa[k] - wc[k]).abs().max()) for k in wa) < 1e-4
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["traffic"]["allreduce_sent"] > 0 and summary["traffic"]["state_sent"] > 0


def test_train_cli_requires_a_swarm_choice(tiny_model, tmp_path, capsys):
    from swarm.cli import main

    assert main(["train", "--model", tiny_model, "--run-dir", str(tmp_path / "x")]) == 2
    assert "--new-swarm" in capsys.readouterr().err


def test_ctrl_c_stops_a_training_peer(tiny_model, swarm_home, tmp_path):
    """SIGINT (Ctrl-C) makes a training peer leave after its current inner step: starting hivemind's averager
    process once left SIGINT ignored, so Ctrl-C did nothing; it then exited 1 as if training had failed; and with
    the signal sent to the whole process group (a terminal's Ctrl-C) it hung after TRAIN_DONE, waiting for a
    network child process that never exited."""
    import signal
    import subprocess

    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "swarm.cli", "train", "--model", tiny_model, "--new-swarm", "--run-dir", str(run_dir),
         "--inner-steps", "10", "--outer-steps", "50", "--batch-size", "2", "--seq-len", "32",
         "--eval-sequences", "2", "--min-wait", "1", "--no-save-model"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT)),
    )
    try:
        for line in proc.stdout:
            if line.startswith("TRAIN_READY"):
                break
        time.sleep(2)
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: to the whole process group, children too
        proc.wait(timeout=60)
        assert (run_dir / "checkpoint.pt").exists() or (run_dir / "summary.json").exists()
        assert proc.returncode == 0, proc.returncode
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _stuck_child():
    import signal as _signal

    _signal.signal(_signal.SIGTERM, _signal.SIG_IGN)
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    time.sleep(600)


def test_a_network_child_that_ignores_shutdown_is_killed():
    """A stopped training peer must not wait forever on a network child process that does not exit (Python joins
    every multiprocessing child at exit)."""
    import multiprocessing

    from peer.trainer import stop_children

    child = multiprocessing.get_context("fork").Process(target=_stuck_child, daemon=True)
    child.start()
    time.sleep(0.5)
    child.terminate()  # what hivemind does after its shutdown timeout: ignored by this child
    t0 = time.monotonic()
    stop_children(grace=1.0)
    assert not child.is_alive()
    assert time.monotonic() - t0 < 10
