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


def _two_peers_in_threads(model, tmp_path, monkeypatch, run_id, outer_steps, setup_a, setup_b):
    """Train two peers ``a`` and ``b`` in threads of this process until both finish (``setup_a(a)`` and
    ``setup_b(b)`` run once each peer's network is up, before it trains); returns ``(a, b)``."""
    import threading

    from peer.trainer import TrainingPeer

    # hivemind's averager sets SIGINT's handler when it starts, which only the main thread may do
    set_handler = signal.signal
    monkeypatch.setattr(signal, "signal", lambda signum, handler: set_handler(signum, handler)
                        if threading.current_thread() is threading.main_thread() else signal.getsignal(signum))
    configs = [_config(model, tmp_path / name, run_id=run_id, outer_steps=outer_steps, eval_sequences=2,
                       batch_size=2, min_wait=2.0, shard=i, num_shards=2) for i, name in enumerate(("a", "b"))]
    a = TrainingPeer(configs[0])
    a_up, b_up = threading.Event(), threading.Event()

    def a_ready(maddrs):
        setup_a(a)
        configs[1].initial_peers = list(maddrs)
        a_up.set()
        assert b_up.wait(60), "peer b did not start"  # a starts training with b (a run of 3 outer steps is short)

    a.on_ready = a_ready
    results = {}
    threads = [threading.Thread(target=lambda: results.__setitem__("a", a.run()), daemon=True)]
    threads[0].start()
    assert a_up.wait(60), "peer a did not start"
    b = TrainingPeer(configs[1])
    b.on_ready = lambda maddrs: (setup_b(b), b_up.set())
    threads.append(threading.Thread(target=lambda: results.__setitem__("b", b.run()), daemon=True))
    threads[1].start()
    for t in threads:
        t.join(timeout=180)
    assert results.get("a", {}).get("finished") and results.get("b", {}).get("finished"), results
    return a, b


def _same_model(a, b):
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(pa, pb), f"{name} differs between the peers at the end of the run"
    assert a.sync.group_score == b.sync.group_score


def test_a_peer_whose_last_all_reduce_failed_on_its_side_ends_with_the_swarms_model(tiny_model, swarm_home, tmp_path,
                                                                                    monkeypatch):
    """An all-reduce can break on one side only (under load a stream times out after the other peer has all its
    parts): that peer steps alone while its groupmate applies the average. In the middle of a run it catches up at
    the next outer step; at the last outer step the two used to finish with different models."""
    outer_steps = 3

    def break_last_all_reduce(peer):
        sync = peer.sync
        step = sync.averager.step

        def failing_step(*args, **kwargs):
            gathered = step(*args, **kwargs)
            if gathered and sync.outer_step_count == outer_steps - 1:
                sync.averager.traffic.add("failed_reducers", 1)  # a's side broke after b had all its parts
            return gathered

        sync.averager.step = failing_step

    a, b = _two_peers_in_threads(tiny_model, tmp_path, monkeypatch, "finish_together", outer_steps,
                                 break_last_all_reduce, lambda peer: None)
    last_a, last_b = (_outer_events(tmp_path / name)[-1] for name in ("a", "b"))
    assert last_b["outer_step"] == outer_steps and last_b["group_size"] == 2, last_b
    assert last_a["group_size"] == 1 and "failed during the all-reduce" in last_a["note"], last_a
    catch_up = [e for e in read_metrics(tmp_path / "a") if e.get("kind") == "join" and e["time"] > last_a["time"]]
    assert catch_up and catch_up[0]["reason"] == "caught up" and catch_up[0]["outer_step"] == outer_steps
    _same_model(a, b)


def test_a_peer_late_for_the_last_outer_step_ends_with_the_swarms_model(tiny_model, swarm_home, tmp_path,
                                                                        monkeypatch):
    """A peer still in its inner steps when the others' last group formed (a slow or paused machine) finds itself
    behind, as in any round, and downloads their state. After the last outer step the others used to leave at once,
    so its download failed and it ended the run alone with its own model."""
    import functools

    import protocols.diloco as diloco

    # no extra waits for the late peer in the outer step itself: the others step without it at once
    monkeypatch.setattr(diloco, "DiLoCoConfig", functools.partial(diloco.DiLoCoConfig, slack=1.0, lonely_retries=0))
    outer_steps, pause = 3, 12.0

    def pause_before_the_last_inner_step(peer):
        inner_step = peer._inner_step

        def slow_inner_step():
            if peer.sync.outer_step_count == outer_steps - 1 and peer.inner_step == peer.cfg.inner_steps - 1:
                time.sleep(pause)
            return inner_step()

        peer._inner_step = slow_inner_step

    a, b = _two_peers_in_threads(tiny_model, tmp_path, monkeypatch, "finish_late", outer_steps,
                                 lambda peer: None, pause_before_the_last_inner_step)
    last_a = _outer_events(tmp_path / "a")[-1]
    assert last_a["outer_step"] == outer_steps and last_a["group_size"] == 1, last_a  # b was late
    joins_b = [e for e in read_metrics(tmp_path / "b") if e.get("kind") == "join"]
    assert joins_b and joins_b[-1]["reason"] == "caught up" and joins_b[-1]["outer_step"] == outer_steps, joins_b
    _same_model(a, b)


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
        # a and b average together (a's first round may end before b has started on a loaded machine)
        while not any(e["group_size"] == 2 for e in _outer_events(tmp_path / "a")) and time.time() < deadline:
            assert a.poll() is None and b.poll() is None, "a peer exited early"
            time.sleep(0.3)
        assert any(e["group_size"] == 2 for e in _outer_events(tmp_path / "a")), _outer_events(tmp_path / "a")
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
    # stream can fail even between two live peers, on one side or both): a peer then steps alone, and one of the
    # two catches up with the other, at the next outer step or, after the last one, before leaving
    c_trains = outer_c[0]["time"] - 1.0  # (a logs the same round a moment earlier than c)
    catch_ups = [e["time"] for name in ("a", "c") for e in read_metrics(tmp_path / name)
                 if e.get("reason") == "caught up"]
    for name, outer in (("a", outer_a), ("c", outer_c)):
        for e in outer:
            if e["group_size"] < 2 and e["time"] >= c_trains:
                assert "failed during the all-reduce" in e["note"], (name, e)
                assert any(t > e["time"] for t in catch_ups), f"nobody caught up after {name}'s lone step {e}"
    # the two survivors hold the same model (compression none: equal up to float32 rounding)
    from safetensors.torch import load_file

    wa, wc = (load_file(str(tmp_path / p / "model" / "model.safetensors")) for p in ("a", "c"))
    assert max(float((wa[k] - wc[k]).abs().max()) for k in wa) < 1e-4
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["traffic"]["allreduce_sent"] > 0 and summary["traffic"]["state_sent"] > 0


def test_a_loss_plot_without_curves_is_drawn_without_a_warning(tmp_path):
    """A peer that only downloaded the final state has no curve: matplotlib warned that the legend was empty."""
    import warnings

    from peer.trainer import plot_loss_curves

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_loss_curves({"x": {"inner": [], "outer": []}}, tmp_path / "loss.png", title="empty")
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_train_cli_requires_a_swarm_choice(tiny_model, tmp_path, capsys):
    from swarm.cli import main

    assert main(["train", "--model", tiny_model, "--run-dir", str(tmp_path / "x")]) == 2
    assert "--new-swarm" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--inner-steps", "0"], "--inner-steps: must be at least 1, got 0"),
    (["--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
    (["--seq-len", "0"], "--seq-len: must be at least 1, got 0"),
    (["--log-every", "0"], "--log-every: must be at least 1, got 0"),
    (["--outer-steps", "-3"], "--outer-steps: must be at least 1, got -3"),
    (["--num-threads", "0"], "--num-threads: must be at least 1, got 0"),
    (["--warmup", "-1"], "--warmup: must be at least 0, got -1"),
    (["--min-wait", "10", "--max-wait", "1"], "error: --min-wait 10 is above --max-wait 1"),
    (["--model", "/nonexistent/model"], "error: --model /nonexistent/model: no such model directory"),
    (["--seq-len", "100000"], "error: --seq-len 100000 is over the model's limit of 256 tokens"),
])
def test_bad_train_arguments_are_one_line_errors(tiny_model, tmp_path, capsys, args, message):
    """Each of these was a traceback (ZeroDivisionError, a reshape error), a run that 'finished' after 0 outer steps,
    a misleading hub-id error, or (--seq-len over the model's limit) an inner step that grew until the machine ran
    out of memory."""
    from swarm.cli import main

    argv = ["train", "--model", tiny_model, "--new-swarm", "--run-dir", str(tmp_path / "x"), *args]
    if args[0] == "--model":
        argv = argv[:1] + argv[3:]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_an_address_the_daemon_refuses_is_a_one_line_error(tiny_model, swarm_home, tmp_path):
    """A malformed --host-maddrs (or an unreachable --initial-peers) was a 32-line P2PDaemonError traceback."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "swarm.cli", "train", "--model", tiny_model, "--new-swarm", "--host-maddrs", "garbage",
         "--run-dir", str(tmp_path / "x"), "--inner-steps", "2", "--outer-steps", "1", "--no-save-model"],
        capture_output=True, text=True, timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: the libp2p daemon refused the addresses given (garbage)" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_joining_a_run_of_another_model_is_a_one_line_error(tiny_model, swarm_home, tmp_path):
    """A peer given another model than the run's (here one more layer) downloaded the run's state again and again
    (a state of the wrong shape, 1.6 GB in 30 s on a 32k-vocabulary model), then trained alone and said it had
    finished. Progress records carry a fingerprint of the model; a peer of another model is refused at once."""
    import subprocess

    from swarm.default_model import build_model

    other = str(tmp_path / "other")
    build_model(other, num_hidden_layers=3, hidden_size=64, intermediate_size=172, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=259, max_position_embeddings=256)
    with Processes() as procs:
        boot = start_bootstrap(procs, tmp_path / "boot.log")
        a = _start(procs, tiny_model, tmp_path / "a", boot, 0, extra=("--outer-steps", "1000"))  # (runs throughout)
        deadline = time.time() + 60
        while not [e for e in read_metrics(tmp_path / "a") if e.get("kind") == "inner"] and time.time() < deadline:
            assert a.poll() is None, (tmp_path / "a" / "peer.log").read_text()[-2000:]
            time.sleep(0.3)
        proc = subprocess.run(
            [sys.executable, "-m", "swarm.cli", "train", "--model", other, "--run-dir", str(tmp_path / "b"),
             "--run-id", "join_leave", "--initial-peers", *boot, "--inner-steps", "40", "--no-save-model"],
            capture_output=True, text=True, timeout=120,
            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
        assert a.poll() is None, "the run's peer stopped"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: run 'join_leave' trains another model" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "incomplete downloaded state" not in proc.stderr, proc.stderr[-3000:]


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
