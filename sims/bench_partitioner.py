"""Benchmark of the partitioner against the Petals baseline and the upper bound: ``python -m sims.bench_partitioner``.

Prints one table and writes ``out/bench_partitioner.json`` and ``out/partitioner_churn.png`` (with
``--no-timing``: the placement and rebalancing figures only, as JSON on stdout and in
``out/bench_partitioner_static.json``).

* served throughput: random heterogeneous swarms (:mod:`sims.scale.swarmgen`, 32–80 blocks) of 4 to 10,000
  peers, each placed and routed by ours and by Petals' rules, as fractions of the upper bound
  (:func:`partitioner.bound.upper_bound`): medians and 10th percentiles, and the ratio ours / Petals per swarm;
* rebalancing: 20% of the peers (at least one) leave at random; our plan's result as a fraction of the new bound,
  the share of remaining peers it moves, and whether any intermediate step leaves a block unserved; Petals'
  rebalancing on its own placement for comparison. Swarms whose remaining peers cannot hold the model (new bound 0:
  nothing can be served by any placement) are counted apart ("model not coverable"), not in the fractions. Up to 20
  peers the plan may spend ``REBALANCE_SEARCH`` max-flow LPs on search from the greedy plan (``search_budget``) and
  ``REBALANCE_BEAM`` on a beam search over safe move sequences (``beam_budget``); up to ``REBALANCE_MILP_MAX``
  peers left, the exact MILP (:mod:`partitioner.milp`) gives the best safe plan within the move budget and a bound
  on what any plan within it could serve (the "best plan within the move budget" column, a median of
  ``min(1, MILP bound / new bound)``), and from there up to ``REBALANCE_HOOD_MAX`` peers left the MILP over a
  neighborhood of the best plan's moves;
* the MILP (``--milp-time`` seconds a solve) also places swarms of up to ``sims.scale.sim.MILP_MAX_PEERS`` peers
  (a candidate for our placement) and tightens their bound (static and after departures);
* with ``--improve-time`` (default 60 s, 10 s with ``--quick``), swarms of up to ``sims.scale.sim.IMPROVE_MAX_PEERS``
  peers get the exact MILP started from our heuristic placement (:func:`partitioner.milp.improve_placement`): the
  placement a swarm of that size would get from a minute of planning; swarms of up to
  ``sims.scale.sim.RESILIENT_MAX_PEERS`` peers then get as long for the resilient placement
  (:mod:`partitioner.resilience`: among the placements serving as much, the one each single departure is repaired
  best from); the static table's "s per swarm" column says how long placing and measuring each swarm took;
* timing: a joining peer's span in a 10,000-peer swarm, a rebalancing plan and a fresh placement for 1,000 peers;
* churn: served throughput over an hour of peers joining and leaving (the PNG).

``--quick`` runs fewer swarms (about six minutes on 2 cores); ``--jobs N`` runs the swarms of each size on ``N``
processes (each swarm has its own random stream, so the figures do not depend on ``N``, except through what a
time-limited MILP finds). Nothing here is tuned to the printed targets: each figure is computed from the simulated swarms.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from partitioner.bound import upper_bound
from partitioner.cost import work_curve
from partitioner.petals import petals_rebalance
from partitioner.placement import choose_span_for, plan_placement
from partitioner.rebalance import check_plan, plan_rebalance, unserved_blocks
from sims.scale.sim import (
    IMPROVE_MAX_PEERS, MILP_MAX_PEERS, RESILIENT_MAX_PEERS, evaluate_swarm, ours_throughput, petals_throughput_served,
    plot_churn, run_churn,
)
from sims.scale.swarmgen import make_peer, make_swarm

SIZES = [4, 8, 20, 100, 1000, 10000]
FULL_COUNTS = {4: 100, 8: 100, 20: 100, 100: 100, 1000: 10, 10000: 2}
QUICK_COUNTS = {4: 20, 8: 20, 20: 20, 100: 8, 1000: 2, 10000: 1}
REBALANCE_MAX = 1000  # rebalancing is measured up to this size (each state costs a max-flow LP)
REBALANCE_SEARCH = 120  # max-flow LPs the rebalancing plan may spend on search in small swarms (<= 20 peers)
REBALANCE_BEAM = 300  # max-flow LPs for its beam search over safe move sequences there (partitioner.rebalance)
PETALS_FLOW_EXACT_MAX = 1000  # Petals' placement under our routing: LP up to here, even-spread routing above
MILP_TIME = 3.0  # seconds per MILP solve (partitioner.milp): our placement's candidate and the bound (static and
# after 20% leave) in swarms of up to sims.scale.sim.MILP_MAX_PEERS peers, the rebalancing plan within the move
# budget when at most REBALANCE_MILP_MAX peers remain
REBALANCE_MILP_MAX = 8  # 6 peers left with 1 move: one small program per mover, about 0.1-0.5 s in all
REBALANCE_HOOD_MAX = 20  # above that and up to here: the MILP over a neighborhood of the best plan's movers
IMPROVE_TIME = 60.0  # seconds for the exact MILP started from our placement, swarms of up to
# sims.scale.sim.IMPROVE_MAX_PEERS peers (partitioner.milp.improve_placement)
QUICK_IMPROVE_TIME = 10.0  # the same with --quick
REBALANCE_HOOD_TIME = 2.0  # seconds for it (two programs). Measured: small gains on about half of 20 quick swarms
# (at 4 s), the median after 4 of 20 leave unchanged (0.801) in the full run (at 2 s)


def _pct(values, q):
    return float(np.percentile(values, q)) if len(values) else float("nan")


def leavers(swarm, rng: np.random.Generator) -> set:
    """The benchmark's departure: 20% of the swarm's peers (rounded, at least one) drawn from ``rng``; their ids."""
    size = len(swarm.peers)
    n_leave = max(1, int(round(0.2 * size)))
    return set(str(swarm.peers[i].peer_id) for i in rng.choice(size, n_leave, replace=False))


def our_rebalance(swarm, placement, leave: set, milp_time: float = MILP_TIME) -> Dict:
    """Our rebalancing plan after the peers ``leave`` left a swarm placed by ``placement``, measured: a dict with
    ``coverable`` (False, and nothing else, when the peers left cannot hold the model), ``new_bound``,
    ``loose_new_bound``, ``before`` and ``after`` (tokens/s served before and after the plan), ``moved``,
    ``remaining``, ``unsafe_blocks`` (blocks some intermediate step leaves unserved), ``plan_s`` and
    ``budget_bound`` (:attr:`partitioner.rebalance.RebalancePlan.budget_bound`)."""
    size, model, exact = len(swarm.peers), swarm.model, True
    keep = [p for p in swarm.peers if p.peer_id not in leave]
    new_bound = upper_bound(keep, model)
    if new_bound <= 0:
        return dict(coverable=False)
    rest = {p.peer_id: placement[p.peer_id] for p in keep}
    before = ours_throughput(keep, model, rest, exact)
    t = time.time()
    # small swarms: the plan scores its candidate moves with the max-flow evaluator
    ev = (lambda pl, keep=keep: ours_throughput(keep, model, pl, True)) if size <= 20 else None
    plan = plan_rebalance(keep, model, rest, evaluate=ev, search_budget=REBALANCE_SEARCH if size <= 20 else 0,
                          beam_budget=REBALANCE_BEAM if size <= 20 else 0,
                          milp_time_limit=(milp_time if len(keep) <= REBALANCE_MILP_MAX else
                                           REBALANCE_HOOD_TIME * (milp_time > 0)),
                          milp_max_peers=REBALANCE_MILP_MAX, milp_neighborhood_max_peers=REBALANCE_HOOD_MAX)
    plan_s = time.time() - t
    after_pl = plan.apply(rest)
    after = ours_throughput(keep, model, after_pl, exact)
    unsafe = check_plan(rest, plan, model.num_blocks)
    # the new bound, tightened by the MILP (cut off at what the plan serves) where it runs
    loose_new_bound = new_bound
    if milp_time > 0 and len(keep) <= MILP_MAX_PEERS:
        new_bound = upper_bound(keep, model, milp_time_limit=milp_time, milp_max_peers=MILP_MAX_PEERS,
                                milp_lower=after)
    return dict(coverable=True, new_bound=new_bound, loose_new_bound=loose_new_bound, before=before, after=after,
                moved=len(plan.moves), remaining=len(keep), unsafe_blocks=len(unsafe), plan_s=plan_s,
                budget_bound=plan.budget_bound)


def one_swarm(size: int, index: int, seed: int, petals_rebalance_max: int, milp_time: float = MILP_TIME,
              improve_time: float = IMPROVE_TIME) -> Tuple[Dict, Optional[Dict]]:
    """Swarm number ``index`` of ``size`` peers (its own random stream, so swarms can be run in any order or in
    parallel): its static row, and its rebalancing row (None above ``REBALANCE_MAX`` peers)."""
    rng = np.random.default_rng([seed, size, index])
    exact = True
    swarm = make_swarm(rng, size)
    model = swarm.model
    t_static = time.time()
    r = evaluate_swarm(swarm, rng, exact, exact_petals_flow=size <= PETALS_FLOW_EXACT_MAX, milp_time=milp_time,
                       improve_time=improve_time)
    t_static = time.time() - t_static
    row = dict(bound=r.bound, loose_bound=r.loose_bound, ours=r.ours, petals=r.petals, petals_flow=r.petals_flow,
               L=model.num_blocks, seconds=t_static)
    # rebalancing after 20% leave (our placement and Petals' own), same leavers for both
    if size > REBALANCE_MAX:
        return row, None
    leave = leavers(swarm, rng)
    keep = [p for p in swarm.peers if p.peer_id not in leave]
    reb = our_rebalance(swarm, r.ours_placement, leave, milp_time)
    if not reb["coverable"]:
        return row, reb
    if size <= petals_rebalance_max:
        pp = r.petals_placement
        prest = {p.peer_id: pp[p.peer_id] for p in keep}
        p_before = petals_throughput_served(keep, model, prest)
        specs = {p.peer_id: p for p in keep}
        pre_gaps = set(unserved_blocks(prest, model.num_blocks))
        cur = dict(prest)
        p_unsafe = 0
        moves = petals_rebalance(model, cur, specs, rng)
        # replay Petals' moves to count intermediate states with newly unserved blocks
        replay = dict(prest)
        for m in moves:
            reloading = {q: s for q, s in replay.items() if q != m.peer_id}
            if set(unserved_blocks(reloading, model.num_blocks)) - pre_gaps:
                p_unsafe += 1
            replay[m.peer_id] = m.new
        reb.update(petals_before=p_before, petals_after=petals_throughput_served(keep, model, cur),
                   petals_moved=len(set(m.peer_id for m in moves)), petals_unsafe_steps=p_unsafe)
    return row, reb


def _one(args):
    return one_swarm(*args)


def static_and_rebalance(size: int, count: int, seed: int, petals_rebalance_max: int, milp_time: float = MILP_TIME,
                         improve_time: float = IMPROVE_TIME, jobs: int = 1) -> Dict:
    """``count`` swarms of ``size`` peers (:func:`one_swarm`), on ``jobs`` processes."""
    t0 = time.time()
    tasks = [(size, i, seed, petals_rebalance_max, milp_time, improve_time) for i in range(count)]
    if jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            results = pool.map(_one, tasks, chunksize=1)
    else:
        results = [_one(t) for t in tasks]
    rows = [row for row, _ in results]
    reb = [rb for _, rb in results if rb is not None]
    return dict(size=size, count=count, exact=True, rows=rows, rebalance=reb, seconds=time.time() - t0)


def summarize(res: Dict) -> Dict:
    rows = [r for r in res["rows"] if r["bound"] > 0]
    ours = np.array([r["ours"] / r["bound"] for r in rows])
    pet = np.array([r["petals"] / r["bound"] for r in rows])
    pflow = np.array([r["petals_flow"] / r["bound"] for r in rows])
    ratio = np.array([r["ours"] / max(r["petals"], 1e-12) for r in rows])
    reb = [r for r in res["rebalance"] if r.get("coverable")]
    out = dict(
        size=res["size"], swarms=len(rows), exact=res["exact"],
        ours_med=float(np.median(ours)), ours_p10=_pct(ours, 10),
        petals_med=float(np.median(pet)), petals_p10=_pct(pet, 10),
        petals_flow_med=float(np.median(pflow)),
        ratio_med=float(np.median(ratio)), ratio_p10=_pct(ratio, 10), ratio_min=float(ratio.min()),
        ours_below_petals=int((ratio < 1 - 1e-9).sum()),
        bound_tightening_med=float(np.median([r["bound"] / r.get("loose_bound", r["bound"]) for r in rows])),
        bound_tightening_min=float(min(r["bound"] / r.get("loose_bound", r["bound"]) for r in rows)),
        ours_loose_med=float(np.median([r["ours"] / r.get("loose_bound", r["bound"]) for r in rows])),
        static_s_med=float(np.median([r.get("seconds", 0.0) for r in rows])),
        reb_swarms=len(reb), reb_uncoverable=len(res["rebalance"]) - len(reb),
    )
    if reb:
        out.update(
            reb_before_med=float(np.median([r["before"] / r["new_bound"] for r in reb])),
            reb_after_med=float(np.median([r["after"] / r["new_bound"] for r in reb])),
            reb_after_p10=_pct([r["after"] / r["new_bound"] for r in reb], 10),
            reb_moved_med=float(np.median([r["moved"] / r["remaining"] for r in reb])),
            reb_moved_max=float(max(r["moved"] / r["remaining"] for r in reb)),
            reb_unsafe=int(sum(1 for r in reb if r["unsafe_blocks"])),
            reb_plan_s_max=float(max(r["plan_s"] for r in reb)),
            reb_plan_s_med=float(np.median([r["plan_s"] for r in reb])),
            reb_after_loose_med=float(np.median([r["after"] / r.get("loose_new_bound", r["new_bound"]) for r in reb])),
        )
        bb = [r for r in reb if r.get("budget_bound") is not None]
        if bb:  # the most any plan within the move budget can serve (the MILP's dual bound), per the new bound
            out.update(reb_budget_bound_med=float(np.median([min(r["budget_bound"] / r["new_bound"], 1.0)
                                                             for r in bb])),
                       reb_budget_bound_swarms=len(bb))
        pr = [r for r in reb if "petals_after" in r]
        if pr:
            out.update(
                petals_reb_after_med=float(np.median([r["petals_after"] / r["new_bound"] for r in pr])),
                petals_reb_moved_med=float(np.median([r["petals_moved"] / r["remaining"] for r in pr])),
                petals_reb_unsafe=int(sum(1 for r in pr if r["petals_unsafe_steps"])),
                petals_reb_swarms=len(pr),
            )
    return out


def progress_line(size: int, s: Dict, seconds: float) -> str:
    """One line per size while the bench runs; figures a size does not have are left out."""
    line = (f"[{size} peers: {s['swarms']} swarms in {seconds:.0f} s, {fmt(s['static_s_med'], 1)} s per swarm] "
            f"ours {fmt(s['ours_med'], 3)} of the bound (p10 {fmt(s['ours_p10'], 3)})")
    if abs(s["ours_loose_med"] - s["ours_med"]) > 1e-12:
        line += f", {fmt(s['ours_loose_med'], 3)} of the bound before the MILP tightened it"
    line += f"; Petals {fmt(s['petals_med'], 3)} of the bound"
    if "reb_after_med" in s:
        line += f"; after 20% leave {fmt(s['reb_after_med'], 3)} of the new bound (p10 {fmt(s['reb_after_p10'], 3)}"
        if s.get("reb_uncoverable"):
            line += (f"; {s['reb_uncoverable']} of {s['swarms']} swarms left out: their remaining peers cannot hold "
                     f"the model")
        line += ")"
        if "reb_budget_bound_med" in s:
            line += f", the best plan within the move budget serves <= {fmt(s['reb_budget_bound_med'], 3)}"
    return line


def timing(seed: int, quick: bool) -> Dict:
    rng = np.random.default_rng(seed + 77)
    out: Dict = {}
    # a joining peer in a 10,000-peer swarm
    swarm = make_swarm(rng, 10000)
    model = swarm.model
    pl = plan_placement(swarm.peers, model, max_lanes=2, descend_sweeps=1)
    spans = [(s, e, float(work_curve(p, model)[e - s - 1]) / (e - s)) for p in swarm.peers
             for s, e in [pl[p.peer_id]]]
    times = []
    for i in range(3 if quick else 10):
        newcomer = make_peer(rng, model, f"new{i}")
        t = time.time()
        choose_span_for(newcomer, model, spans)
        times.append(time.time() - t)
    out["join_10000_s_median"] = float(np.median(times))
    out["join_10000_s_max"] = float(max(times))
    # a full rebalancing plan and a fresh placement for 1,000 peers
    swarm = make_swarm(rng, 1000)
    model = swarm.model
    t = time.time()
    pl = plan_placement(swarm.peers, model, max_lanes=4, descend_sweeps=2)
    out["placement_1000_s"] = time.time() - t
    leave = set(p.peer_id for p in swarm.peers if rng.random() < 0.2)
    keep = [p for p in swarm.peers if p.peer_id not in leave]
    t = time.time()
    plan = plan_rebalance(keep, model, {p.peer_id: pl[p.peer_id] for p in keep})
    out["rebalance_1000_s"] = time.time() - t
    out["rebalance_1000_moves"] = len(plan.moves)
    # a plan over all 1,000 peers without anyone leaving (the periodic check)
    t = time.time()
    plan_rebalance(swarm.peers, model, pl)
    out["rebalance_check_1000_s"] = time.time() - t
    return out


def fmt(x: float, digits: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def print_table(summaries: List[Dict], tim: Dict, churn: Dict) -> None:
    print()
    print("Served throughput as a fraction of the upper bound (medians; p10 = 10th percentile)")
    print("| peers | swarms | ours med | ours p10 | Petals med | Petals p10 | Petals placement + our routing | "
          "ours/Petals med | ours/Petals p10 | swarms where ours < Petals | s per swarm (med) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s in summaries:
        tag = "" if s["size"] <= PETALS_FLOW_EXACT_MAX else " (Petals + our routing: even-spread lower bound)"
        print(f"| {s['size']}{tag} | {s['swarms']} | {fmt(s['ours_med'], 3)} | {fmt(s['ours_p10'], 3)} | "
              f"{fmt(s['petals_med'], 3)} | {fmt(s['petals_p10'], 3)} | {fmt(s['petals_flow_med'], 3)} | "
              f"{fmt(s['ratio_med'], 1)}x | {fmt(s['ratio_p10'], 1)}x | {s['ours_below_petals']} | "
              f"{fmt(s['static_s_med'], 1)} |")
    print()
    print("After 20% of peers leave (fractions of the new bound; moved = share of remaining peers)")
    print("| peers | swarms | before plan | after plan med | after plan p10 | moved med | moved max | "
          "plans with an unserved block mid-way | best plan within the move budget (MILP bound) | Petals after | "
          "Petals moved | Petals steps unserving a block | model not coverable |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in summaries:
        if not s.get("reb_swarms"):
            continue
        pr = s.get("petals_reb_swarms")
        print(f"| {s['size']} | {s['reb_swarms']} | {fmt(s['reb_before_med'], 3)} | {fmt(s['reb_after_med'], 3)} | "
              f"{fmt(s['reb_after_p10'], 3)} | {fmt(s['reb_moved_med'], 3)} | {fmt(s['reb_moved_max'], 3)} | "
              f"{s['reb_unsafe']} | {fmt(s.get('reb_budget_bound_med', float('nan')), 3)} | "
              f"{fmt(s.get('petals_reb_after_med', float('nan')), 3)} | "
              f"{fmt(s.get('petals_reb_moved_med', float('nan')), 3)} | "
              f"{s.get('petals_reb_unsafe', '—') if pr else '—'} | {s['reb_uncoverable']} |")
    print()
    print("Timing (this machine, one core)")
    print(f"- join, 10,000-peer swarm: median {tim['join_10000_s_median'] * 1000:.1f} ms, "
          f"max {tim['join_10000_s_max'] * 1000:.1f} ms")
    print(f"- rebalancing plan, 1,000 peers after 20% left: {tim['rebalance_1000_s']:.2f} s "
          f"({tim['rebalance_1000_moves']} moves); periodic check of 1,000 peers: {tim['rebalance_check_1000_s']:.2f} s")
    print(f"- fresh placement of 1,000 peers: {tim['placement_1000_s']:.2f} s")
    print()
    print(f"Churn ({churn['peers']} peers, {churn['duration']:.0f} s, {churn['blocks']} blocks): mean served "
          f"throughput ours {churn['ours_mean']:.0f} tokens/s ({churn['ours_frac']:.2f} of the bound, "
          f"{churn['ours_moves']} moves), Petals {churn['petals_mean']:.0f} tokens/s ({churn['petals_frac']:.3f}, "
          f"{churn['petals_moves']} moves); plot: {churn['png']}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"fewer swarms per size and {QUICK_IMPROVE_TIME:g} s of MILP per small swarm (about six "
                         f"minutes on 2 cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated swarm sizes")
    ap.add_argument("--milp-time", type=float, default=MILP_TIME,
                    help=f"seconds per MILP solve: placement and bound up to {MILP_MAX_PEERS} peers, rebalancing up "
                         f"to {REBALANCE_MILP_MAX} peers left ({REBALANCE_HOOD_TIME:g} s for the neighborhood MILP up "
                         f"to {REBALANCE_HOOD_MAX}); 0: no MILP at all")
    ap.add_argument("--improve-time", type=float, default=None,
                    help=f"seconds for the MILP started from our placement, swarms of up to {IMPROVE_MAX_PEERS} peers, "
                         f"and as long again for the resilient placement up to {RESILIENT_MAX_PEERS} peers (default "
                         f"{IMPROVE_TIME:g}, {QUICK_IMPROVE_TIME:g} with --quick; 0: none)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="processes for the swarms of each size (default: one per core)")
    ap.add_argument("--no-timing", action="store_true", help="skip the timing and churn runs (static tables only)")
    args = ap.parse_args(argv)
    if args.improve_time is None:
        args.improve_time = QUICK_IMPROVE_TIME if args.quick else IMPROVE_TIME
    os.makedirs(args.out, exist_ok=True)
    counts = QUICK_COUNTS if args.quick else FULL_COUNTS
    sizes = [int(s) for s in args.sizes.split(",") if s]
    summaries, raw = [], []
    for size in sizes:
        res = static_and_rebalance(size, counts.get(size, 10), args.seed, petals_rebalance_max=20 if args.quick else 100,
                                   milp_time=args.milp_time, improve_time=args.improve_time, jobs=args.jobs)
        raw.append(res)
        summaries.append(summarize(res))
        s = summaries[-1]
        print(progress_line(size, s, res["seconds"]), flush=True)
    if args.no_timing:
        print(json.dumps(summaries, indent=1))
        with open(os.path.join(args.out, "bench_partitioner_static.json"), "w") as f:
            json.dump(dict(summaries=summaries, quick=args.quick, seed=args.seed, milp_time=args.milp_time,
                           improve_time=args.improve_time, raw=raw),
                      f, indent=1)
        return
    tim = timing(args.seed, args.quick)
    peers, duration = (20, 1200.0) if args.quick else (40, 3600.0)
    t = time.time()
    ch = run_churn(seed=args.seed, num_peers=peers, duration=duration, mass_leave_at=duration / 2)
    png = os.path.join(args.out, "partitioner_churn.png")
    plot_churn(ch, png, title=f"served throughput during churn, {peers} peers, {ch.num_blocks} blocks")
    churn = dict(peers=peers, duration=duration, blocks=ch.num_blocks, png=png, seconds=time.time() - t,
                 ours_mean=ch.mean(ch.ours, duration), petals_mean=ch.mean(ch.petals, duration),
                 bound_mean=ch.mean(ch.bound, duration), ours_moves=ch.ours_moves, petals_moves=ch.petals_moves)
    churn["ours_frac"] = churn["ours_mean"] / max(churn["bound_mean"], 1e-12)
    churn["petals_frac"] = churn["petals_mean"] / max(churn["bound_mean"], 1e-12)
    print_table(summaries, tim, churn)
    with open(os.path.join(args.out, "bench_partitioner.json"), "w") as f:
        json.dump(dict(summaries=summaries, timing=tim, churn=churn, quick=args.quick, seed=args.seed,
                       churn_series=dict(times=ch.times, ours=ch.ours, petals=ch.petals, bound=ch.bound),
                       raw=raw), f, indent=1)


if __name__ == "__main__":
    main()
