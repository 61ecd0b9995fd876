"""GPU benchmark: a Llama-shaped ~8B model with random bf16 weights, served by 2 peers on one GPU, against
``transformers`` ``generate`` in one process on the same GPU.

The checkpoint is created on the device (random bf16 weights, no download) and written in the Hugging Face
layout, so both sides load it with their real loading code. Figures: tokens/s at batch 1 and batch 16
(16-token prompts, 128 new tokens, greedy), and the time of a 2048-token prefill; each swarm figure's ratio to
the single-process one. Run ``python -m sims.bench_gpu`` on a machine with a CUDA GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch


def build_random_checkpoint(path: str, *, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int,
                            vocab: int, device: str = "cuda", seed: int = 0) -> str:
    """Write a Llama checkpoint with random bf16 weights made on ``device``, one safetensors shard per 4 blocks."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from protocols.model_spec import build_meta_model

    if os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        return path
    os.makedirs(path, exist_ok=True)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False, dtype="bfloat16")
    config.save_pretrained(path)
    shapes = {k: v.shape for k, v in build_meta_model(config).state_dict().items()}
    g = torch.Generator(device=device).manual_seed(seed)
    groups = {}
    for name in shapes:
        if ".layers." in name:
            key = f"blocks-{int(name.split('.layers.')[1].split('.')[0]) // 4:03d}"
        else:
            key = "outer"
        groups.setdefault(key, []).append(name)
    weight_map = {}
    for key, names in sorted(groups.items()):
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                t = torch.ones(shapes[name], dtype=torch.bfloat16, device=device)
            else:
                t = torch.randn(shapes[name], generator=g, dtype=torch.bfloat16, device=device) * 0.02
            tensors[name] = t.cpu()
        fname = f"model-{key}.safetensors"
        save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in names})
        print(f"  wrote {fname} ({sum(t.numel() for t in tensors.values()) / 1e9:.2f}B parameters)", flush=True)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return path


def _timed(fn, reps: int = 2):
    fn()  # warm-up
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def span_steps(path: str, start: int, end: int, batch: int, prompt: int = 16, steps: int = 32) -> dict:
    """Decode-step time (ms) of blocks ``[start, end)`` in this process: the growing cache run eagerly, and the
    fixed-size cache replaying a CUDA graph (:class:`peer.backend.GraphCache`)."""
    from peer.backend import SpanBackend
    from protocols.model_spec import Checkpoint

    backend = SpanBackend(Checkpoint(path), start, end, device="cuda", dtype=torch.bfloat16)
    out = {}
    for name, make in (("eager_ms", lambda: backend.new_cache()),
                       ("graph_ms", lambda: backend.new_cache(batch, prompt + steps + 4))):
        cache = make()
        x = torch.randn(batch, prompt, backend.hidden_size, device="cuda", dtype=torch.bfloat16) * 0.1
        backend.forward(x, position_ids=torch.arange(prompt, device="cuda").expand(batch, -1), cache=cache)
        tok = x[:, :1]
        for i in range(2):
            backend.forward(tok, position_ids=torch.full((batch, 1), prompt + i, device="cuda"), cache=cache)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(2, steps):
            backend.forward(tok, position_ids=torch.full((batch, 1), prompt + i, device="cuda"), cache=cache)
        torch.cuda.synchronize()
        out[name] = 1e3 * (time.perf_counter() - t0) / (steps - 2)
    del backend
    gc.collect()
    torch.cuda.empty_cache()
    return out


def _ref_step_logits(ref, seq: torch.Tensor, prompt: int, **cache_kw) -> torch.Tensor:
    """``transformers``' logits (float32, ``[steps, vocab]``) for each position from ``prompt - 1`` on, the prompt
    as one prefill and then one token per decode step, teacher-forced along ``seq`` ``[1, n]``."""
    from transformers import DynamicCache, StaticCache

    n = seq.shape[1]
    cache = (StaticCache(config=ref.config, max_cache_len=n) if cache_kw.get("static")
             else DynamicCache(config=ref.config))
    ids = seq.to(ref.device)
    out = []
    with torch.inference_mode():
        logits = ref(input_ids=ids[:, :prompt], cache=cache, use_cache=True).logits
        out.append(logits[0, -1].float())
        for t in range(prompt, n - 1):
            logits = ref(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True,
                         position_ids=torch.tensor([[t]], device=ref.device)).logits
            out.append(logits[0, -1].float())
    return torch.stack(out).cpu()


def _swarm_step_logits(client, seq: torch.Tensor, prompt: int) -> torch.Tensor:
    """The same as :func:`_ref_step_logits` through the swarm (an inference session: prefill, then decode steps)."""
    n = seq.shape[1]
    ids = seq.to(client.device)
    out = []
    with torch.inference_mode(), client.inference_session(max_length=n) as session:
        hidden = session.step(client.embed_tokens(ids[:, :prompt]))
        out.append(client.lm_head(client.norm(hidden[:, -1:]))[0, -1].float())
        for t in range(prompt, n - 1):
            hidden = session.step(client.embed_tokens(ids[:, t:t + 1]))
            out.append(client.lm_head(client.norm(hidden[:, -1:]))[0, -1].float())
    return torch.stack(out).cpu()


def _compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Largest logit difference (relative to the largest logit) and share of positions with the same argmax."""
    return {"max_rel_diff": float((a - b).abs().max() / b.abs().max()),
            "argmax_agree": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


def _peer_compute(log_dir: str) -> list:
    """Each closed session's "ms per step computing" from the peers' logs, in order."""
    import glob
    import re

    found = []
    for path in sorted(glob.glob(os.path.join(log_dir, "peer*.log"))):
        with open(path) as f:
            found += [(os.path.basename(path), int(n), float(ms))
                      for n, ms in re.findall(r"closed after \d+ tokens in (\d+) steps, ([\d.]+) ms per step", f.read())]
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--path", default="/tmp/llama-8b-random")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--log-dir", default=None, help="keep the peers' logs here")
    parser.add_argument("--client-device", default="cuda", help="where the client runs embeddings and the LM head")
    parser.add_argument("--out", default="out/bench_gpu.json")
    parser.add_argument("--no-graphs-ab", action="store_true",
                        help="run the swarm once (CUDA graphs on), not a second time with --no-cuda-graphs")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoModelForCausalLM

    from sims.local_swarm import LocalSwarm
    from swarm.client import DistributedModelForCausalLM

    t0 = time.perf_counter()
    path = build_random_checkpoint(args.path, layers=args.layers, hidden=args.hidden,
                                   intermediate=args.intermediate, heads=32, kv_heads=8, vocab=args.vocab)
    print(f"checkpoint ready in {time.perf_counter() - t0:.0f}s: {path}", flush=True)
    g = torch.Generator().manual_seed(0)
    top = min(args.vocab, 128000)
    p1 = torch.randint(3, top, (1, 16), generator=g)
    p16 = torch.randint(3, top, (16, 16), generator=g)
    p2048 = torch.randint(3, top, (1, 2048), generator=g)
    n = args.new_tokens

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda").eval()

    def ref_gen(ids, new, **kw):
        with torch.inference_mode():
            return ref.generate(input_ids=ids.cuda(), attention_mask=torch.ones_like(ids).cuda(), max_new_tokens=new,
                                min_new_tokens=new, do_sample=False, **kw)

    local = {
        "batch1_s": _timed(lambda: ref_gen(p1, n)), "batch16_s": _timed(lambda: ref_gen(p16, n)),
        "prefill2048_s": _timed(lambda: ref_gen(p2048, 1)),
    }
    ref_out = ref_gen(p1, 32).cpu()
    # the same computation with transformers' fixed-size cache (attention over all slots, unused ones masked), as
    # the peers' CUDA-graphed decode steps run it: greedy tokens on random weights sit within rounding of each other
    # and flip with the attention kernel
    ref_static_out = ref_gen(p1, 32, cache_implementation="static").cpu()
    # teacher-forced along that sequence: per-step logits of transformers with its growing cache (the reference)
    # and with its fixed-size cache (how far a different attention kernel alone moves them)
    ref_logits = _ref_step_logits(ref, ref_out, p1.shape[1])
    ref_static_logits = _ref_step_logits(ref, ref_out, p1.shape[1], static=True)
    print("transformers:", local, flush=True)
    del ref
    gc.collect()
    torch.cuda.empty_cache()

    half = args.layers // 2
    spans = {f"batch {b}": span_steps(path, 0, half, b) for b in (1, 16)}
    print("one span of", half, "blocks, decode step (ms) in this process:", spans, flush=True)

    from swarm.client import InferenceSession

    step_time = [0.0]
    plain_step = InferenceSession.step

    def timed_step(self, *a, **k):  # the client's wait on the swarm, per token (not counted: embeddings, LM head)
        t0 = time.perf_counter()
        try:
            return plain_step(self, *a, **k)
        finally:
            step_time[0] += time.perf_counter() - t0

    InferenceSession.step = timed_step
    variants = [("graphs", [])] + ([] if args.no_graphs_ab else [("no graphs", ["--no-cuda-graphs"])])
    runs = {}
    for name, extra in variants:
        peer_args = ["--device", "cuda", "--dtype", "bfloat16", "--max-cache-tokens", "200000", *extra]
        log_dir = os.path.join(args.log_dir, name.replace(" ", "_")) if args.log_dir else None
        with LocalSwarm(path, spans=[(0, half), (half, args.layers)], peer_args=peer_args, num_threads=None,
                        ready_timeout=600, log_dir=log_dir, keep_logs=True) as swarm:
            print(f"[{name}] swarm ready in {swarm.ready_seconds:.1f}s", flush=True)
            with DistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                             device=args.client_device,
                                                             dtype="bfloat16") as client:
                def swarm_gen(ids, new):
                    return client.generate(ids, max_new_tokens=new, eos_token_id=[])

                dist = {}
                for key, ids, new in (("batch1_s", p1, n), ("batch16_s", p16, n), ("prefill2048_s", p2048, 1)):
                    swarm_gen(ids, new)  # warm-up
                    best = (float("inf"), 0.0)
                    for _ in range(2):
                        step_time[0], t0 = 0.0, time.perf_counter()
                        swarm_gen(ids, new)
                        best = min(best, (time.perf_counter() - t0, step_time[0]))
                    dist[key], dist[key.replace("_s", "_in_swarm_steps_s")] = best
                swarm_out = swarm_gen(p1, 32).cpu()
                logits = _swarm_step_logits(client, ref_out, p1.shape[1])
            ready = swarm.ready_seconds
            logs = swarm.log_dir
        compute = _peer_compute(logs)
        print(f"[{name}] swarm:", dist, flush=True)
        print(f"[{name}] peers' sessions (log, steps, ms per step computing):", compute, flush=True)
        runs[name] = dict(dist=dist, out=swarm_out, ready=ready, peer_sessions=compute,
                          logits=_compare(logits, ref_logits))
        print(f"[{name}] teacher-forced logits vs transformers: {runs[name]['logits']}", flush=True)
    InferenceSession.step = plain_step
    dist, swarm_out, ready = runs["graphs"]["dist"], runs["graphs"]["out"], runs["graphs"]["ready"]
    rows = {
        "tokens/s, batch 1": (n / local["batch1_s"], n / dist["batch1_s"]),
        "new tokens/s, batch 16": (16 * n / local["batch16_s"], 16 * n / dist["batch16_s"]),
        "prefill of 2048 tokens (s)": (local["prefill2048_s"], dist["prefill2048_s"]),
    }
    print(f"\n{'figure':30s} {'transformers':>13s} {'swarm':>10s} {'swarm/transformers':>19s}")
    for k, (a, b) in rows.items():
        print(f"{k:30s} {a:13.2f} {b:10.2f} {b / a:19.2f}")
    if "no graphs" in runs:
        other = runs["no graphs"]["dist"]
        print(f"without CUDA graphs: batch 1 {n / other['batch1_s']:.2f} tokens/s "
              f"({n / other['batch1_s'] / rows['tokens/s, batch 1'][0]:.2f} of transformers), batch 16 "
              f"{16 * n / other['batch16_s']:.2f}, prefill {other['prefill2048_s']:.3f} s")
    same = bool(torch.equal(ref_out, swarm_out))
    agree = float((ref_out == swarm_out).float().mean())
    same_static = bool(torch.equal(ref_static_out, swarm_out))
    print(f"swarm ready (s): {ready:.1f}; 32 greedy tokens equal to transformers: {same} ({agree:.0%} of tokens); "
          f"equal to transformers with its static cache: {same_static}")
    for name, r in runs.items():
        if name != "graphs":
            print(f"[{name}] 32 greedy tokens equal to transformers: {bool(torch.equal(ref_out, r['out']))}")
    static_vs_ref = _compare(ref_static_logits, ref_logits)
    print(f"teacher-forced logits over 32 steps vs transformers (growing cache): swarm {runs['graphs']['logits']}; "
          f"transformers' own static cache {static_vs_ref}")
    result = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "torch": torch.__version__, "rows": {k: {"transformers": a, "swarm": b, "ratio": b / a}
                                                   for k, (a, b) in rows.items()},
              "swarm_ready_s": ready, "greedy_equal": same, "greedy_agreement": agree,
              "greedy_equal_static_cache": same_static,
              "teacher_forced_logits": {**{k: r["logits"] for k, r in runs.items()},
                                        "transformers static cache": static_vs_ref}, "span_decode_ms": spans,
              "raw": {"transformers": local, **{f"swarm ({k})": r["dist"] for k, r in runs.items()}},
              "peer_sessions": {k: r["peer_sessions"] for k, r in runs.items()}}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
