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

    def ref_gen(ids, new):
        with torch.inference_mode():
            return ref.generate(input_ids=ids.cuda(), attention_mask=torch.ones_like(ids).cuda(), max_new_tokens=new,
                                min_new_tokens=new, do_sample=False)

    local = {
        "batch1_s": _timed(lambda: ref_gen(p1, n)), "batch16_s": _timed(lambda: ref_gen(p16, n)),
        "prefill2048_s": _timed(lambda: ref_gen(p2048, 1)),
    }
    ref_out = ref_gen(p1, 32).cpu()
    print("transformers:", local, flush=True)
    del ref
    gc.collect()
    torch.cuda.empty_cache()

    half = args.layers // 2
    peer_args = ["--device", "cuda", "--dtype", "bfloat16", "--max-cache-tokens", "200000"]
    with LocalSwarm(path, spans=[(0, half), (half, args.layers)], peer_args=peer_args, num_threads=None,
                    ready_timeout=600, log_dir=args.log_dir) as swarm:
        print(f"swarm ready in {swarm.ready_seconds:.1f}s", flush=True)
        with DistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                         device=args.client_device,
                                                         dtype="bfloat16") as client:
            def swarm_gen(ids, new):
                return client.generate(ids, max_new_tokens=new, eos_token_id=[])

            dist = {
                "batch1_s": _timed(lambda: swarm_gen(p1, n)), "batch16_s": _timed(lambda: swarm_gen(p16, n)),
                "prefill2048_s": _timed(lambda: swarm_gen(p2048, 1)),
            }
            swarm_out = swarm_gen(p1, 32).cpu()
        ready = swarm.ready_seconds
    print("swarm:", dist, flush=True)
    rows = {
        "tokens/s, batch 1": (n / local["batch1_s"], n / dist["batch1_s"]),
        "new tokens/s, batch 16": (16 * n / local["batch16_s"], 16 * n / dist["batch16_s"]),
        "prefill of 2048 tokens (s)": (local["prefill2048_s"], dist["prefill2048_s"]),
    }
    print(f"\n{'figure':30s} {'transformers':>13s} {'swarm':>10s} {'swarm/transformers':>19s}")
    for k, (a, b) in rows.items():
        print(f"{k:30s} {a:13.2f} {b:10.2f} {b / a:19.2f}")
    same = bool(torch.equal(ref_out, swarm_out))
    print(f"swarm ready (s): {ready:.1f}; 32 greedy tokens equal to transformers: {same}")
    result = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "torch": torch.__version__, "rows": {k: {"transformers": a, "swarm": b, "ratio": b / a}
                                                   for k, (a, b) in rows.items()},
              "swarm_ready_s": ready, "greedy_equal": same, "raw": {"transformers": local, "swarm": dist}}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
