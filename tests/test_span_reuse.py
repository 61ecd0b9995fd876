"""A peer's move keeps the blocks its old and new spans share (:class:`peer.backend.SpanBackend`'s ``reuse``):
they are not read again, share the old span's tensors, and both spans still compute exactly what a freshly
loaded span computes, each with its own KV-cache layer indices."""

import logging

import pytest
import torch

from peer.backend import SpanBackend
from protocols.model_spec import Checkpoint


def _session(backend, hidden, chunks=(5, 1, 1)):
    """Feed ``hidden`` ``[b, n, h]`` through the span with a KV cache, chunk by chunk (a prefill, then decode steps)."""
    cache, outs, offset = backend.new_cache(), [], 0
    for n in chunks:
        pos = torch.arange(offset, offset + n)[None].expand(hidden.shape[0], -1)
        outs.append(backend.forward(hidden[:, offset:offset + n], position_ids=pos, cache=cache))
        offset += n
    return torch.cat(outs, dim=1)


def _storage(t):
    return t.untyped_storage().data_ptr()


def test_move_keeps_shared_blocks_and_outputs(model_dir, caplog):
    ckpt = Checkpoint(model_dir("gqa_odd"))
    L = ckpt.num_blocks
    assert L >= 3
    old = SpanBackend(ckpt, 0, L - 1)
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, old.hidden_size)
    old_ref = _session(old, hidden)
    caplog.set_level(logging.INFO, logger="peer.backend")
    new = SpanBackend(ckpt, 1, L, reuse=old)
    assert new.kept_blocks == L - 2
    said = [r.getMessage() for r in caplog.records if r.name == "peer.backend"]
    assert said[0] == f"keeping blocks 1:{L - 1} of the current span (not read again)", said
    assert len(said) == 2 and said[1].startswith(f"loaded block {L - 1} (1/1) in "), said  # counts blocks read
    for i in range(1, L - 1):  # shared tensors, distinct modules
        a, b = old.layers[i].state_dict(), new.layers[i - 1].state_dict()
        assert all(_storage(a[k]) == _storage(b[k]) for k in a)
        assert old.layers[i] is not new.layers[i - 1]
    assert old.layers[1].self_attn.layer_idx == 1 and new.layers[0].self_attn.layer_idx == 0
    old_storages = {_storage(t) for t in old.layers.state_dict().values()}
    assert not {_storage(t) for t in new.layers[-1].state_dict().values()} & old_storages  # block L-1: read
    fresh = SpanBackend(ckpt, 1, L)
    # both spans compute exactly what freshly loaded spans do, sessions interleaved on them
    assert torch.equal(_session(new, hidden), _session(fresh, hidden))
    assert torch.equal(_session(old, hidden), old_ref)
    assert torch.equal(old.forward(hidden, position_ids=torch.arange(7)[None].expand(2, -1)),
                       SpanBackend(ckpt, 0, L - 1).forward(hidden, position_ids=torch.arange(7)[None].expand(2, -1)))


def test_reuse_needs_the_same_checkpoint_and_dtype(mha_model):
    ckpt = Checkpoint(mha_model)
    old = SpanBackend(ckpt, 0, 2)
    other_dtype = SpanBackend(ckpt, 1, 3, dtype=torch.float64, reuse=old)
    assert other_dtype.kept_blocks == 0 and other_dtype.layers[0].self_attn.q_proj.weight.dtype == torch.float64
    other_ckpt = SpanBackend(Checkpoint(mha_model), 1, 3, reuse=old)
    assert other_ckpt.kept_blocks == 0
    apart = SpanBackend(ckpt, 2, 3, reuse=old)  # no block in common
    assert apart.kept_blocks == 0
    assert SpanBackend(ckpt, 1, 3, device="cpu:0", reuse=old).kept_blocks == 1  # the same device, spelled otherwise


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_move_on_a_gpu_with_graphed_sessions(model_dir):
    """On a CUDA device: the kept blocks take no second copy of GPU memory, and sessions whose decode steps replay
    CUDA graphs on the old and the new span (interleaved) equal those on freshly loaded spans."""
    ckpt = Checkpoint(model_dir("gqa_odd"))
    L = ckpt.num_blocks
    old = SpanBackend(ckpt, 0, L - 1, device="cuda")
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, old.hidden_size)
    before = torch.cuda.memory_allocated()
    new = SpanBackend(ckpt, 1, L, device="cuda", reuse=old)
    added = torch.cuda.memory_allocated() - before
    assert new.kept_blocks == L - 2 and added <= new.parameter_bytes() // (L - 1) + (1 << 20)  # one block read
    fresh_old, fresh_new = SpanBackend(ckpt, 0, L - 1, device="cuda"), SpanBackend(ckpt, 1, L, device="cuda")
    chunks = (5, 1, 1, 1, 1)
    caches = {name: b.new_cache(2, 16) for name, b in
              (("old", old), ("new", new), ("fresh_old", fresh_old), ("fresh_new", fresh_new))}
    assert all(type(c).__name__ == "GraphCache" for c in caches.values())
    outs = {name: [] for name in caches}
    offset = 0
    for n in chunks:  # one step of each session in turn
        pos = torch.arange(offset, offset + n)[None].expand(2, -1)
        for name, b in (("old", old), ("new", new), ("fresh_old", fresh_old), ("fresh_new", fresh_new)):
            outs[name].append(b.forward(hidden[:, offset:offset + n], position_ids=pos, cache=caches[name]))
        offset += n
    assert caches["new"].replays > 0 and caches["old"].replays > 0
    assert torch.equal(torch.cat(outs["old"], 1), torch.cat(outs["fresh_old"], 1))
    assert torch.equal(torch.cat(outs["new"], 1), torch.cat(outs["fresh_new"], 1))


def test_a_move_names_the_blocks_it_drops():
    from peer.server import block_ranges

    assert block_ranges([2]) == "2:3"
    assert block_ranges([0, 1, 5, 6, 7]) == "0:2, 5:8"  # a new span inside the old one
    assert block_ranges([]) == ""
