"""Tensors leave a peer from any device, and an unexpected error inside a handler reaches the log and the client
with its type (a GPU peer once answered every step with an empty error: the serializer refused CUDA tensors)."""

import logging

import pytest
import torch

from peer.server import PeerLeaving, _internal_error
from protocols.codec import decode_tensor, encode_tensor
from protocols.messages import ProtocolError


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_encode_tensor_from_cuda_device():
    x = torch.randn(2, 3, 8, device="cuda", dtype=torch.bfloat16)
    y = decode_tensor(encode_tensor(x), max_numel=1000, ndim=3)
    assert y.device.type == "cpu" and torch.equal(y, x.cpu())


def test_encode_tensor_non_contiguous_bfloat16():
    x = torch.randn(4, 6, dtype=torch.bfloat16).t()
    assert torch.equal(decode_tensor(encode_tensor(x), max_numel=100), x)


def test_unexpected_handler_error_is_logged_and_named(caplog):
    with caplog.at_level(logging.ERROR, logger="peer"):
        err = _internal_error(AssertionError(), "an inference session")
    assert isinstance(err, RuntimeError) and "AssertionError" in str(err)
    assert any("AssertionError" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("expected", [ProtocolError("bad step"), PeerLeaving("moved")])
def test_expected_errors_pass_through_unlogged(expected, caplog):
    with caplog.at_level(logging.ERROR, logger="peer"):
        assert _internal_error(expected, "an inference session") is expected
    assert not caplog.records
