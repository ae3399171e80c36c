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
    return pb.Tensor(dtype=wire_dtype(tensor.dtype), shape=list(tensor.shape), data=byte_view(tensor).tobytes())


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes :func:`encode` sends, as a view of the tensor's memory (copied only if not contiguous on the CPU)."""
    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data


def encode_into(message: pb.Tensor, tensor: torch.Tensor) -> None:
    """``message.CopyFrom(encode(tensor))`` with one copy of the bytes instead of three."""
    message.dtype = wire_dtype(tensor.dtype)
    message.shape.extend(tensor.shape)
    message.data = byte_view(tensor).tobytes()


def decode(message: pb.Tensor, field: str = "tensor") -> torch.Tensor:
    """A read-only CPU tensor viewing the message's bytes without copying them."""
    dtype = torch_dtype(message, field)
    shape = tuple(message.shape)
    if any(d < 0 for d in shape):
        raise CodecError(field, f"negative dimension in shape {list(shape)}")
    count = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    data = message.data  # each access of a bytes field copies it out of protobuf's arena: read it once
    if len(data) != count * itemsize:
        raise CodecError(
            field, f"expected {count * itemsize} bytes for shape {list(shape)} of {dtype} but got {len(data)}"
        )
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).reshape(shape)


# float16 tops out at 65504; keep the largest scaled entry below 2^15 so a
# GradScaler-style multiply on the client still has headroom before float32 math.
_FLOAT16_TOP_EXPONENT = 15


def encode_gradient(grad: torch.Tensor, dtype: torch.dtype) -> tuple[pb.Tensor, int]:
    """The gradient in ``dtype`` as ``grad * 2^exponent``, and the exponent.

    float16's 5-bit exponent flushes entries below 2^-24 to zero, which a
    mean-reduced gradient over a large batch reaches easily; scaling by a power
    of two first (exact) keeps its full 11-bit precision. Other dtypes have
    float32's range and are sent as they are, with exponent 0.
    """
    scaled, exponent = scale_gradient(grad, dtype)
    return encode(scaled), exponent


def scale_gradient(grad: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """What :func:`encode_gradient` encodes: ``grad * 2^exponent`` in ``dtype``, and the exponent."""
    exponent = 0
    if dtype == torch.float16 and grad.numel():
        largest = float(grad.abs().max())
        if largest > 0:
            exponent = min(_FLOAT16_TOP_EXPONENT - math.frexp(largest)[1], 100)  # 2^exponent stays finite in float32
            grad = torch.ldexp(grad, torch.tensor(float(exponent), dtype=grad.dtype, device=grad.device))
    return grad.to(dtype), exponent


def unscale_gradient(grad: torch.Tensor, exponent: int, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """``grad * scale / 2^exponent`` computed in float32 (float64 for float64), returned in ``grad``'s dtype."""
    compute = torch.float64 if grad.dtype == torch.float64 else torch.float32
    factor = scale * 2.0**-exponent if exponent else scale
    if not isinstance(factor, torch.Tensor) or factor.dim() == 0:
        # A scalar factor keeps grad's dtype, and torch computes half-precision products in float32
        # before rounding once: the same bits as the explicit upcast, without two [N, C] copies.
        return grad * factor
    return (grad.to(compute) * factor).to(grad.dtype)
