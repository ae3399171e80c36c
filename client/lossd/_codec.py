"""torch.Tensor <-> lossd.v1.Tensor: raw little-endian row-major bytes, as KServe v2 sends them."""

from __future__ import annotations

import math
import sys
import warnings

import torch

from lossd.v1 import loss_service_pb2 as pb

if sys.byteorder != "little":  # the wire format is little-endian; torch tensors are native-endian
    raise ImportError("lossd's tensor codec supports little-endian hosts only")

_TO_TORCH: dict[pb.DType.ValueType, torch.dtype] = {
    pb.DTYPE_FLOAT32: torch.float32,
    pb.DTYPE_FLOAT16: torch.float16,
    pb.DTYPE_BFLOAT16: torch.bfloat16,
    pb.DTYPE_FLOAT64: torch.float64,
    pb.DTYPE_INT64: torch.int64,
    pb.DTYPE_INT32: torch.int32,
}
_TO_WIRE: dict[torch.dtype, pb.DType.ValueType] = {v: k for k, v in _TO_TORCH.items()}

# torch.frombuffer warns once per process that protobuf's immutable bytes are not
# writable. Decoded tensors are only ever read, so take that one warning here,
# single-threaded at import, instead of toggling warning filters per call.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.frombuffer(b"\0\0\0\0", dtype=torch.float32)


class CodecError(ValueError):
    """A Tensor message that does not describe a valid tensor. ``field`` names the offending message field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def wire_dtype(dtype: torch.dtype) -> pb.DType.ValueType:
    try:
        return _TO_WIRE[dtype]
    except KeyError:
        supported = ", ".join(str(d) for d in _TO_WIRE)
        raise TypeError(f"Expected a tensor of dtype {supported} but got {dtype}") from None


def torch_dtype(message: pb.Tensor, field: str = "tensor") -> torch.dtype:
    try:
        return _TO_TORCH[message.dtype]
    except KeyError:
        raise CodecError(field, f"unsupported dtype {message.dtype}") from None


def encode(tensor: torch.Tensor) -> pb.Tensor:
    """Serialise a tensor (any device, any layout) to raw bytes."""
    dtype = wire_dtype(tensor.dtype)
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return pb.Tensor(dtype=dtype, shape=list(tensor.shape), data=flat.view(torch.uint8).numpy().tobytes())


def decode(message: pb.Tensor, field: str = "tensor") -> torch.Tensor:
    """A read-only CPU tensor viewing the message's bytes without copying them."""
    dtype = torch_dtype(message, field)
    shape = tuple(message.shape)
    if any(d < 0 for d in shape):
        raise CodecError(field, f"negative dimension in shape {list(shape)}")
    count = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(message.data) != count * itemsize:
        raise CodecError(
            field,
            f"expected {count * itemsize} bytes for shape {list(shape)} of {dtype} but got {len(message.data)}",
        )
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(message.data, dtype=dtype).reshape(shape)
