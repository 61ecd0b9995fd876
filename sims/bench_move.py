"""Benchmark of a peer's move (``python -m sims.bench_move``): the time to load the new span and the memory it
adds while the old span still serves (make before break), keeping the blocks both spans hold
(:class:`peer.backend.SpanBackend`'s ``reuse``, what a peer's move does) against reading the whole new span from
the checkpoint (the reference: what Petals' servers do when they change blocks), in the same process.

The model is a random-weights Llama saved in Hugging Face format in bfloat16, as most checkpoints are (hidden
1024, 16 blocks), served in float32 on the CPU (``--device``/``--dtype`` for others; on a GPU every block read is a
host-to-device copy); moves of a 12-block span by 2, 6 and 10 blocks. Memory is counted exactly: the bytes of the
new span's parameter tensors that do not share storage with the old span's (a peer holds both while it moves).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time


def _new_bytes(old, new) -> int:
    """Bytes of ``new``'s parameters whose storage ``old`` does not already hold."""
    held = {t.untyped_storage().data_ptr() for t in old.layers.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in new.layers.state_dict().values()
               if t.untyped_storage().data_ptr() not in held)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3, help="loads per variant and move (the median is reported)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--out", default="out/bench_move.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import logging

    import torch

    logging.getLogger("peer.backend").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-move-") as tmp:
        return _run(args, os.path.join(tmp, "wide"))


def _run(args, path: str) -> int:
    import torch

    from peer.backend import SpanBackend
    from protocols.model_spec import Checkpoint
    from swarm.default_model import build_model

    L, span = 16, 12
    print(f"building a {L}-block model (hidden 1024) in {path}", flush=True)
    build_model(path, num_hidden_layers=L, hidden_size=1024, intermediate_size=2752, num_attention_heads=16,
                num_key_value_heads=4, vocab_size=32000, dtype="bfloat16")
    ckpt = Checkpoint(path)
    dtype = getattr(torch, args.dtype)
    load = lambda s, e, reuse=None: SpanBackend(ckpt, s, e, args.device, dtype, reuse=reuse)  # noqa: E731
    old = load(0, span)
    block_bytes = old.parameter_bytes() // span
    x = torch.randn(1, 4, old.hidden_size, dtype=dtype)
    pos = torch.arange(4)[None]
    rows = []
    print(f"{args.device}, {args.dtype} (checkpoint in bfloat16): old span 0:{span}; one block "
          f"{block_bytes / 1e6:.1f} MB; median of {args.reps} loads")
    print("| move | blocks kept | load s (reload all) | load s (keep) | ratio | new MB (reload all) | new MB (keep) |")
    print("|---|---|---|---|---|---|---|")
    for shift in (2, 6, 10):
        s, e = shift, min(shift + span, L)
        seconds = {"reload": [], "keep": []}
        added, outputs = {}, {}  # bytes a move adds, and the new span's output, per variant
        for _ in range(args.reps):
            for name, reuse in (("reload", None), ("keep", old)):
                t = time.perf_counter()
                new = load(s, e, reuse)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                seconds[name].append(time.perf_counter() - t)
                added[name] = _new_bytes(old, new)
                outputs[name] = new.forward(x, position_ids=pos)
                del new
        same = torch.equal(outputs["reload"], outputs["keep"])
        r = dict(move=f"0:{span} -> {s}:{e}", kept=_shared_blocks(span, s, e),
                 reload_s=statistics.median(seconds["reload"]), keep_s=statistics.median(seconds["keep"]),
                 reload_bytes=added["reload"], keep_bytes=added["keep"], outputs_equal=same)
        r["ratio"] = r["keep_s"] / r["reload_s"]
        rows.append(r)
        print(f"| {r['move']} | {r['kept']} | {r['reload_s']:.2f} | {r['keep_s']:.2f} | {r['ratio']:.2f} | "
              f"{r['reload_bytes'] / 1e6:.0f} | {r['keep_bytes'] / 1e6:.0f} |", flush=True)
        if not same:
            print(f"outputs differ for {r['move']}")
            return 1
    print("outputs of the kept and the reloaded spans are equal in every move")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=args.device, dtype=args.dtype, block_bytes=block_bytes, rows=rows), f, indent=1)
    print(f"wrote {args.out}")
    return 0


def _shared_blocks(span: int, s: int, e: int) -> int:
    """Blocks the spans ``[0, span)`` and ``[s, e)`` share."""
    return max(0, min(span, e) - s)


if __name__ == "__main__":
    raise SystemExit(main())
