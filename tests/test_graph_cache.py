"""The fixed-size KV cache behind CUDA-graphed decode steps (:class:`peer.backend.GraphCache`) gives the same
outputs as the growing cache, with left padding, prefill, decode steps and multi-token chunks; on a CUDA device,
its graph replays equal eager steps."""

import pytest
import torch

from peer.backend import GraphCache, SpanBackend, positions_for
from protocols.model_spec import Checkpoint


def _run_session(backend, cache, hidden, mask, chunks, start=None, end=None):
    """Feed ``hidden`` ``[b, n, h]`` through the backend chunk by chunk, as a peer's session does; returns the
    outputs concatenated along tokens."""
    outs, offset = [], 0
    real = torch.zeros(hidden.shape[0], dtype=torch.long)
    for n in chunks:
        part = mask[:, offset:offset + n]
        pos = positions_for(part, real)
        real = real + part.sum(-1)
        seen = mask[:, :offset + n]
        outs.append(backend.forward(hidden[:, offset:offset + n], start=start, end=end, position_ids=pos,
                                    attention_mask=None if bool(seen.all()) else seen, cache=cache))
        offset += n
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("name", ["mha", "gqa_odd"])
def test_static_slots_equal_growing_cache(model_dir, name):
    ckpt = Checkpoint(model_dir(name))
    backend = SpanBackend(ckpt, 1, ckpt.num_blocks)
    torch.manual_seed(0)
    b, n = 3, 12
    hidden = torch.randn(b, n, backend.hidden_size)
    mask = torch.ones(b, n, dtype=torch.long)
    mask[1, :4] = 0  # left padding of two rows
    mask[2, :1] = 0
    chunks = [5, 1, 1, 3, 1, 1]
    ref = _run_session(backend, backend.new_cache(), hidden, mask, chunks)
    cache = GraphCache(backend, b, 16)
    out = _run_session(backend, cache, hidden, mask, chunks)
    real = mask.bool()
    assert torch.allclose(out[real], ref[real], atol=1e-5, rtol=1e-4)
    assert cache.used == n
    # without padding: the first chunk runs plainly causal
    full = torch.ones(b, n, dtype=torch.long)
    ref = _run_session(backend, backend.new_cache(), hidden, full, chunks)
    out = _run_session(backend, GraphCache(backend, b, 16), hidden, full, chunks)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    # a sub-range of the span, as a session opened on part of it runs
    ref = _run_session(backend, backend.new_cache(), hidden, mask, chunks, start=2, end=ckpt.num_blocks - 1)
    out = _run_session(backend, GraphCache(backend, b, n), hidden, mask, chunks, start=2, end=ckpt.num_blocks - 1)
    assert torch.allclose(out[real], ref[real], atol=1e-5, rtol=1e-4)


def test_static_slots_refuse_overflow(mha_model):
    backend = SpanBackend(Checkpoint(mha_model), 0, 2)
    cache = GraphCache(backend, 1, 4)
    x = torch.randn(1, 3, backend.hidden_size)
    backend.forward(x, position_ids=torch.arange(3)[None], cache=cache)
    with pytest.raises(ValueError, match="does not fit"):
        backend.forward(x[:, :2], position_ids=torch.tensor([[3, 4]]), cache=cache)
    with pytest.raises(ValueError, match="does not fit"):
        backend.forward(torch.randn(2, 1, backend.hidden_size), position_ids=torch.tensor([[3], [3]]), cache=cache)


def test_new_cache_kind(mha_model):
    backend = SpanBackend(Checkpoint(mha_model), 0, 2)
    # on a CPU the growing cache serves sessions; a CUDA graph needs a CUDA device
    assert not backend.graphs_supported()
    assert not isinstance(backend.new_cache(2, 32), GraphCache)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_graph_replays_equal_eager_steps(gqa_model):
    ckpt = Checkpoint(gqa_model)
    backend = SpanBackend(ckpt, 0, ckpt.num_blocks, device="cuda")
    assert backend.graphs_supported()
    torch.manual_seed(0)
    b, n = 2, 10
    hidden = torch.randn(b, n, backend.hidden_size)
    mask = torch.ones(b, n, dtype=torch.long)
    mask[1, :3] = 0
    chunks = [4] + [1] * 6
    graphed = backend.new_cache(b, n)
    assert isinstance(graphed, GraphCache)
    out = _run_session(backend, graphed, hidden, mask, chunks).cpu()
    assert graphed.replays == 6
    eager = GraphCache(backend, b, n)
    eager.capture = False
    ref = _run_session(backend, eager, hidden, mask, chunks).cpu()
    real = mask.bool()
    assert torch.allclose(out[real], ref[real], atol=1e-5, rtol=1e-4)
    grow = _run_session(backend, backend.new_cache(), hidden, mask, chunks).cpu()
    assert torch.allclose(out[real], grow[real], atol=1e-4, rtol=1e-3)



@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_capture_while_another_thread_computes(gqa_model):
    """A peer captures a session's graph on its event-loop thread while its compute pool may run another session's
    prefill (allocating memory): neither may fail, and the graphed session's outputs stay right."""
    import threading

    ckpt = Checkpoint(gqa_model)
    backend = SpanBackend(ckpt, 0, ckpt.num_blocks, device="cuda")
    torch.manual_seed(0)
    hidden = torch.randn(1, 8, backend.hidden_size)
    mask = torch.ones(1, 8, dtype=torch.long)
    chunks = [2] + [1] * 6
    stop, errors = threading.Event(), []

    def prefills():
        try:
            while not stop.is_set():
                n = int(torch.randint(16, 256, ()))
                x = torch.randn(2, n, backend.hidden_size)
                backend.forward(x, position_ids=torch.arange(n).expand(2, -1), cache=backend.new_cache(2, n))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    worker = threading.Thread(target=prefills)
    worker.start()
    try:
        outs = [_run_session(backend, backend.new_cache(1, 8), hidden, mask, chunks).cpu() for _ in range(20)]
    finally:
        stop.set()
        worker.join()
    assert not errors, errors
    ref = _run_session(backend, backend.new_cache(), hidden, mask, chunks).cpu()
    for out in outs:
        assert torch.allclose(out, ref, atol=1e-4, rtol=1e-3)
