"""``make demo``: a 3-peer local swarm on the embedded default model generates text, then shuts down."""

from __future__ import annotations

import logging
import os
import sys
import time


def main() -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.WARNING)
    import torch
    from transformers import AutoTokenizer, TextStreamer

    from sims.local_swarm import LocalSwarm
    from swarm.client import DistributedModelForCausalLM
    from swarm.default_model import default_model_path

    print("== building (first run only) and loading the embedded default model (random weights) ==", flush=True)
    model_path = default_model_path()
    print(f"   {model_path}")
    print("== starting a bootstrap DHT node and 3 peers on 127.0.0.1 ==", flush=True)
    with LocalSwarm(model_path, num_peers=3) as swarm:
        print(f"   swarm ready in {swarm.ready_seconds:.1f}s; spans " + ", ".join(f"{s}:{e}" for s, e in swarm.spans))
        print(f"   initial peers: {swarm.initial_peers[0]}")
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        prompt = "A swarm of small machines can run a large model because"
        enc = tokenizer(prompt, return_tensors="pt")
        with DistributedModelForCausalLM.from_pretrained(model_path, initial_peers=swarm.initial_peers) as model:
            print("== generating 40 new tokens through the swarm (greedy) ==", flush=True)
            streamer = TextStreamer(tokenizer, skip_special_tokens=True)
            t0 = time.perf_counter()
            out = model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=40,
                                 streamer=streamer)
            elapsed = time.perf_counter() - t0
            new = out.shape[1] - enc["input_ids"].shape[1]
            print(f"== {new} tokens in {elapsed:.2f}s: {new / elapsed:.1f} tokens/s "
                  f"(swarm ready in {swarm.ready_seconds:.1f}s) ==", flush=True)
        print("== shutting the swarm down ==", flush=True)
    print("== done: every process stopped ==")
    return 0


if __name__ == "__main__":
    sys.exit(main())
