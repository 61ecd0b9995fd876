"""Measuring a span's compute throughput, cached per model, device, dtype and span length."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Tuple

import torch

from peer.backend import SpanBackend

logger = logging.getLogger(__name__)


def _cache_file() -> str:
    root = os.environ.get("SWARM_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "llm-swarm")
    os.makedirs(root, exist_ok=True)
    return os.path.join(root, "throughput.json")


@torch.inference_mode()
def measure_throughput(backend: SpanBackend, model_uid: str, use_cache: bool = True) -> Tuple[float, float]:
    """Measure per-block throughput of ``backend``.

    :returns: ``(forward_tps, decode_sps)``: prefill tokens per second through one block (a 128-token prompt),
        and batch-1 decode steps per second through one block (with a 128-token KV cache)
    """
    key = f"{model_uid}|{backend.device}|{backend.dtype}|{torch.get_num_threads()}|graphs={backend.graphs_supported()}"
    path = _cache_file()
    cached = {}
    if use_cache and os.path.exists(path):
        try:
            with open(path) as f:
                cached = json.load(f)
        except (OSError, ValueError):
            cached = {}
        if key in cached:
            return tuple(cached[key])
    h = backend.hidden_size
    prompt = torch.randn(1, 128, h, dtype=backend.dtype, device=backend.device) * 0.1
    pos = torch.arange(128, device=backend.device)[None]
    sync = torch.cuda.synchronize if backend.device.type == "cuda" else (lambda: None)
    cache = backend.new_cache(1, 128 + 16)  # the kind of cache a session gets (CUDA: decode steps as a graph)
    backend.forward(prompt, position_ids=pos, cache=cache)  # warm-up
    reps, t0 = 2, time.perf_counter()
    for _ in range(reps):
        backend.forward(prompt, position_ids=pos)
    sync()
    prefill_s = (time.perf_counter() - t0) / reps
    token = prompt[:, :1]

    def step(i):
        return backend.forward(token, position_ids=torch.tensor([[128 + i]], device=backend.device), cache=cache)

    for i in range(2):
        step(i)  # a graph is captured at the first decode step
    sync()
    steps, t0 = 8, time.perf_counter()
    for i in range(2, 2 + steps):
        step(i)
    sync()
    decode_s = (time.perf_counter() - t0) / steps
    forward_tps = 128 * backend.num_blocks / prefill_s
    decode_sps = backend.num_blocks / decode_s
    cached[key] = [forward_tps, decode_sps]
    try:
        tmp = path + f".{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(cached, f)
        os.replace(tmp, path)
    except OSError:
        pass
    logger.info("measured %.0f forward tokens/s and %.1f decode steps/s per block", forward_tps, decode_sps)
    return forward_tps, decode_sps
