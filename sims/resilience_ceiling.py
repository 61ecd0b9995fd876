"""What a placement that knew in advance which peers would leave restores after they leave.

Run: ``python -m sims.resilience_ceiling`` (the defaults, 32 swarms of 8 peers, take about 32 x 5 core-minutes: one
process per core; ``--count``, ``--time`` and ``--improve-time`` make it shorter).

The benchmark's rebalancing row (:mod:`sims.bench_partitioner`: 20% of the peers leave at random, then our plan
moves at most 30% of those left) depends on the placement the swarm had before. A placement cannot know who will
leave; this script gives it that knowledge, as a ceiling on every placement policy: for each of the benchmark's
swarms (the same swarms, placements and leavers as ``make bench-partitioner``), the resilient placement
(:func:`partitioner.resilience.resilient_placement`) is planned for the one departure that then happens
(``departures=[leavers]``), keeping at least each ``--keep`` share of the bound (or all our placement serves, if
less), and the benchmark's own rebalancing plan (:func:`sims.bench_partitioner.our_rebalance`) measures what that
departure leaves. The program is time-limited and restricted to a grid of blocks, so the figures are what
``--time`` seconds of HiGHS find, not a proof; the placement is kept only where the program finds a better one.

Prints a line per swarm as it finishes, then a table with a row per placement ("ours": the benchmark's placement;
"knew, keep K": planned with foreknowledge): the median and 10th percentile of ours / bound and of the fraction of
the new bound after the plan, how many swarms reach 0.9 of it, in how many the placement changed, the most peers
moved, and how many plans leave a block unserved mid-way; writes every swarm's figures to
``out/resilience_ceiling.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Dict, List

import numpy as np

from partitioner.resilience import resilient_placement
from sims.bench_partitioner import IMPROVE_TIME, MILP_TIME, leavers, our_rebalance
from sims.scale.sim import evaluate_swarm
from sims.scale.swarmgen import make_swarm
from swarm.cli import _number, _whole_number


def one_swarm(size: int, index: int, seed: int, keeps: List[float], time_limit: float, improve_time: float,
              milp_time: float) -> Dict:
    """Swarm ``index`` of ``size`` peers as in :func:`sims.bench_partitioner.one_swarm`: its bound, our placement's
    throughput and rebalancing, and for each ``keep`` the foreknowing placement's (``rows[K]``: ``static``
    tokens/s, ``changed``, ``seconds``, and :func:`sims.bench_partitioner.our_rebalance`'s dict)."""
    rng = np.random.default_rng([seed, size, index])
    swarm = make_swarm(rng, size)
    r = evaluate_swarm(swarm, rng, True, exact_petals_flow=True, milp_time=milp_time, improve_time=improve_time)
    leave = leavers(swarm, rng)
    out = dict(index=index, bound=r.bound, ours=r.ours, leave=sorted(leave),
               rows={"ours": dict(static=r.ours, changed=False, seconds=0.0,
                                  **our_rebalance(swarm, r.ours_placement, leave, milp_time))})
    if not out["rows"]["ours"]["coverable"]:
        return out
    for keep in keeps:
        res = resilient_placement(swarm.peers, swarm.model, r.ours_placement, keep=keep, time_limit=time_limit,
                                  departures=[sorted(leave)], max_peers=size)
        out["rows"][f"knew, keep {keep:g}"] = dict(static=res.static, changed=res.changed, seconds=res.seconds,
                                                   **our_rebalance(swarm, res.placement, leave, milp_time))
    return out


def _one(args):
    return one_swarm(*args)


def summarize(swarms: List[Dict]) -> List[Dict]:
    """One line per row name: medians over the swarms whose peers left can still hold the model."""
    cov = [s for s in swarms if s["rows"]["ours"]["coverable"]]
    lines = []
    for name in (cov[0]["rows"] if cov else {}):
        static = np.array([s["rows"][name]["static"] / s["bound"] for s in cov if s["bound"] > 0])
        after = np.array([s["rows"][name]["after"] / s["rows"][name]["new_bound"] for s in cov])
        lines.append(dict(row=name, swarms=len(cov), static_med=float(np.median(static)),
                          static_p10=float(np.percentile(static, 10)), after_med=float(np.median(after)),
                          after_p10=float(np.percentile(after, 10)), reach_09=int((after >= 0.9 - 1e-9).sum()),
                          changed=sum(bool(s["rows"][name]["changed"]) for s in cov),
                          moved_max=max(s["rows"][name]["moved"] for s in cov),
                          remaining=cov[0]["rows"][name]["remaining"],
                          unsafe=sum(s["rows"][name]["unsafe_blocks"] > 0 for s in cov)))
    return lines


def _keeps(text: str) -> List[float]:
    """``--keep``: comma-separated numbers in (0, 1]."""
    try:
        keeps = [float(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not keeps or not all(0 < k <= 1 for k in keeps):
        raise argparse.ArgumentTypeError(f"every share must be in (0, 1], got {text!r}")
    return keeps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=_whole_number(2), default=8, help="peers per swarm (default 8)")
    ap.add_argument("--count", type=_whole_number(1), default=32,
                    help="swarms (the benchmark's first ones; default 32)")
    ap.add_argument("--seed", type=int, default=0, help="the benchmark's seed (default 0, as make bench-partitioner)")
    ap.add_argument("--keep", type=_keeps, default=[0.95, 0.9],
                    help="comma-separated shares of the bound the foreknowing placement must keep (default 0.95,0.9)")
    ap.add_argument("--time", type=_number(0, low_open=True), default=120.0,
                    help="seconds of solver time per foreknowing placement: its repair plan, then HiGHS (default 120)")
    ap.add_argument("--improve-time", type=_number(0), default=IMPROVE_TIME,
                    help=f"as in sims.bench_partitioner (default {IMPROVE_TIME:g})")
    ap.add_argument("--milp-time", type=_number(0), default=MILP_TIME,
                    help=f"as in sims.bench_partitioner (default {MILP_TIME:g})")
    ap.add_argument("--jobs", type=_whole_number(1), default=os.cpu_count() or 1,
                    help="processes (default: one per core)")
    ap.add_argument("--out", default="out", help="folder for resilience_ceiling.json (default out)")
    args = ap.parse_args(argv)
    keeps = args.keep
    path = os.path.join(args.out, "resilience_ceiling.json")
    try:  # before the work, so that a bad --out loses nothing
        os.makedirs(args.out, exist_ok=True)
        open(path, "a").close()
    except OSError as e:
        ap.error(f"--out {args.out}: {e.strerror or e}")
    t0 = time.time()
    tasks = [(args.size, i, args.seed, keeps, args.time, args.improve_time, args.milp_time) for i in range(args.count)]
    print(f"{args.count} swarms of {args.size} peers, {len(keeps)} foreknowing placements of up to {args.time:g} s "
          f"each, on {args.jobs} processes", flush=True)
    swarms = []

    def done(swarm: Dict) -> None:
        swarms.append(swarm)
        rows = swarm["rows"]
        figures = ", ".join(f"{name} {r['after'] / r['new_bound']:.3f}" for name, r in rows.items()
                            if r.get("coverable"))
        print(f"[{len(swarms)}/{args.count}, {time.time() - t0:.0f} s] swarm {swarm['index']}: "
              f"{figures or 'the peers left cannot hold the model'}", flush=True)

    if args.jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            for swarm in pool.imap_unordered(_one, tasks, chunksize=1):
                done(swarm)
    else:
        for t in tasks:
            done(_one(t))
    swarms.sort(key=lambda sw: sw["index"])
    lines = summarize(swarms)
    cov = lines[0]["swarms"] if lines else 0
    n_leave = max(1, round(0.2 * args.size))
    print(f"{cov} of {args.count} swarms can still hold the model after {n_leave} of {args.size} leave; "
          f"{time.time() - t0:.0f} s")
    print("| placement | ours / bound med (p10) | after the plan, of the new bound: med (p10) | reach 0.9 | "
          "changed | moved (max) | unserved mid-way |")
    print("|---|---|---|---|---|---|---|")
    for ln in lines:
        print(f"| {ln['row']} | {ln['static_med']:.3f} ({ln['static_p10']:.3f}) | {ln['after_med']:.3f} "
              f"({ln['after_p10']:.3f}) | {ln['reach_09']} of {ln['swarms']} | {ln['changed']} | "
              f"{ln['moved_max']} of {ln['remaining']} | {ln['unsafe']} |")
    with open(path, "w") as f:
        json.dump(dict(args=vars(args), summary=lines, swarms=swarms), f, indent=1)


if __name__ == "__main__":
    main()
