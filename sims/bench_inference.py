"""``make bench``: plain ``transformers`` in one process against a 3-peer local swarm, on the same prompts.

Model: the embedded default model (8 blocks, hidden 256, intermediate 688, 8 heads, 4 KV heads, vocabulary
32000), the shape of the reference measurements in ``shared/anchors.md``. Peers hold blocks 0:4, 4:8, 0:4, so
a chain has 2 hops. The single process runs beside the idle swarm and the two take turns run by run (medians of
``--reps`` runs each), so drift in the host's speed reaches both alike. Prints a table with each swarm figure's
ratio to the single-process one and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import psutil
import torch


class _Clock:
    """A streamer that records when tokens arrive."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.times = []
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass


def _run(generate, input_ids, mask, new_tokens):
    clock = _Clock()
    out = generate(input_ids, mask, new_tokens, clock)
    total = time.perf_counter() - clock.t0
    ttft = clock.times[0] - clock.t0
    n_new = (out.shape[1] - input_ids.shape[1]) * out.shape[0]
    decode_ms = (clock.times[-1] - clock.times[0]) / max(len(clock.times) - 1, 1) * 1000
    return {"tokens_per_s": n_new / total, "ttft_s": ttft, "decode_ms_per_token": decode_ms, "seconds": total}, out


def _measure(generators, prompts, reps):
    """Median figures over ``reps`` runs for batch 1, batch 4, and a 512-token prefill, for each of
    ``generators`` (name -> generate function). The generators take turns run by run, so a change in the
    machine's speed during the benchmark (this host's speed drifts by tens of percent over minutes) reaches
    all of them alike instead of biasing their ratios. Returns name -> prompt -> figures."""
    runs = {g: {p: [] for p in prompts} for g in generators}
    outs = {g: {} for g in generators}
    for name, (ids, mask, n) in prompts.items():
        for _ in range(reps):
            for g, generate in generators.items():
                r, outs[g][name] = _run(generate, ids, mask, n)
                runs[g][name].append(r)
    results = {}
    for g in generators:
        results[g] = {}
        for name in prompts:
            rs = runs[g][name]
            results[g][name] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            results[g][name]["output"] = outs[g][name]
    return results


def _memory_check() -> dict:
    """RSS of peers holding 4 and 8 of 8 blocks of a wider model (hidden 1024), after a session has used them.

    A peer's RSS is a fixed runtime baseline (Python, torch, transformers, hivemind) plus what its blocks take,
    so the 4 extra blocks of the 8-block peer cost ``RSS(8 blocks) - RSS(4 blocks)``, which is also what the 4
    blocks of the 4-block peer cost over the baseline; it is compared with the whole model's weights (blocks,
    embeddings and LM head)."""
    import tempfile

    from sims.local_swarm import LocalSwarm
    from swarm.client import DistributedModelForCausalLM
    from swarm.default_model import build_model

    path = os.path.join(tempfile.mkdtemp(prefix="bench-mem-"), "wide")
    build_model(path, num_hidden_layers=8, hidden_size=1024, intermediate_size=2752, num_attention_heads=16,
                num_key_value_heads=4, vocab_size=32000)
    # q and o projections, k and v (4 of 16 heads), gate/up/down, two norms; float32
    per_block = (2 * 1024 * 1024 + 2 * 1024 * 256 + 3 * 1024 * 2752 + 2 * 1024) * 4
    model_bytes = 8 * per_block + 2 * 32000 * 1024 * 4 + 1024 * 4
    rss = {}
    for n in (4, 8):
        with LocalSwarm(path, spans=[(0, n)] if n == 8 else [(0, 4), (4, 8)]) as swarm:
            with DistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers) as c:
                c.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=8)
            rss[n] = psutil.Process(swarm.peers[0].proc.pid).memory_info().rss
    cost_4 = rss[8] - rss[4]
    return {"rss_4": rss[4], "rss_8": rss[8], "cost_4": cost_4, "block_bytes": per_block, "model_bytes": model_bytes}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", default="out/bench_inference.json")
    parser.add_argument("--skip-memory", action="store_true", help="skip the peer memory check on a wider model")
    parser.add_argument("--peer-threads", type=int, default=1, help="torch threads per peer")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoModelForCausalLM

    from sims.local_swarm import LocalSwarm
    from swarm.client import DistributedModelForCausalLM
    from swarm.default_model import default_model_path

    path = default_model_path()
    g = torch.Generator().manual_seed(0)
    vocab = 32000
    p16 = torch.randint(3, vocab, (1, 16), generator=g)
    p16x4 = torch.randint(3, vocab, (4, 16), generator=g)
    p512 = torch.randint(3, vocab, (1, 512), generator=g)
    ones = lambda t: torch.ones_like(t)  # noqa: E731
    prompts = {
        "batch1": (p16, ones(p16), args.new_tokens),
        "batch4": (p16x4, ones(p16x4), args.new_tokens),
        "prefill512": (p512, ones(p512), 1),
    }
    machine = {
        "cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "loadavg_before": os.getloadavg(),
    }
    print(f"machine: {machine['cpus']} cpus, load {machine['loadavg_before'][0]:.2f}, torch {machine['torch']}, "
          f"{machine['torch_threads']} threads", flush=True)

    # ---- single process
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def ref_generate(ids, mask, n, streamer):
        with torch.inference_mode():
            return ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, streamer=streamer)

    _run(ref_generate, p16, ones(p16), 4)  # warm-up
    ref_rss = psutil.Process().memory_info().rss

    # ---- swarm
    with LocalSwarm(path, num_peers=3, spans=[(0, 4), (4, 8), (0, 4)], num_threads=args.peer_threads) as swarm:
        ready = swarm.ready_seconds
        rss = [psutil.Process(p.proc.pid).memory_info().rss for p in swarm.peers]
        with DistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers) as client:
            def swarm_generate(ids, mask, n, streamer):
                return client.generate(ids, attention_mask=mask, max_new_tokens=n, streamer=streamer,
                                       eos_token_id=[])

            def swarm_generate_no_push(ids, mask, n, streamer):  # before/after: the client carries every output
                client.push = False
                try:
                    return swarm_generate(ids, mask, n, streamer)
                finally:
                    client.push = True

            _run(swarm_generate, p16, ones(p16), 4)
            results = _measure({"local": ref_generate, "swarm": swarm_generate}, prompts, args.reps)
            local, dist = results["local"], results["swarm"]
            decode_only = {k: v for k, v in prompts.items() if k != "prefill512"}
            no_push = _measure({"local": ref_generate, "swarm": swarm_generate_no_push}, decode_only, args.reps)
            local_np, no_push = no_push["local"], no_push["swarm"]
        full = swarm.add_peer((0, 8))
        rss_full = psutil.Process(full.proc.pid).memory_info().rss

    same = all(torch.equal(local[k]["output"], dist[k]["output"]) for k in prompts)
    memory = _memory_check() if not args.skip_memory else None
    rows = [
        ("time to first token, batch 1 (s)", "batch1", "ttft_s", False),
        ("decode ms per token, batch 1", "batch1", "decode_ms_per_token", False),
        ("tokens/s, batch 1", "batch1", "tokens_per_s", True),
        ("new tokens/s, batch 4", "batch4", "tokens_per_s", True),
        ("decode ms per step, batch 4", "batch4", "decode_ms_per_token", False),
        ("prefill of 512 tokens (s)", "prefill512", "ttft_s", False),
    ]
    print(f"\n{'figure':38s} {'transformers':>13s} {'swarm':>10s} {'swarm/transformers':>19s}")
    table = {}
    for label, key, metric, higher_better in rows:
        a, b = local[key][metric], dist[key][metric]
        table[label] = {"transformers": a, "swarm": b, "ratio": b / a}
        print(f"{label:38s} {a:13.3f} {b:10.3f} {b / a:19.2f}")
    mib = 1 / 2**20
    print("without peer-to-peer push (the client carries each hop's output to the next peer):")
    for label, key in (("tokens/s, batch 1", "batch1"), ("new tokens/s, batch 4", "batch4")):
        a, b = local_np[key]["tokens_per_s"], no_push[key]["tokens_per_s"]
        table[label + ", no push"] = {"transformers": a, "swarm": b, "ratio": b / a}
        print(f"  {label:36s} {a:13.3f} {b:10.3f} {b / a:19.2f}")
    same = same and all(torch.equal(local[k]["output"], no_push[k]["output"]) for k in no_push)
    print(f"{'swarm ready after start (s)':38s} {'-':>13s} {ready:10.2f}")
    print(f"{'peer RSS, 4 of 8 blocks (MiB)':38s} {'-':>13s} {statistics.mean(rss) * mib:10.0f}")
    print(f"{'peer RSS, 8 of 8 blocks (MiB)':38s} {'-':>13s} {rss_full * mib:10.0f}")
    print(f"{'transformers process RSS (MiB)':38s} {ref_rss * mib:13.0f}")
    if memory:
        print(f"memory, on a wider 8-block model ({memory['block_bytes'] * mib:.0f} MiB of weights per block, "
              f"{memory['model_bytes'] * mib:.0f} MiB in all):")
        print(f"  peer RSS with 4 blocks {memory['rss_4'] * mib:.0f} MiB, with 8 blocks {memory['rss_8'] * mib:.0f} MiB; "
              f"4 blocks cost {memory['cost_4'] * mib:.0f} MiB = {memory['cost_4'] / memory['model_bytes']:.2f} of the "
              f"whole model's weights (target: about 0.5 or less); runtime baseline "
              f"{(memory['rss_4'] - memory['cost_4']) * mib:.0f} MiB")
    print(f"outputs equal token for token: {same}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    result = {
        "machine": machine, "table": table, "swarm_ready_s": ready, "peer_rss_bytes_4_blocks": rss,
        "peer_rss_bytes_8_blocks": rss_full, "transformers_rss_bytes": ref_rss, "outputs_equal": same,
        "loadavg_after": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "memory": memory,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
