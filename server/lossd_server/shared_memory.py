"""The server side of the same-host shared-memory transport (see docs/shared-memory.md).

A LossStream's client creates a /dev/shm segment and attaches it with a control
request; the stream then keeps the mapping (one per stream, dropped when the
stream ends) and its requests name regions of it instead of carrying bytes.
The server never maps the client's file (a client shrinking it would make that
SIGBUS): logits and labels are copied out with preadv, so the values validated
are the values used, and the gradient is written with pwrite straight from the
tensor's memory into the region the request offers.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import grpc
import torch

from lossd import _codec, _shm
from lossd._exceptions import InvalidArgumentError
from lossd.v1 import loss_service_pb2 as pb

_REFUSED = grpc.StatusCode.FAILED_PRECONDITION.value[0]


@dataclass
class SharedMemoryStats:
    """Counters for tests and operators: how much the transport is used."""

    attached: int = 0  # segments attached (a grown segment counts again)
    refused: int = 0  # attach requests refused (disabled, cannot open, wrong nonce)
    requests: int = 0  # loss requests whose tensors came through a segment
    gradients: int = 0  # gradients written into a segment
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)


def attach(
    request: pb.LossRequest, limit: int, stats: SharedMemoryStats
) -> tuple[pb.LossResponse, _shm.Segment | None]:
    """Answer an attach control request: (response, the new mapping or None when refused, in-band).

    ``limit`` caps the segment as max_message_bytes caps a message; 0 disables shared memory.
    """
    message = request.attach_shared_memory
    if not limit:
        why = "shared memory is disabled on this server (--shared-memory false)"
    elif message.size > limit:
        why = f"a {message.size}-byte segment is over this server's limit of {limit} bytes (max_message_bytes)"
    else:
        try:
            segment, nonce = _shm.Segment.attach(message.name, message.size, message.nonce)
        except _shm.SegmentError as error:
            why = f"cannot attach the shared-memory segment: {error.strerror or error}"
        else:
            stats.add("attached")
            response = pb.LossResponse(
                request_id=request.request_id, shared_memory_attached=pb.SharedMemoryAttached(nonce=nonce)
            )
            return response, segment
    stats.add("refused")
    return pb.LossResponse(request_id=request.request_id, error=pb.Error(code=_REFUSED, message=why)), None


def decode(message: pb.Tensor, field_name: str, segment: _shm.Segment | None) -> torch.Tensor:
    """The tensor a ``shared`` Tensor names, copied out of the segment."""
    if segment is None:
        raise InvalidArgumentError(f"{field_name}.shared: only on a LossStream with an attached shared-memory segment")
    if message.data:
        raise InvalidArgumentError(f"{field_name}: set data or shared, not both")
    try:
        dtype = _codec.torch_dtype(message, field_name)
    except _codec.CodecError as error:
        raise InvalidArgumentError(str(error)) from None
    shape = tuple(message.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgumentError(f"{field_name}: negative dimension in shape {list(shape)}")
    nbytes = _shm.nbytes_of(dtype, shape)
    region = message.shared
    if region.nbytes != nbytes:
        raise InvalidArgumentError(
            f"{field_name}: expected {nbytes} bytes for shape {list(shape)} of {dtype} "
            f"but the region has {region.nbytes}"
        )
    if not segment.contains(region.offset, region.nbytes):
        raise InvalidArgumentError(f"{field_name}.shared: region outside the {segment.size}-byte segment")
    try:
        return segment.view(region.offset, dtype, shape)  # the server's own copy: see _shm.Segment
    except _shm.SegmentError as error:
        raise InvalidArgumentError(f"{field_name}.shared: {error.strerror or error}") from None


def place_gradient(
    request: pb.LossRequest,
    response: pb.LossResponse,
    grad: torch.Tensor,
    segment: _shm.Segment,
    stats: SharedMemoryStats,
) -> pb.LossResponse | None:
    """``response`` with ``grad`` written straight from the tensor's memory into the region the request
    offered (no bytes object in between); None when it does not fit: the caller sends it inline.

    ``response`` itself is left as it is: the replay log may keep it for a resend,
    which can arrive on another stream with another segment.
    """
    region = request.grad_region
    data = _codec.byte_view(grad)
    if not data.nbytes or data.nbytes > region.nbytes or not segment.contains(region.offset, data.nbytes):
        return None
    try:
        segment.write_bytes(region.offset, data)  # pwrite on the descriptor, never a mapping: see _shm.Segment
    except OSError:
        return None  # /dev/shm full, say: inline, as without shared memory
    placed = pb.LossResponse()
    placed.CopyFrom(response)
    placed.grad.dtype = _codec.wire_dtype(grad.dtype)
    placed.grad.shape.extend(grad.shape)
    placed.grad.shared.CopyFrom(_shm.region(region.offset, data.nbytes))
    stats.add("gradients")
    return placed


def uses_segment(request: pb.LossRequest) -> bool:
    return request.logits.HasField("shared") or request.labels.HasField("shared")


def tensor_nbytes(message: pb.Tensor) -> int:
    """The byte length of a Tensor's payload, inline or shared: the same request fingerprints the same."""
    return message.shared.nbytes if message.HasField("shared") else len(message.data)
