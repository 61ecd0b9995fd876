"""``python -m sims.sweep_train``: many configurations of ``sims.bench_train``'s runs 1 and 2, several at once.

A tool for tuning the training bench (issue 5), not a benchmark itself: each configuration is either a
synchronous data-parallel **baseline** (run 1 of the bench) or a **DiLoCo** run of 4 peers (run 2), with some
:class:`sims.bench_train.BenchConfig` fields changed. All start from the bench's warm-start checkpoint (built
once, or cached in ``out/bench_train/models/``) and are scored on the bench's validation set (256 sequences).

Configurations are given as ``KIND[:FIELD=VALUE,...]`` with KIND ``base`` or ``dl`` and FIELD any
``BenchConfig`` field, e.g. ``dl:lr=2e-3,outer_lr=1.0,outer_momentum=0.8`` or ``base:steps=480``; a name can go
in front: ``NAME=dl:...``. Without configurations, ``--preset`` picks a list (``python -m sims.sweep_train
--list-presets``). Each configuration runs in its own process group with its own run id, bootstrap node, ports
and directory (``out/sweep_train/NAME``); ``--parallel`` of them at once (a DiLoCo or baseline run is 4
single-threaded workers, so about 4 cores each). Each has a time limit (``--timeout``), the whole sweep a
deadline (``--deadline``: what has not finished by then is stopped and reported as such, so the table always
comes out).

Results go to ``--out`` as they arrive (``NAME.json`` per configuration, ``results.json`` with all of them, the
table in ``table.txt``); the compact table is printed last. Each DiLoCo row is compared with the baseline of the
same ``steps`` at the default inner lr and with the best baseline of the same ``steps`` (over the inner lrs
swept), and its bytes with the ring all-reduce of that baseline.

Example (16 cores)::

    python -m sims.sweep_train --preset first --parallel 4 --out /tmp/sweep
    python -m sims.sweep_train --parallel 4 --out /tmp/sweep base base:lr=2e-3 dl dl:outer_lr=1.0
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "out" / "sweep_train"

# what the first sweep on a 16-core machine runs, most important first (the deadline may cut the tail)
PRESETS: Dict[str, List[str]] = {
    # A first sweep at the bench's budget (300 steps, H = 60). A round-1 probe on the 2-core machine (4 workers x
    # 60 steps at lr 1e-3 from the warm start, then anchor - s * mean delta) gave val loss 1.507 / 1.510 / 1.525 /
    # 1.546 for s = 0.7 / 1.0 / 1.33 / 1.6, against 1.466 for data-parallel at step 60; one worker alone: 1.613,
    # worse than the start (1.566). So the mean pseudo-gradient overshoots (the fresh AdamW at batch 8 is noisy):
    # the paper's 0.7 / 0.9 applies s = 1.33 at the first outer step and more later; smaller outer steps, a
    # smaller inner lr or a longer inner warm-up are the candidates, each with its baseline twin.
    "first": [
        "base",                                          # reference baseline (1.2526 on the 2-core machine)
        "dl",                                            # reference DiLoCo, the paper's 0.7 / 0.9 (1.3154)
        "dl:outer_lr=0.5",
        "dl:outer_lr=0.5,outer_momentum=0.8",
        "base:lr=5e-4",
        "dl:lr=5e-4",
        "base:warmup=60",
        "dl:warmup=60",
        "dl:outer_lr=0.35",
        "dl:warmup=60,outer_lr=0.5",
        "dl:lr=5e-4,outer_lr=0.5",
        "dl:outer_lr=0.7,outer_momentum=0.8",
    ],
    "budget": [  # a longer token budget for both methods: 480 steps per worker, H = 60 (8 outer steps) and 80
        "base:steps=480",
        "dl:steps=480",
        "dl:steps=480,outer_lr=0.5",
        "dl:steps=480,inner_steps=80",
        "dl:steps=480,inner_steps=80,outer_lr=0.5",
        "base:steps=480,lr=5e-4",
        "dl:steps=480,lr=5e-4",
        "dl:steps=480,lr=5e-4,outer_lr=0.5",
    ],
    "smoke": ["base", "dl", "dl:outer_lr=1.0"],  # with --quick --steps 20 --inner-steps 10: a test of the tool
}
SHORT = dict(steps="s", inner_steps="H", lr="lr", warmup="wu", outer_lr="olr", outer_momentum="m",
             compression="c", batch_size="b", seed="seed")
START_FIELDS = ("layers", "hidden", "intermediate", "heads", "vocab", "seq_len", "workers", "warm_start_steps",
                "warm_start_batch", "warm_start_lr", "seed")


@dataclasses.dataclass
class Spec:
    name: str
    kind: str  # "base" or "dl"
    overrides: Dict[str, Any]


def parse_spec(text: str, base_fields: Dict[str, Any]) -> Spec:
    """``[NAME=]KIND[:FIELD=VALUE,...]`` -> :class:`Spec` (values typed like the ``BenchConfig`` defaults)."""
    name = None
    head, _, rest = text.partition(":")
    if "=" in head:
        name, head = head.split("=", 1)
    kind = head.strip()
    if kind not in ("base", "dl"):
        raise ValueError(f"{text!r}: the kind must be 'base' or 'dl'")
    overrides: Dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in base_fields:
            raise ValueError(f"{text!r}: {key!r} is not a BenchConfig field ({', '.join(base_fields)})")
        overrides[key] = type(base_fields[key])(float(value) if isinstance(base_fields[key], int)
                                                and not isinstance(base_fields[key], bool) else value)
    if name is None:
        name = kind + "".join(f"_{SHORT.get(k, k)}{v:g}" if isinstance(v, (int, float)) else f"_{SHORT.get(k, k)}{v}"
                              for k, v in overrides.items())
    return Spec(name=name, kind=kind, overrides=overrides)


# --------------------------------------------------------------------------------------------- one configuration
def run_one(spec_json: str) -> int:
    """Child mode: run one configuration, write its result JSON. SIGTERM stops it (its workers included)."""
    from sims import bench_train as bt

    job = json.loads(spec_json)
    cfg = bt.BenchConfig(**job["config"])
    out, result_path = Path(job["work_dir"]), Path(job["result"])

    def on_term(*_):
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, on_term)
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    log(f"{job['name']}: {job['kind']} {json.dumps(job['config'])}")
    if job["kind"] == "base":
        r = bt.run_baseline(cfg, Path(job["model_dir"]), log, out=out)
    else:
        r = bt.run_diloco(cfg, Path(job["model_dir"]), churn=False, log=log, out=out,
                          run_id=f"sweep_{job['name']}_{os.getpid()}".replace("-", "_").replace(".", "_"))
    r = {k: v for k, v in r.items() if k != "history"} | dict(
        val_curve=[round(e["val_loss"], 4) for e in r["history"]["outer"]])
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(r, indent=1, default=str))
    os.replace(tmp, result_path)
    log(f"{job['name']}: val loss {r['val_loss']:.4f}, {r['bytes_sent'] / 1e6:.1f} MB sent, {r['wall_s']:.0f} s")
    return 0


# --------------------------------------------------------------------------------------------- the sweep
class Job:
    def __init__(self, spec: Spec, cfg, model_dir: Path, out: Path):
        self.spec, self.cfg, self.model_dir = spec, cfg, model_dir
        self.work = WORK / spec.name
        self.result_path = out / f"{spec.name}.json"
        self.log_path = WORK / f"{spec.name}.log"
        self.proc: Optional[subprocess.Popen] = None
        self.t_start = self.t_end = None
        self.status = "pending"
        self.result: Optional[Dict[str, Any]] = None
        self.term_sent: Optional[float] = None

    def start(self) -> None:
        from sims.bench_train import child_env

        self.work.parent.mkdir(parents=True, exist_ok=True)
        job = dict(name=self.spec.name, kind=self.spec.kind, config=dataclasses.asdict(self.cfg),
                   model_dir=str(self.model_dir), work_dir=str(self.work), result=str(self.result_path))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "sims.sweep_train", "--one", json.dumps(job)],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                                         env=child_env(), start_new_session=True)
        self.t_start, self.status = time.time(), "running"

    def terminate(self, status: str) -> None:
        """SIGTERM (the child stops its workers), then SIGKILL of its group after a grace period (see poll)."""
        if self.proc is not None and self.proc.poll() is None and self.term_sent is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            self.term_sent = time.time()
            self.status = status

    def poll(self) -> bool:
        """True once finished (result read or failure noted)."""
        if self.proc is None:
            return False
        if self.term_sent is not None and time.time() - self.term_sent > 20:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        rc = self.proc.poll()
        if rc is None:
            return False
        self.t_end = time.time()
        if self.result_path.exists():
            self.result = json.loads(self.result_path.read_text())
            self.status = "ok"
        elif self.status == "running":
            self.status = f"failed rc={rc}"
        return True

    def tail(self, n: int = 6) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""


def format_table(jobs: Sequence[Job], default_lr: float) -> str:
    ok = [j for j in jobs if j.result]
    bases = [j for j in ok if j.spec.kind == "base"]
    rows = [("config", "steps", "H", "lr", "wu", "olr", "mom", "val loss", "vs base", "vs best base", "bytes x",
             "val curve (32 seq, every H steps)", "wall s", "status")]
    for j in sorted(jobs, key=lambda j: (j.cfg.steps, j.spec.kind != "base", j.result["val_loss"] if j.result
                                         else 9e9)):
        c, r = j.cfg, j.result
        same = [b for b in bases if b.cfg.steps == c.steps and b.cfg.batch_size == c.batch_size]
        ref = next((b for b in same if b.cfg.lr == default_lr and b.cfg.warmup == j.cfg.warmup), None) or \
            next((b for b in same if b.cfg.lr == default_lr), None)
        best = min(same, key=lambda b: b.result["val_loss"], default=None)
        rel = lambda b: "-" if (b is None or r is None or b is j) else f"{(r['val_loss'] / b.result['val_loss'] - 1) * 100:+.2f}%"
        ratio = "-" if (r is None or j.spec.kind == "base" or ref is None) else \
            f"{ref.result['bytes_sent'] / max(1, r['bytes_sent']):.0f}x"
        dl = j.spec.kind == "dl"
        wall = (j.t_end or time.time()) - j.t_start if j.t_start else 0
        rows.append((j.spec.name, str(c.steps), str(c.inner_steps) if dl else "-", f"{c.lr:g}", str(c.warmup),
                     f"{c.outer_lr:g}" if dl else "-", f"{c.outer_momentum:g}" if dl else "-",
                     f"{r['val_loss']:.4f}" if r else "-", rel(ref), (f"{rel(best)} ({best.spec.name})"
                                                                      if best is not None and best is not j and r else "-"),
                     ratio, " ".join(f"{v:.3f}" for v in r.get("val_curve", [])) if r else "",
                     f"{wall:.0f}", j.status + ("" if not r or not r.get("lost_outer_steps") else
                                                f" lost {len(r['lost_outer_steps'])}")))
    from sims.bench_train import markdown_table

    return markdown_table(rows)


def write_results(jobs: Sequence[Job], out: Path, default_lr: float) -> str:
    table = format_table(jobs, default_lr)
    data = dict(configs=[dict(name=j.spec.name, kind=j.spec.kind, overrides=j.spec.overrides,
                              config=dataclasses.asdict(j.cfg), status=j.status, result=j.result,
                              wall_s=((j.t_end or time.time()) - j.t_start) if j.t_start else None) for j in jobs],
                table=table)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, out / "results.json")
    (out / "table.txt").write_text(table + "\n")
    return table


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sims.sweep_train", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("configs", nargs="*", help="KIND[:FIELD=VALUE,...] (KIND base or dl), optionally NAME=...")
    parser.add_argument("--preset", default=None, help=f"a list of configurations: {', '.join(PRESETS)}")
    parser.add_argument("--list-presets", action="store_true")
    parser.add_argument("--out", default=str(WORK / "results"), help="where results (small JSON files) go")
    parser.add_argument("--parallel", type=int, default=1, help="configurations at once (each uses ~4 cores)")
    parser.add_argument("--timeout", type=float, default=480, help="seconds one configuration may run")
    parser.add_argument("--deadline", type=float, default=520,
                        help="seconds from the start after which everything still running is stopped")
    parser.add_argument("--quick", action="store_true", help="the bench's small model (a test of the tool)")
    parser.add_argument("--steps", type=int, default=None, help="inner steps per worker, all configurations "
                        "(before their own overrides)")
    parser.add_argument("--inner-steps", type=int, default=None, help="H, all configurations (ditto)")
    parser.add_argument("--start-model", default=None, help="the warm-start checkpoint to use (default: the "
                        "bench's, built if not cached in out/bench_train/models)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        return run_one(args.one)
    if args.list_presets:
        for k, v in PRESETS.items():
            print(f"{k}: {' '.join(v)}")
        return 0

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from sims import bench_train as bt

    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:5.0f} s] {msg}", flush=True)

    base = bt.BenchConfig.quick() if args.quick else bt.BenchConfig()
    if args.steps:
        base.steps = args.steps
    if args.inner_steps:
        base.inner_steps = args.inner_steps
    fields = dataclasses.asdict(base)
    texts = list(args.configs) or PRESETS[args.preset or "first"]
    if args.preset and args.configs:
        texts = PRESETS[args.preset] + list(args.configs)
    specs = [parse_spec(t, fields) for t in texts]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        parser.error(f"configuration names repeat: {names}")
    cfgs = []
    for s in specs:
        cfg = dataclasses.replace(base, **s.overrides)
        if s.kind == "dl" and cfg.steps % cfg.inner_steps:
            parser.error(f"{s.name}: steps {cfg.steps} is not a multiple of H = {cfg.inner_steps}")
        if any(getattr(cfg, f) != getattr(base, f) for f in START_FIELDS) and args.start_model:
            parser.error(f"{s.name}: changes the warm start, but --start-model is given")
        cfgs.append(cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)

    import torch

    torch.set_num_threads(2)  # as the bench's warm start
    models: Dict[str, Path] = {}
    for cfg in cfgs:
        key = json.dumps([getattr(cfg, f) for f in START_FIELDS])
        if key not in models:
            if args.start_model:
                models[key] = Path(args.start_model).resolve()
            else:
                log("warm start model (cached in out/bench_train/models, else built: minutes) ...")
                models[key] = bt.prepare_start_model(cfg, log)
            warm = json.loads((models[key] / "WARM_START.json").read_text())
            log(f"start model {models[key]}: val loss {warm['val_loss']:.4f}")
    # tokenize once for everybody: the bench's cache (baseline workers) and the peers' ($SWARM_HOME)
    from transformers import AutoTokenizer

    from peer.trainer import tokenize_corpus

    home = Path(os.environ.get("SWARM_HOME") or Path.home() / ".cache" / "llm-swarm")
    tok = AutoTokenizer.from_pretrained(next(iter(models.values())))
    tokenize_corpus(tok, cache_dir=bt.OUT / "tokens")
    tokenize_corpus(tok, cache_dir=home / "tokens")
    jobs = [Job(s, c, models[json.dumps([getattr(c, f) for f in START_FIELDS])], out) for s, c in zip(specs, cfgs)]
    for j in jobs:
        j.result_path.unlink(missing_ok=True)
    log(f"{len(jobs)} configurations, {args.parallel} at once, {os.cpu_count()} CPUs; timeout {args.timeout:.0f} s "
        f"each, deadline {args.deadline:.0f} s; results in {out}")
    pending, running, done = list(jobs), [], []
    last_start = 0.0
    try:
        while pending or running:
            now = time.time()
            late = now - t0 > args.deadline
            for j in running:
                if late:
                    j.terminate("deadline")
                elif now - j.t_start > args.timeout:
                    j.terminate("timeout")
            for j in list(running):
                if j.poll():
                    running.remove(j)
                    done.append(j)
                    r = j.result
                    log(f"{j.spec.name}: " + (f"val loss {r['val_loss']:.4f}, {r['bytes_sent'] / 1e6:.1f} MB, "
                                              f"{j.t_end - j.t_start:.0f} s" if r else j.status + (
                        "\n" + j.tail() if j.status.startswith("failed") else "")))
                    write_results(jobs, out, base.lr)
            if late:
                for j in pending:
                    j.status = "not started (deadline)"
                pending = []
            # start one at a time, a few seconds apart (distinct ports, staggered start-up)
            if pending and len(running) < args.parallel and now - last_start > 3:
                j = pending.pop(0)
                j.start()
                running.append(j)
                last_start = now
                log(f"start {j.spec.name} ({len(done)} done, {len(running)} running, {len(pending)} waiting)")
            time.sleep(0.5)
    except KeyboardInterrupt:
        for j in running:
            j.terminate("interrupted")
        for j in running:
            while not j.poll():
                time.sleep(0.5)
    table = write_results(jobs, out, base.lr)
    print(f"\nsweep done in {time.time() - t0:.0f} s; per-config logs in {WORK}; results in {out}/results.json")
    print(f"vs base: DiLoCo vs the baseline of the same steps at lr {base.lr:g}; vs best base: vs the best baseline "
          "of the same steps; bytes x: that baseline's ring all-reduce bytes / DiLoCo's measured bytes")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
