"""Chaos driver: concurrent generations through a local swarm while peers are SIGKILLed and restarted.

Scenario "replicas": 5 peers, every block served by at least two; clients run generations concurrently while a
random peer (one whose death leaves every block served) is SIGKILLed every few seconds and restarted later with
the same identity. Every output must equal the failure-free output (plain ``transformers`` greedy decoding), and
the time from each kill to the next token of every generation it interrupted is reported.

Scenario "gap": blocks 4:8 have a single peer and a spare peer (placed automatically) holds a copy of 0:4; the
only peer of 4:8 is killed and the spare must move there; reported: time from the kill to the next token.

``python -m sims.chaos`` (``make bench-chaos``) runs both at full size; ``--quick`` runs a short version.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from typing import Dict, List

import psutil
import torch


def _percentile(values: List[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def _references(path: str, prompts: List[torch.Tensor], new_tokens: int) -> List[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.inference_mode():
        return [model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=new_tokens, do_sample=False,
                               min_new_tokens=new_tokens) for p in prompts]


def run_replicas(path: str, *, generations: int = 20, new_tokens: int = 64, clients: int = 4,
                 kill_every: float = 3.0, restart_after: float = 5.0, seed: int = 0, log=print) -> Dict:
    """The replica scenario; returns a summary dict (see module docstring)."""
    from sims.local_swarm import LocalSwarm
    from swarm.client import DistributedModelForCausalLM

    rng = random.Random(seed)
    num_blocks = _num_blocks(path)
    half = num_blocks // 2
    q = max(num_blocks // 4, 1)
    spans = [(0, half), (half, num_blocks), (0, half), (half, num_blocks), (q, min(q + half, num_blocks))]
    keydir = tempfile.mkdtemp(prefix="chaos-keys-")
    args = [["--identity", os.path.join(keydir, f"peer{i}.key")] for i in range(len(spans))]
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 500, (1, 8 + i % 5), generator=g) for i in range(generations)]
    expected = _references(path, prompts, new_tokens)
    results: Dict[int, Dict] = {}
    kills: List[Dict] = []
    with LocalSwarm(path, spans=spans, peer_args=args) as swarm:
        log(f"replicas: swarm of {len(spans)} peers ready in {swarm.ready_seconds:.1f}s; spans {spans}")
        models = [DistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
                  for _ in range(2)]
        work = list(range(generations))
        lock = threading.Lock()
        stop = threading.Event()

        def client_loop(ci: int):
            model = models[ci % len(models)]
            while True:
                with lock:
                    if not work:
                        return
                    i = work.pop(0)
                t0 = time.time()
                session = model.inference_session(max_length=prompts[i].shape[1] + new_tokens)
                try:
                    out = model.generate(prompts[i], max_new_tokens=new_tokens, session=session, eos_token_id=[])
                    ok = torch.equal(out, expected[i])
                    err = None
                except Exception as e:  # a failed generation is a result, not a crash of the driver
                    ok, err = False, f"{type(e).__name__}: {e}"
                finally:
                    session.close()
                results[i] = {"equal": ok, "error": err, "seconds": time.time() - t0,
                              "failovers": session.failovers}
                log(f"  generation {i:2d}: {'equal' if ok else 'DIFFERENT'}; {len(session.failovers)} failover(s)"
                    + (f"; {err}" if err else ""))

        def killer():
            down: Dict[int, float] = {}
            delay = kill_every * 0.3  # the first kill comes early, while every client is generating
            while not stop.wait(delay):
                delay = kill_every * (0.7 + 0.6 * rng.random())
                now = time.time()
                for i, t in list(down.items()):
                    if now - t >= restart_after:
                        swarm.start_peer(i, wait=False)
                        del down[i]
                        log(f"  restarted peer{i}")
                alive = [i for i in range(len(spans)) if i not in down and swarm.peers[i].alive()
                         and swarm.peers[i].ready.is_set()]
                candidates = [i for i in alive if _covered([spans[j] for j in alive if j != i], num_blocks)]
                if not candidates:
                    continue
                victim = rng.choice(candidates)
                swarm.kill_peer(victim)
                kills.append({"peer": victim, "peer_id": swarm.peer_id(victim), "at": time.time()})
                down[victim] = time.time()
                log(f"  SIGKILL peer{victim} ({spans[victim][0]}:{spans[victim][1]})")

        threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
        kt = threading.Thread(target=killer)
        t_start = time.time()
        for t in threads:
            t.start()
        kt.start()
        for t in threads:
            t.join()
        stop.set()
        kt.join()
        elapsed = time.time() - t_start
        for m in models:
            m.shutdown()
        children = [c for p in swarm.peers for c in p.descendants()]
    leftover = _leftovers(children)
    recoveries = []
    for r in results.values():
        for f in r["failovers"]:
            kill_times = [k["at"] for k in kills if k["peer_id"] == f["peer_id"] and k["at"] <= f["detected_at"]]
            if kill_times and "next_token_at" in f:
                recoveries.append(f["next_token_at"] - max(kill_times))
    summary = {
        "generations": generations, "completed": sum(1 for r in results.values() if r["error"] is None),
        "equal": sum(1 for r in results.values() if r["equal"]), "kills": len(kills),
        "failovers": sum(len(r["failovers"]) for r in results.values()), "recovery_s": recoveries,
        "recovery_median_s": statistics.median(recoveries) if recoveries else None,
        "recovery_p95_s": _percentile(recoveries, 0.95) if recoveries else None,
        "seconds": elapsed, "processes_left": leftover,
        "errors": [r["error"] for r in results.values() if r["error"]],
    }
    return summary


def run_gap(path: str, *, new_tokens: int = 64, kill_at_token: int = 16, log=print) -> Dict:
    """The gap scenario: the only peer of the second half dies; a spare peer must take its blocks."""
    from sims.local_swarm import LocalSwarm
    from swarm.client import DistributedModelForCausalLM

    num_blocks = _num_blocks(path)
    half = num_blocks // 2
    prompt = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(1))
    expected = _references(path, [prompt], new_tokens)[0]
    with LocalSwarm(path, spans=[(0, half), (half, num_blocks)]) as swarm:
        spare = swarm.add_peer_with_args(half, [])  # placed by the peer: a copy of the first half here
        log(f"gap: peers 0:{half} and {half}:{num_blocks}, spare at {spare.ready_line.split()[2]}")
        times = {}
        with DistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers) as model:
            class Killer:
                def __init__(self):
                    self.n = -1

                def put(self, t):
                    self.n += 1
                    if self.n == kill_at_token:
                        swarm.kill_peer(1)
                        times["kill"] = time.time()
                        log(f"  SIGKILL the only peer of blocks {half}:{num_blocks} after token {self.n}")
                    elif self.n == kill_at_token + 1:
                        times["next_token"] = time.time()

                def end(self):
                    pass

            out = model.generate(prompt, max_new_tokens=new_tokens, streamer=Killer(), eos_token_id=[])
        children = [c for p in swarm.peers for c in p.descendants()]
    resumed = times["next_token"] - times["kill"]
    log(f"  generation resumed {resumed:.1f}s after the kill; output equal: {torch.equal(out, expected)}")
    return {"resumed_after_s": resumed, "equal": bool(torch.equal(out, expected)),
            "processes_left": _leftovers(children)}


def _num_blocks(path: str) -> int:
    with open(os.path.join(path, "config.json")) as f:
        return int(json.load(f)["num_hidden_layers"])


def _covered(spans, num_blocks: int) -> bool:
    covered = set()
    for s, e in spans:
        covered.update(range(s, e))
    return len(covered) == num_blocks


def _leftovers(children) -> List[str]:
    time.sleep(1.5)
    out = []
    for c in children:
        try:
            if c.is_running() and c.status() != psutil.STATUS_ZOMBIE:
                out.append(" ".join(c.cmdline())[:80])
        except psutil.Error:
            pass
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short run (fewer, shorter generations)")
    parser.add_argument("--model", default=None, help="checkpoint (default: the embedded model)")
    parser.add_argument("--out", default="out/chaos.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from swarm.default_model import default_model_path

    path = args.model or default_model_path()
    if args.quick:
        rep = run_replicas(path, generations=8, new_tokens=48, clients=3, kill_every=1.5, restart_after=3.0)
        gap = run_gap(path, new_tokens=24, kill_at_token=6)
    else:
        rep = run_replicas(path)
        gap = run_gap(path)
    print("\nchaos results")
    print(f"  generations completed:        {rep['completed']}/{rep['generations']}")
    print(f"  equal to failure-free output: {rep['equal']}/{rep['generations']}")
    print(f"  peers SIGKILLed:              {rep['kills']} (restarted later with the same identity)")
    print(f"  failovers:                    {rep['failovers']}")
    if rep["recovery_s"]:
        print(f"  recovery, kill -> next token: median {rep['recovery_median_s']:.2f}s, "
              f"p95 {rep['recovery_p95_s']:.2f}s over {len(rep['recovery_s'])} interrupted generations "
              f"(targets: median < 1.0s, p95 < 3s)")
    print(f"  gap with no replica: resumed {gap['resumed_after_s']:.1f}s after the kill (target < 30s), "
          f"output equal: {gap['equal']}")
    left = rep["processes_left"] + gap["processes_left"]
    print(f"  processes left behind:        {len(left)}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"replicas": rep, "gap": gap, "date": time.strftime("%Y-%m-%d %H:%M:%S")}, f, indent=2, default=str)
    print(f"wrote {args.out}")
    ok = rep["equal"] == rep["generations"] and gap["equal"] and not left
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
