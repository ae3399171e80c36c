"""The client side of the local transport: one connection to the server's Unix socket and its segment.

The segment is a sealed memfd that this process creates and maps; the server maps the same memory
(docs/local-transport.md). A step copies the logits and labels into it (the one copy, which also
brings CUDA logits to the host), sends a fixed header, and reads the gradient back out of it.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import threading
from pathlib import Path

import torch

from lossd import _local_protocol as wire
from lossd._exceptions import (
    DeadlineExceededError,
    InternalError,
    UnavailableError,
    from_status,
    status_code,
)
from lossd._types import LossResult
from lossd.v1 import loss_service_pb2 as pb


class LocalUnavailable(Exception):
    """This process cannot use the server's local transport (another host, no socket here, ...)."""


def boot_id() -> str:
    """This kernel's boot id: equal for every process (and container) on one host, and only there."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INTS = (torch.int64, torch.int32)


def describable(logits: torch.Tensor, labels: torch.Tensor) -> bool:
    """Whether a step header can carry these tensors: [N, C] floating logits and [N] integer labels.
    Anything else goes over gRPC, where the server's validation says what is wrong with it."""
    return (
        logits.dim() == 2
        and labels.dim() == 1
        and logits.shape[0] == labels.shape[0]
        and logits.dtype in _FLOATS
        and labels.dtype in _INTS
    )


def layout(logits: torch.Tensor, labels: torch.Tensor, need_grad: bool) -> tuple[int, int, int, int]:
    """(labels, gradient, loss offsets, bytes needed); the logits are at offset 0."""
    labels_at = wire.align(logits.nbytes)
    grad_at = wire.align(labels_at + labels.nbytes)
    loss_at = wire.align(grad_at + (logits.nbytes if need_grad else 0))
    return labels_at, grad_at, loss_at, loss_at + 8 * labels.shape[0]


class LocalChannel:
    """An attached connection. Thread-safe: one step at a time."""

    def __init__(self, connection: socket.socket, segment: mmap.mmap, socket_path: str) -> None:
        self._connection = connection
        self._segment = segment
        self.size = len(segment)
        self.socket_path = socket_path
        self._lock = threading.Lock()
        self._broken = False

    @classmethod
    def open(
        cls, endpoint: pb.LocalEndpoint, needed: int, *, socket_path: str | None, timeout: float | None
    ) -> LocalChannel:
        """Attach a new segment of at least ``needed`` bytes with ``endpoint``'s ticket.

        LocalUnavailable: this process cannot reach the socket (another host, another mount namespace);
        a refusal by the server raises its status (UNAUTHENTICATED, RESOURCE_EXHAUSTED, ...).
        """
        if endpoint.protocol_version != wire.PROTOCOL_VERSION:
            raise LocalUnavailable(
                f"the server speaks local protocol {endpoint.protocol_version}, not {wire.PROTOCOL_VERSION}"
            )
        if endpoint.boot_id and endpoint.boot_id != boot_id():
            raise LocalUnavailable("the server runs on another host (its boot id differs)")
        path = socket_path or endpoint.socket_path
        if not path:
            raise LocalUnavailable("the server advertises no socket path")
        size = wire.segment_size(needed)
        if endpoint.max_segment_bytes:
            size = max(needed, min(size, endpoint.max_segment_bytes))
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        connection.settimeout(timeout)
        try:
            connection.connect(path)
        except (FileNotFoundError, PermissionError, ConnectionRefusedError, NotADirectoryError) as error:
            connection.close()
            raise LocalUnavailable(f"cannot connect to {path}: {error.strerror or error}") from None
        except OSError as error:
            connection.close()
            raise LocalUnavailable(f"cannot connect to {path}: {error.strerror or error}") from None
        fd = -1
        try:
            fd = wire.create_segment(size)
            segment = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            socket.send_fds(
                connection, [wire.ATTACH.pack(wire.ATTACH_MAGIC, wire.PROTOCOL_VERSION, size, endpoint.ticket)], [fd]
            )
            reply = connection.recv(wire.MAX_MESSAGE)
        except TimeoutError:
            connection.close()
            raise DeadlineExceededError(f"local transport: no answer to the attach within {timeout} s") from None
        except OSError as error:
            connection.close()
            raise UnavailableError(f"local transport: attach failed: {error.strerror or error}") from None
        finally:
            if fd >= 0:
                os.close(fd)  # the mapping (and, once attached, the server's) keeps the memory
        code, message = _status(reply)
        if code:
            connection.close()
            raise from_status(status_code(code), message)
        return cls(connection, segment, path)

    @property
    def usable(self) -> bool:
        return not self._broken

    def fits(self, needed: int) -> bool:
        return needed <= self.size

    def step(self, request: pb.LossRequest, logits: torch.Tensor, labels: torch.Tensor) -> LossResult:
        """``request``'s fields (no tensors) with ``logits`` [N, C] and ``labels`` [N], through the segment."""
        n, c = logits.shape
        labels_at, grad_at, loss_at, end = layout(logits, labels, request.need_grad)
        if end > self.size:
            raise ValueError(f"a {end}-byte step does not fit the {self.size}-byte segment")
        session = request.session.encode()
        request_id = request.request_id.encode()
        flags = (
            (wire.TRAINING if request.training else 0)
            | (wire.NEED_GRAD if request.need_grad else 0)
            | (wire.HAS_EPOCH if request.HasField("epoch") else 0)
        )
        header = wire.STEP.pack(
            wire.STEP_MAGIC,
            flags,
            request.rank,
            request.epoch,
            wire.CODES[logits.dtype],
            wire.CODES[labels.dtype],
            len(session),
            len(request_id),
            n,
            c,
            0,
            labels_at,
            grad_at,
            loss_at,
            logits.nbytes if request.need_grad else 0,
            8 * n,
        )
        with self._lock:
            if self._broken:
                raise UnavailableError("the local connection is closed")
            self._view(0, logits.dtype, (n, c)).copy_(logits)
            self._view(labels_at, labels.dtype, (n,)).copy_(labels)
            reply = self._exchange(header + session + request_id)
            code, message = _status(reply)
            if code:
                raise from_status(status_code(code), message)
            return self._result(reply, request.request_id, (n, c), grad_at, loss_at)

    def _exchange(self, message: bytes) -> bytes:
        try:
            self._connection.send(message)
            reply = self._connection.recv(wire.MAX_MESSAGE)
        except TimeoutError:
            self.close()  # an answer could still come, out of step with the next request
            raise DeadlineExceededError("no answer on the local transport in time") from None
        except OSError as error:
            self.close()
            raise UnavailableError(f"the local connection broke: {error.strerror or error}") from None
        except BaseException:  # KeyboardInterrupt while waiting: the next answer would be out of step
            self.close()
            raise
        if not reply:
            self.close()
            raise UnavailableError("the server closed the local connection")
        return reply

    def _result(self, reply: bytes, request_id: str, shape: tuple[int, int], grad_at: int, loss_at: int) -> LossResult:
        (_, _, grad_exponent, loss_code, grad_code, flags, _, n_used, n_correct, epoch, loss_value,
         loss_elements) = wire.REPLY.unpack_from(reply)  # fmt: skip
        loss_dtype = wire.DTYPES.get(loss_code)
        if loss_dtype is None or (flags & wire.GRAD_IN_SEGMENT and grad_code not in wire.DTYPES):
            self.close()
            raise InternalError(f"local transport: a reply with unknown dtypes {loss_code}, {grad_code}")
        if flags & wire.LOSS_IN_SEGMENT:
            if loss_elements != shape[0]:
                self.close()
                raise InternalError(f"local transport: {loss_elements} losses for {shape[0]} samples")
            loss = self._view(loss_at, loss_dtype, (loss_elements,)).clone()
        else:
            loss = torch.tensor(loss_value, dtype=loss_dtype)
        grad = None
        if flags & wire.GRAD_IN_SEGMENT:
            # A private copy: the next step reuses the region, while autograd may keep this one.
            grad = self._view(grad_at, wire.DTYPES[grad_code], shape).clone()
        return LossResult(
            loss=loss,
            scaled_grad=grad,
            grad_exponent=grad_exponent,
            n_used=n_used,
            n_correct=n_correct,
            epoch=epoch,
            request_id=request_id,
        )

    def _view(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        count = 1
        for d in shape:
            count *= d
        if not count:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self._segment, dtype=dtype, count=count, offset=offset).view(shape)

    def close(self) -> None:
        """End the connection; the segment is unmapped with its last view."""
        if not self._broken:
            self._broken = True
            with contextlib.suppress(OSError):
                self._connection.shutdown(socket.SHUT_RDWR)
            self._connection.close()
            with contextlib.suppress(BufferError):
                self._segment.close()


def _status(reply: bytes) -> tuple[int, str]:
    if len(reply) < wire.REPLY.size:
        raise InternalError(f"local transport: a {len(reply)}-byte reply is shorter than its header")
    magic, code, *_, length = wire.REPLY.unpack_from(reply)[:7]
    if magic != wire.REPLY_MAGIC or len(reply) != wire.REPLY.size + length:
        raise InternalError("local transport: not a reply message")
    return code, reply[wire.REPLY.size :].decode("utf-8", "replace")
