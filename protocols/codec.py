"""The tensor codec: hivemind's protobuf ``Tensor`` serialization with optional compression, plus limits.

Every tensor a peer receives is checked against its declared size *before* it is decoded, so an oversized
or malformed tensor is refused with a clear error and costs no memory.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2

COMPRESSION = {
    "none": runtime_pb2.CompressionType.NONE,
    "float16": runtime_pb2.CompressionType.FLOAT16,
    "uint8": runtime_pb2.CompressionType.UNIFORM_8BIT,
}
_ALLOWED_DTYPES = {"float32", "float16", "bfloat16", "int64", "int32", "bool", "uint8", "int8"}


class TensorError(ValueError):
    """A tensor on the wire is malformed or larger than allowed."""


def encode_tensor(tensor: torch.Tensor, compression: str = "none") -> runtime_pb2.Tensor:
    """Serialize ``tensor`` (any shape, on any device: it is copied to host memory first) for the wire.
    ``compression`` is one of ``COMPRESSION``'s keys."""
    if compression not in COMPRESSION:
        raise ValueError(f"unknown compression {compression!r}; choose one of {sorted(COMPRESSION)}")
    kind = COMPRESSION[compression]
    if not tensor.dtype.is_floating_point:
        kind = runtime_pb2.CompressionType.NONE
    return serialize_torch_tensor(tensor.detach().cpu(), kind)


def decode_tensor(
    message: runtime_pb2.Tensor,
    *,
    max_numel: int,
    ndim: Optional[int] = None,
    dtypes: Optional[Sequence[str]] = None,
) -> torch.Tensor:
    """Check and decode one wire tensor.

    :param max_numel: refuse tensors with more elements than this
    :param ndim: if given, the required number of dimensions
    :param dtypes: if given, the allowed dtype names (e.g. ``["float32", "bfloat16"]``)
    :raises TensorError: if the declared shape, dtype or buffer size is wrong, or the tensor is too large
    """
    shape = list(message.size)
    if any(s < 0 for s in shape):
        raise TensorError(f"negative dimension in shape {shape}")
    numel = math.prod(shape) if shape else 1
    if numel > max_numel:
        raise TensorError(f"tensor of shape {shape} has {numel} elements, more than the limit of {max_numel}")
    if ndim is not None and len(shape) != ndim:
        raise TensorError(f"expected a {ndim}-dimensional tensor, got shape {shape}")
    if message.dtype not in _ALLOWED_DTYPES or (dtypes is not None and message.dtype not in dtypes):
        raise TensorError(f"tensor dtype {message.dtype!r} is not allowed here")
    try:
        return deserialize_torch_tensor(message)
    except Exception as e:
        raise TensorError(f"malformed tensor of shape {shape}: {e}") from e
