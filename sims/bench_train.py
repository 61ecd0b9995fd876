"""``python -m sims.bench_train``: one small model trained three ways on the same data and token budget.

1. **baseline**: synchronous data-parallel training, 4 worker processes, gradients averaged every inner step
   with a ring all-reduce (``torch.distributed`` / gloo over loopback);
2. **diloco**: 4 ``swarm train`` peers (DiLoCo, H inner steps, fp16 all-reduce through hivemind);
3. **diloco-churn**: as 2, but one peer is SIGKILLed halfway through the run and a new peer joins later
   (it downloads the state from the live peers and takes over the dead peer's data shard past the part that
   peer had used).

All three start from the same checkpoint: a random Llama (``swarm.default_model.build_model``) briefly trained
by a single process (no communication; the DiLoCo paper likewise starts its runs from a pretrained model), and
each worker sees the same shard of the corpus with the same batch size and the same number of inner steps.
The table reports each run's final validation loss (256 held-out sequences, the same for all) and the bytes its
workers sent: for the baseline, those of a ring all-reduce of the float32 gradient
(``2 (N-1)/N * 4 bytes * parameters`` per worker per step, what gloo's ring sends); for DiLoCo, the payload
bytes counted by :mod:`protocols.diloco` (all-reduce and state downloads). Outputs: ``out/bench_train/``
(``results.json``, ``loss_curves.png``, every peer's logs and metrics).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "out" / "bench_train"


@dataclass
class BenchConfig:
    """Sizes of one bench run. ``steps`` is inner steps per worker; DiLoCo runs ``steps / inner_steps`` outer
    steps. Tokens per run: ``workers * steps * batch_size * seq_len``."""

    layers: int = 4
    hidden: int = 256
    intermediate: int = 688
    heads: int = 4
    vocab: int = 259  # the byte-level tokenizer: 3 specials + 256 bytes
    seq_len: int = 128
    batch_size: int = 8
    workers: int = 4
    steps: int = 300
    inner_steps: int = 60
    lr: float = 1e-3
    warmup: int = 20
    warm_start_steps: int = 150
    warm_start_batch: int = 32
    warm_start_lr: float = 2e-3
    # The outer Nesterov step: ``swarm train`` defaults to the DiLoCo paper's 0.7 / 0.9; with only 5 outer steps
    # here a sweep (``sims/sweep_train.py``: outer lr 0.35-1.2, momentum 0.8/0.9, inner lr, warm-up) found
    # 1.0 / 0.8 best (val loss 1.3026 vs 1.3145 at 0.7 / 0.9), so the bench passes those.
    outer_lr: float = 1.0
    outer_momentum: float = 0.8
    compression: str = "fp16"
    eval_sequences: int = 256
    kill_at: float = 0.5  # run 3: a peer is killed in the middle of the round that holds this fraction of the run
    seed: int = 0

    @classmethod
    def quick(cls) -> "BenchConfig":
        return cls(layers=2, hidden=128, intermediate=344, steps=300, inner_steps=60, warm_start_steps=40,
                   eval_sequences=128, warmup=10)


# --------------------------------------------------------------------------------------------- processes
class Processes:
    """Child processes of the bench: each in its own session, all killed (with their children) on exit."""

    def __init__(self):
        self.procs: List[subprocess.Popen] = []

    def start(self, args: Sequence[str], log_path: Path, env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "wb")
        proc = subprocess.Popen(list(args), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=ROOT, env=env or child_env(), start_new_session=True)
        log.close()
        proc.log_path = log_path  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    @staticmethod
    def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        """Signal ``proc``'s whole process group (its session: it and its children)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def stop_all(self, grace: float = 10.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self.kill(proc, signal.SIGTERM)
        deadline = time.time() + grace
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.time()))
        for proc in self.procs:
            self.kill(proc, signal.SIGKILL)  # whatever is left of each group, children included
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop_all()


def child_env() -> Dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def wait_for_line(path: Path, prefix: str, proc: subprocess.Popen, timeout: float = 120.0) -> str:
    """Wait until the log at ``path`` has a line starting with ``prefix``; return the rest of that line."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith(prefix):
                    return line[len(prefix):].strip()
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before printing {prefix!r}; see {path}")
        time.sleep(0.2)
    raise TimeoutError(f"no {prefix!r} line in {path} after {timeout} s")


def start_bootstrap(procs: Processes, log_path: Path) -> List[str]:
    """Start a ``swarm dht`` bootstrap node on 127.0.0.1; return its multiaddrs."""
    proc = procs.start([sys.executable, "-m", "swarm.cli", "dht"], log_path)
    return wait_for_line(log_path, "DHT_READY", proc).split()


def start_trainer(procs: Processes, run_dir: Path, *, model: str, initial_peers: Sequence[str], shard: int,
                  num_shards: int, cfg: BenchConfig, run_id: str, extra: Sequence[str] = ()) -> subprocess.Popen:
    """Start one ``swarm train`` peer; its output goes to ``run_dir/peer.log``."""
    args = [sys.executable, "-m", "swarm.cli", "train", "--model", model, "--run-dir", str(run_dir),
            "--run-id", run_id, "--shard", f"{shard}/{num_shards}", "--inner-steps", str(cfg.inner_steps),
            "--outer-steps", str(cfg.steps // cfg.inner_steps), "--batch-size", str(cfg.batch_size),
            "--seq-len", str(cfg.seq_len), "--lr", str(cfg.lr), "--warmup", str(cfg.warmup),
            "--compression", cfg.compression, "--outer-lr", str(cfg.outer_lr),
            "--outer-momentum", str(cfg.outer_momentum), "--seed", str(cfg.seed), "--eval-sequences", "32",
            "--no-resume"]
    args += ["--initial-peers", *initial_peers] if initial_peers else ["--new-swarm"]
    return procs.start(args + list(extra), run_dir / "peer.log")


def read_metrics(run_dir: Path) -> List[Dict[str, Any]]:
    """The events a peer wrote to ``run_dir/metrics.jsonl``."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------- the model
def prepare_start_model(cfg: BenchConfig, log=print) -> Path:
    """Build the random model and warm-start it (one process, no communication); cached by configuration."""
    import torch

    from peer.trainer import ShardSampler, evaluate, lm_loss, make_inner_optimizer, tokenize_corpus
    from swarm.default_model import build_model

    shape = dict(num_hidden_layers=cfg.layers, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                 num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads, vocab_size=cfg.vocab,
                 max_position_embeddings=max(512, cfg.seq_len), seed=cfg.seed)
    key = json.dumps([shape, cfg.seq_len, cfg.workers, cfg.warm_start_steps, cfg.warm_start_batch,
                      cfg.warm_start_lr], sort_keys=True)
    path = OUT / "models" / ("start-" + hashlib.sha256(key.encode()).hexdigest()[:12])
    if (path / "WARM_START.json").exists():
        return path
    init = OUT / "models" / "init"
    init.parent.mkdir(parents=True, exist_ok=True)
    build_model(str(init), **shape)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(init)
    model = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    train, val = tokenize_corpus(tokenizer, cache_dir=OUT / "tokens")
    t0 = time.perf_counter()
    if cfg.warm_start_steps:
        torch.manual_seed(cfg.seed)
        # warm-start data: the tail of every worker's shard, which no run reaches (runs read from the head)
        samplers = [ShardSampler(train, seq_len=cfg.seq_len, batch_size=cfg.warm_start_batch // cfg.workers,
                                 shard=i, num_shards=cfg.workers, seed=cfg.seed) for i in range(cfg.workers)]
        opt = make_inner_optimizer(model, cfg.warm_start_lr, 0.1)
        for step in range(cfg.warm_start_steps):
            lr = cfg.warm_start_lr * min(1.0, (step + 1) / 20) * (1 - 0.5 * step / cfg.warm_start_steps)
            for g in opt.param_groups:
                g["lr"] = lr
            batch = torch.cat([s.batch(s.batches_per_pass - 1 - step) for s in samplers])
            loss = lm_loss(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if (step + 1) % 20 == 0:
                log(f"  warm start {step + 1}/{cfg.warm_start_steps}: loss {loss.item():.3f}")
    val_loss = evaluate(model, val, seq_len=cfg.seq_len, num_sequences=cfg.eval_sequences)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    with open(tmp / "WARM_START.json", "w") as f:
        json.dump(dict(steps=cfg.warm_start_steps, val_loss=val_loss, params=n_params,
                       tokens=cfg.warm_start_steps * cfg.warm_start_batch * cfg.seq_len,
                       seconds=time.perf_counter() - t0), f)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def final_val_loss(model_dir: Path, cfg: BenchConfig) -> float:
    """Validation loss of the model in ``model_dir`` on the bench's held-out sequences."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peer.trainer import evaluate, tokenize_corpus

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    _, val = tokenize_corpus(tokenizer, cache_dir=OUT / "tokens")
    return evaluate(model, val, seq_len=cfg.seq_len, num_sequences=cfg.eval_sequences)


# --------------------------------------------------------------------------------------------- run 1: baseline
def ddp_worker(rank: int, world: int, port: int, model_dir: str, out_dir: str, cfg: BenchConfig) -> None:
    """One worker of the synchronous data-parallel baseline: AdamW on the gradient averaged over all workers
    every step (``torch.distributed.all_reduce`` with gloo, a ring all-reduce, float32)."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peer.trainer import ShardSampler, evaluate, inner_lr, lm_loss, make_inner_optimizer, tokenize_corpus

    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    out = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    train, val = tokenize_corpus(tokenizer, cache_dir=OUT / "tokens")
    sampler = ShardSampler(train, seq_len=cfg.seq_len, batch_size=cfg.batch_size, shard=rank, num_shards=world,
                           seed=cfg.seed)
    opt = make_inner_optimizer(model, cfg.lr, 0.1)
    params = [p for p in model.parameters()]
    numel = sum(p.numel() for p in params)
    bytes_per_step = int(2 * (world - 1) / world * numel * 4)
    history: Dict[str, list] = {"inner": [], "outer": []}
    sent, t0, t_log = 0, time.perf_counter(), time.perf_counter()
    metrics = open(out / f"metrics-rank{rank}.jsonl", "w")
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = inner_lr(step, peak=cfg.lr, warmup=cfg.warmup, total=cfg.steps)
        batch = sampler.batch(step)
        loss = lm_loss(model, batch)
        loss.backward()
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= world
        sent += bytes_per_step
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        history["inner"].append(dict(step=step + 1, loss=loss.item()))
        if rank == 0 and (step + 1) % 10 == 0:
            dt = time.perf_counter() - t_log
            t_log = time.perf_counter()
            print(f"baseline step {step + 1} | loss {loss.item():.4f} | "
                  f"{10 * cfg.batch_size * cfg.seq_len * world / dt:.0f} tokens/s (all workers) | "
                  f"sent {sent / 1e6:.1f} MB", flush=True)
        if rank == 0 and (step + 1) % cfg.inner_steps == 0:
            v = evaluate(model, val, seq_len=cfg.seq_len, num_sequences=32)
            history["outer"].append(dict(step=step + 1, val_loss=v))
        metrics.write(json.dumps(dict(step=step + 1, loss=loss.item(), bytes_sent=sent)) + "\n")
    metrics.close()
    if rank == 0:
        model.save_pretrained(out / "model", safe_serialization=True)
        tokenizer.save_pretrained(out / "model")
        with open(out / "history.json", "w") as f:
            json.dump(history, f)
    with open(out / f"summary-rank{rank}.json", "w") as f:
        json.dump(dict(bytes_sent=sent, bytes_received=sent, seconds=time.perf_counter() - t0,
                       tokens=cfg.steps * cfg.batch_size * cfg.seq_len), f)
    dist.barrier()
    dist.destroy_process_group()


def run_baseline(cfg: BenchConfig, model_dir: Path, log=print, out: Optional[Path] = None) -> Dict[str, Any]:
    """Run 1. ``out``: where its workers write (default ``out/bench_train/baseline``; emptied first)."""
    out = Path(out) if out is not None else OUT / "baseline"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    port = free_port()
    t0 = time.perf_counter()
    with Processes() as procs:
        workers = []
        for rank in range(cfg.workers):
            workers.append(procs.start(
                [sys.executable, "-m", "sims.bench_train", "--ddp-worker", str(rank), "--port", str(port),
                 "--model-dir", str(model_dir), "--out-dir", str(out), "--config", json.dumps(asdict(cfg))],
                out / f"worker{rank}.log"))
        shown = 0
        while any(w.poll() is None for w in workers):
            lines = (out / "worker0.log").read_text(errors="replace").splitlines() if (out / "worker0.log").exists() else []
            for line in lines[shown:]:
                if line.startswith("baseline step"):
                    step = int(line.split("|")[0].split()[-1])
                    if step % cfg.inner_steps == 0:
                        log("  " + line)
            shown = len(lines)
            if any(w.poll() not in (None, 0) for w in workers):
                raise RuntimeError(f"a baseline worker failed; see {out}/worker*.log")
            time.sleep(1.0)
    wall = time.perf_counter() - t0
    summaries = [json.loads((out / f"summary-rank{r}.json").read_text()) for r in range(cfg.workers)]
    history = json.loads((out / "history.json").read_text())
    return dict(name="baseline", label="1. sync data-parallel (4 workers, every step)",
                val_loss=final_val_loss(out / "model", cfg), bytes_sent=sum(s["bytes_sent"] for s in summaries),
                bytes_sent_per_worker=[s["bytes_sent"] for s in summaries], wall_s=wall,
                tokens=sum(s["tokens"] for s in summaries), outer_steps=None, history=history)


# --------------------------------------------------------------------------------------------- runs 2 and 3
def run_diloco(cfg: BenchConfig, model_dir: Path, *, churn: bool, log=print, out: Optional[Path] = None,
               run_id: Optional[str] = None) -> Dict[str, Any]:
    """Run 2 (or 3 with ``churn``). ``out``: the peers' directories (default ``out/bench_train/NAME``; emptied
    first); ``run_id``: the swarm's run id (default: unique to this process)."""
    name = "diloco-churn" if churn else "diloco"
    out = Path(out) if out is not None else OUT / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    outer_steps = cfg.steps // cfg.inner_steps
    run_id = run_id or f"bench_{name.replace('-', '_')}_{os.getpid()}"
    t0 = time.perf_counter()
    events: List[str] = []
    with Processes() as procs:
        boot = start_bootstrap(procs, out / "bootstrap.log")
        peers = {}
        for i in range(cfg.workers):
            peers[f"peer{i}"] = start_trainer(procs, out / f"peer{i}", model=str(model_dir), initial_peers=boot,
                                              shard=i, num_shards=cfg.workers, cfg=cfg, run_id=run_id)
        victim, killed, joined = "peer1", False, False
        # kill in the middle of a round (an inner step, not an all-reduce); start the newcomer right after the
        # next outer step, so that it has most of a round to boot, download the state and join
        H = cfg.inner_steps
        kill_step = int(cfg.kill_at * cfg.steps) // H * H + H // 2
        join_after_outer = kill_step // H + 1
        last_outer = 0
        while True:
            alive = {k: p for k, p in peers.items() if p.poll() is None}
            if not alive:
                break
            for k, p in peers.items():
                if p.poll() not in (None, 0) and not (killed and k == victim):
                    raise RuntimeError(f"{name}: {k} exited with {p.returncode}; see {out / k / 'peer.log'}")
            m0 = read_metrics(out / "peer0")
            outers = [e for e in m0 if e.get("kind") == "outer"]
            for e in outers[last_outer:]:
                log(f"  outer step {e['outer_step']}/{outer_steps}: group {e['group_size']}/{e['expected_group']}, "
                    f"val loss {e['val_loss']:.4f}, peer0 sent {e['bytes_sent'] / 1e6:.2f} MB, "
                    f"waited {e['wait_seconds']:.1f} s")
            last_outer = len(outers)
            if churn and not killed:
                steps = [e["step"] for e in read_metrics(out / victim) if e.get("kind") == "inner"]
                if steps and steps[-1] >= kill_step:
                    Processes.kill(peers[victim], signal.SIGKILL)
                    killed = True
                    events.append(f"SIGKILL {victim} at its step {steps[-1]} ({time.perf_counter() - t0:.0f} s)")
                    log("  " + events[-1])
            if churn and killed and not joined:
                steps = [e["step"] for e in m0 if e.get("kind") == "inner"]
                if outers and outers[-1]["outer_step"] >= join_after_outer:
                    # the newcomer takes over the dead peer's shard, past anything that peer could have used
                    peers["peer4"] = start_trainer(procs, out / "peer4", model=str(model_dir), initial_peers=boot,
                                                   shard=1, num_shards=cfg.workers, cfg=cfg, run_id=run_id,
                                                   extra=["--data-offset", str(cfg.steps)])
                    joined = True
                    events.append(f"peer4 joins at the swarm's step {steps[-1]} ({time.perf_counter() - t0:.0f} s)")
                    log("  " + events[-1])
            if time.perf_counter() - t0 > 3600:
                raise TimeoutError(f"{name} did not finish within an hour")
            time.sleep(1.0)
    wall = time.perf_counter() - t0
    summaries, traffic, outer_by_peer = {}, {}, {}
    for k in peers:
        path = out / k / "summary.json"
        if path.exists():
            summaries[k] = json.loads(path.read_text())
        metrics = read_metrics(out / k)
        outer_by_peer[k] = [e for e in metrics if e.get("kind") == "outer"]
        # traffic counters of a killed peer never reach its summary: add up its per-step figures instead
        traffic[k] = summaries[k]["traffic"] if k in summaries else dict(
            allreduce_sent=sum(e["bytes_sent"] for e in outer_by_peer[k]), state_sent=0, state_received=0,
            allreduce_received=sum(e["bytes_received"] for e in outer_by_peer[k]))
    survivors = [k for k in summaries if summaries[k].get("finished")]
    lost = check_outer_steps(outer_by_peer, survivors, outer_steps)
    divergence = replica_divergence([out / k / "model" for k in survivors])
    sent = {k: t["allreduce_sent"] + t["state_sent"] for k, t in traffic.items()}
    joins = [e for k in peers for e in read_metrics(out / k) if e.get("kind") == "join"]
    tokens = sum(e.get("tokens", 0) for k in peers for e in outer_by_peer[k][-1:])
    return dict(
        name=name, label=("3. DiLoCo + 1 peer killed, 1 joins" if churn else
                          f"2. DiLoCo (4 peers, H={cfg.inner_steps}, {cfg.compression}" + (
                              f", outer lr {cfg.outer_lr:g}, momentum {cfg.outer_momentum:g}") + ")"),
        val_loss=final_val_loss(out / "peer0" / "model", cfg), bytes_sent=sum(sent.values()),
        bytes_sent_per_worker=sent, allreduce_bytes_sent=sum(t["allreduce_sent"] for t in traffic.values()),
        state_bytes_sent=sum(t["state_sent"] for t in traffic.values()), wall_s=wall, tokens=tokens,
        outer_steps=outer_steps, lost_outer_steps=lost, survivors=survivors, events=events, joins=joins,
        groups=[e["group_size"] for e in outer_by_peer["peer0"]], replica_max_abs_diff=divergence,
        history=dict(inner=[e for e in read_metrics(out / "peer0") if e.get("kind") == "inner"],
                     outer=outer_by_peer["peer0"]),
    )


def check_outer_steps(outer_by_peer: Dict[str, List[Dict[str, Any]]], survivors: Sequence[str],
                      outer_steps: int) -> List[str]:
    """Outer steps that were lost: a survivor that did not reach ``outer_steps``, or an outer step in which a
    survivor averaged with fewer peers than it expected, alone, or with an error."""
    problems = []
    for k in survivors:
        steps = [e["outer_step"] for e in outer_by_peer[k]]
        if not steps or steps[-1] != outer_steps:
            problems.append(f"{k} ended at outer step {steps[-1] if steps else 0}")
        for e in outer_by_peer[k]:
            if e.get("error") or e["group_size"] < 2:
                problems.append(f"{k} outer step {e['outer_step']}: group {e['group_size']} {e.get('error', '')}")
    return problems


def replica_divergence(model_dirs: Sequence[Path]) -> Optional[float]:
    """Largest elementwise difference between the surviving replicas' final parameters."""
    if len(model_dirs) < 2:
        return None
    from safetensors.torch import load_file

    states = [load_file(str(d / "model.safetensors")) for d in model_dirs]
    worst = 0.0
    for name, t in states[0].items():
        for other in states[1:]:
            worst = max(worst, float((t.float() - other[name].float()).abs().max()))
    return worst


# --------------------------------------------------------------------------------------------- report
def _ten_step_means(history: Dict[str, list]) -> Dict[str, list]:
    """Training losses as means over 10 inner steps (what the DiLoCo peers log), for one plot."""
    inner = history.get("inner", [])
    if inner and all("outer_step" not in e for e in inner) and len(inner) >= 10:
        inner = [dict(step=inner[i + 9]["step"], loss=sum(e["loss"] for e in inner[i:i + 10]) / 10)
                 for i in range(0, len(inner) - 9, 10)]
    return dict(history, inner=inner)


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table with padded columns; ``rows[0]`` is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
        if j == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def format_table(results: List[Dict[str, Any]]) -> str:
    base = results[0]
    rows = [("run", "val loss", "vs baseline", "bytes sent (all workers)", "fewer bytes", "outer steps", "wall s")]
    for r in results:
        rel = (r["val_loss"] / base["val_loss"] - 1) * 100
        ratio = base["bytes_sent"] / max(1, r["bytes_sent"])
        outer = "-" if r["outer_steps"] is None else (
            f"{r['outer_steps']}/{r['outer_steps']}" + (" lost: " + str(len(r["lost_outer_steps"]))
                                                        if r.get("lost_outer_steps") else ", none lost"))
        rows.append((r["label"], f"{r['val_loss']:.4f}", "-" if r is base else f"{rel:+.2f}%",
                     f"{r['bytes_sent'] / 1e6:,.1f} MB", "1x" if r is base else f"{ratio:,.0f}x", outer,
                     f"{r['wall_s']:.0f}"))
    return markdown_table(rows)


def check_targets(results: List[Dict[str, Any]]) -> List[str]:
    """The issue's targets, each as a line 'PASS ...' or 'FAIL ...'."""
    base, dil, churn = results
    out = []
    rel = dil["val_loss"] / base["val_loss"] - 1
    out.append(("PASS" if rel <= 0.05 else "FAIL") + f" DiLoCo loss within 5% of baseline: {rel * 100:+.2f}%")
    ratio = base["bytes_sent"] / max(1, dil["bytes_sent"])
    out.append(("PASS" if ratio >= 100 else "FAIL") + f" DiLoCo sends >= 100x fewer bytes: {ratio:.1f}x")
    rel3 = churn["val_loss"] / dil["val_loss"] - 1
    out.append(("PASS" if rel3 <= 0.05 else "FAIL") + f" churn run loss within 5% of DiLoCo: {rel3 * 100:+.2f}%")
    lost = churn["lost_outer_steps"]
    out.append(("PASS" if not lost else "FAIL") + " churn run lost no outer step" + (f": {lost}" if lost else ""))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sims.bench_train", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small model and a short run (a few minutes)")
    parser.add_argument("--steps", type=int, default=None, help="inner steps per worker")
    parser.add_argument("--inner-steps", type=int, default=None, help="H")
    parser.add_argument("--warm-start-steps", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help="peak inner AdamW learning rate, all runs "
                        f"(default {BenchConfig.lr})")
    parser.add_argument("--warmup", type=int, default=None, help=f"inner warm-up steps (default {BenchConfig.warmup})")
    parser.add_argument("--outer-lr", type=float, default=None,
                        help=f"DiLoCo outer Nesterov learning rate (default {BenchConfig.outer_lr}; the paper's is 0.7)")
    parser.add_argument("--outer-momentum", type=float, default=None,
                        help=f"DiLoCo outer Nesterov momentum (default {BenchConfig.outer_momentum}; the paper's is 0.9)")
    parser.add_argument("--only", choices=["baseline", "diloco", "diloco-churn"], action="append", default=None)
    parser.add_argument("--ddp-worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ddp_worker is not None:
        cfg = BenchConfig(**json.loads(args.config))
        ddp_worker(args.ddp_worker, cfg.workers, args.port, args.model_dir, args.out_dir, cfg)
        return 0

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import logging

    logging.basicConfig(level=logging.WARNING)
    cfg = BenchConfig.quick() if args.quick else BenchConfig()
    if args.steps:
        cfg.steps = args.steps
    if args.inner_steps:
        cfg.inner_steps = args.inner_steps
    if args.warm_start_steps is not None:
        cfg.warm_start_steps = args.warm_start_steps
    for knob in ("lr", "warmup", "outer_lr", "outer_momentum"):
        if getattr(args, knob) is not None:
            setattr(cfg, knob, getattr(args, knob))
    if cfg.steps % cfg.inner_steps:
        parser.error("--steps must be a multiple of --inner-steps")
    import torch

    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    tokens = cfg.workers * cfg.steps * cfg.batch_size * cfg.seq_len
    log(f"model: Llama {cfg.layers} layers, hidden {cfg.hidden}, vocab {cfg.vocab}; {cfg.workers} workers x "
        f"{cfg.steps} steps x {cfg.batch_size}x{cfg.seq_len} tokens = {tokens / 1e6:.2f} M tokens per run; "
        f"H = {cfg.inner_steps}; inner lr {cfg.lr:g} (warm-up {cfg.warmup}), outer Nesterov lr {cfg.outer_lr:g}, "
        f"momentum {cfg.outer_momentum:g}")
    log(f"warm start: {cfg.warm_start_steps} steps in one process (cached)")
    model_dir = prepare_start_model(cfg, log)
    warm = json.loads((model_dir / "WARM_START.json").read_text())
    log(f"start model {model_dir.name}: {warm['params'] / 1e6:.2f} M parameters, val loss {warm['val_loss']:.4f}")
    wanted = args.only or ["baseline", "diloco", "diloco-churn"]
    results = []
    previous = json.loads((OUT / "results.json").read_text()) if (OUT / "results.json").exists() else {}
    for name in ["baseline", "diloco", "diloco-churn"]:
        if name not in wanted:
            old = next((r for r in previous.get("runs", []) if r["name"] == name), None)
            if old is None:
                parser.error(f"no earlier result for {name}; run it too")
            results.append(old)
            continue
        log(f"run {name} ...")
        if name == "baseline":
            r = run_baseline(cfg, model_dir, log)
        else:
            r = run_diloco(cfg, model_dir, churn=name == "diloco-churn", log=log)
        log(f"run {name}: val loss {r['val_loss']:.4f}, {r['bytes_sent'] / 1e6:.1f} MB sent, {r['wall_s']:.0f} s")
        results.append(r)
    from peer.trainer import plot_loss_curves

    plot_loss_curves({r["name"]: _ten_step_means(r["history"]) for r in results}, OUT / "loss_curves.png",
                     title=f"{tokens / 1e6:.2f} M tokens per run, 4 workers", smooth=1)
    table = format_table(results)
    checks = check_targets(results)
    with open(OUT / "results.json", "w") as f:
        json.dump(dict(config=asdict(cfg), warm_start=warm, runs=results, table=table, checks=checks), f, indent=1)
    print()
    print(table)
    print()
    for line in checks:
        print(line)
    churn = results[2]
    if churn.get("events"):
        print("churn run: " + "; ".join(churn["events"]) + f"; groups per outer step (peer0): {churn['groups']}")
    for r in results[1:]:
        if r.get("replica_max_abs_diff") is not None:
            print(f"{r['name']}: largest parameter difference between surviving replicas "
                  f"{r['replica_max_abs_diff']:.2e}")
    print(f"\nresults: {OUT / 'results.json'}, curves: {OUT / 'loss_curves.png'} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
