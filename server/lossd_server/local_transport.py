"""The same-host data plane: a Unix socket on which each step is one fixed header each way, while the
tensors stay in a sealed memfd segment that the client handed over once (docs/local-transport.md).

This is a thin adapter: a step becomes the same ``pb.LossRequest`` (without tensor bytes) that the
gRPC stream carries, and :meth:`LossServicer.answer` validates it, applies it at most once and
computes it, with the segment's views as its tensors. One thread per connection runs the whole step,
so there is no event-loop or executor hop between the socket and the math.

Why the segment is safe to map: the server accepts only a memfd sealed against shrinking and growing
(checked with F_GET_SEALS), so no access within its announced size can fault (SIGBUS), whatever the
client does. A client can still rewrite its own logits mid-step; that can only spoil its own
results, since labels are copied before they are checked and what the statistics add is checked
again (lossd_server.session).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import mmap
import os
import secrets
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from lossd import _codec
from lossd import _local_protocol as wire
from lossd._exceptions import (
    InvalidArgumentError,
    LossdError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from lossd._local import boot_id
from lossd.v1 import loss_service_pb2 as pb
from lossd_server.admission import math_footprint
from lossd_server.answer import Answer
from lossd_server.errors import status_of
from lossd_server.identifiers import MAX_REQUEST_ID, MAX_SESSION_NAME
from lossd_server.memory import MemoryAccount
from lossd_server.servicer import LossServicer

log = logging.getLogger("lossd_server")

TICKET_TTL_SECONDS = 30.0
MAX_TICKETS = 4096  # outstanding at once; the oldest are dropped first
ATTACH_TIMEOUT_SECONDS = 5.0  # a connection that does not attach within this is closed
MAX_CONNECTIONS = 1024
# sun_path is 108 bytes on Linux, with a terminating NUL.
MAX_SOCKET_PATH = 107
_OK = grpc.StatusCode.OK.value[0]
_INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
_METHOD = "the local transport"
_REPLY_CODE = struct.Struct("<Ii")  # a reply's magic and status code


class Tickets:
    """Single-use, short-lived tickets that bind a socket connection to the tenant that asked over gRPC."""

    def __init__(self, ttl: float = TICKET_TTL_SECONDS, limit: int = MAX_TICKETS) -> None:
        self.ttl = ttl
        self._limit = limit
        self._issued: dict[bytes, tuple[str, float]] = {}  # ticket -> (owner, expiry); insertion ordered
        self._lock = threading.Lock()

    def issue(self, owner: str) -> bytes:
        ticket = secrets.token_bytes(wire.TICKET_BYTES)
        now = time.monotonic()
        with self._lock:
            for old, (_, expiry) in list(self._issued.items()):
                if expiry > now and len(self._issued) < self._limit:
                    break  # the rest are newer
                del self._issued[old]
            self._issued[ticket] = (owner, now + self.ttl)
        return ticket

    def redeem(self, ticket: bytes) -> str:
        """The owner the ticket was issued to; it cannot be used again. UNAUTHENTICATED otherwise."""
        with self._lock:
            owner, expiry = self._issued.pop(ticket, ("", 0.0))
        if expiry < time.monotonic():
            raise UnauthenticatedError(
                "local transport: unknown or expired ticket (tickets from OpenLocal are valid once, "
                f"for {self.ttl:g} s)"
            )
        return owner


@dataclass
class LocalStats:
    """Counters for tests and operators."""

    attached: int = 0  # connections that attached a segment
    refused: int = 0  # attaches refused
    steps: int = 0  # steps answered (errors included)
    open: int = 0  # connections open now
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, delta: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + delta)


class _Refused(Exception):
    """An attach or step after which the connection is closed: the reply, then the end."""

    def __init__(self, error: LossdError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass(frozen=True)
class _Step:
    """A step header, parsed and checked against the segment (arithmetic only, before any memory is held)."""

    request: pb.LossRequest
    n: int
    c: int
    logits_dtype: torch.dtype
    labels_dtype: torch.dtype
    logits_at: int
    labels_at: int
    grad_at: int
    loss_at: int

    @property
    def logits_nbytes(self) -> int:
        return self.n * self.c * self.logits_dtype.itemsize


class SegmentPayload:
    """A step's tensors: views of the mapped segment, no copy (the labels are copied by decode_batch)."""

    shared = True

    def __init__(self, segment: mmap.mmap, step: _Step) -> None:
        self._segment = segment
        self._step = step

    @property
    def logits_nbytes(self) -> int:
        return self._step.logits_nbytes

    def tensors(self, request: pb.LossRequest) -> tuple[torch.Tensor, torch.Tensor]:
        step = self._step
        return (
            self._view(step.logits_at, step.logits_dtype, (step.n, step.c)),
            self._view(step.labels_at, step.labels_dtype, (step.n,)),
        )

    def _view(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        count = math.prod(shape)
        if not count:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self._segment, dtype=dtype, count=count, offset=offset).view(shape)


def _region(name: str, offset: int, nbytes: int, size: int) -> None:
    if offset % wire.ALIGN or offset < 0 or offset + nbytes > size:
        raise InvalidArgumentError(
            f"{name}: {nbytes} bytes at offset {offset} are not a {wire.ALIGN}-byte aligned region "
            f"of the {size}-byte segment"
        )


def _dtype(code: int, name: str, allowed: tuple[torch.dtype, ...]) -> torch.dtype:
    dtype = wire.DTYPES.get(code)
    if dtype not in allowed:
        raise InvalidArgumentError(f"{name}: unsupported dtype {code}")
    return dtype


_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INTS = (torch.int64, torch.int32)


def parse_step(data: bytes, segment_size: int) -> _Step:
    """The step a message describes. ProtocolError: not a step message (the connection is closed);
    InvalidArgumentError: a well-formed step that asks for something wrong (it is answered)."""
    if len(data) < wire.STEP.size:
        raise wire.ProtocolError(f"a step message is at least {wire.STEP.size} bytes; got {len(data)}")
    (magic, flags, rank, epoch, logits_code, labels_code, session_len, id_len, n, c, logits_at, labels_at, grad_at,
     loss_at, grad_room, loss_room) = wire.STEP.unpack_from(data)  # fmt: skip
    if magic != wire.STEP_MAGIC:
        raise wire.ProtocolError(f"not a step message (magic {magic:#x})")
    if len(data) != wire.STEP.size + session_len + id_len:
        raise wire.ProtocolError(
            f"a step message with a {session_len}-byte session and a {id_len}-byte request id is "
            f"{wire.STEP.size + session_len + id_len} bytes; got {len(data)}"
        )
    if flags & ~wire.STEP_FLAGS:
        raise wire.ProtocolError(f"unknown step flags {flags:#x}")
    if session_len > 4 * MAX_SESSION_NAME or id_len > MAX_REQUEST_ID:
        raise InvalidArgumentError("session or request_id: too long")
    try:
        session = data[wire.STEP.size : wire.STEP.size + session_len].decode("utf-8")
        request_id = data[wire.STEP.size + session_len :].decode("ascii")
    except UnicodeDecodeError as error:
        raise InvalidArgumentError(f"session or request_id: not valid text ({error.reason})") from None
    logits_dtype = _dtype(logits_code, "logits", _FLOATS)
    labels_dtype = _dtype(labels_code, "labels", _INTS)
    if n < 0 or c < 0 or n * c > segment_size:
        raise InvalidArgumentError(f"logits: shape [{n}, {c}] does not fit the {segment_size}-byte segment")
    request = pb.LossRequest(
        session=session,
        training=bool(flags & wire.TRAINING),
        need_grad=bool(flags & wire.NEED_GRAD),
        request_id=request_id,
        rank=rank,
    )
    if flags & wire.HAS_EPOCH:
        request.epoch = epoch
    request.logits.dtype, request.labels.dtype = logits_code, labels_code
    request.logits.shape.extend((n, c))
    request.labels.shape.append(n)
    step = _Step(request, n, c, logits_dtype, labels_dtype, logits_at, labels_at, grad_at, loss_at)
    _region("logits", logits_at, step.logits_nbytes, segment_size)
    _region("labels", labels_at, n * labels_dtype.itemsize, segment_size)
    # The answer's regions are checked now, before anything is applied: after, a step could only fail.
    if request.need_grad:
        if grad_room < step.logits_nbytes:
            raise InvalidArgumentError(f"grad: {grad_room} bytes of room for a {step.logits_nbytes}-byte gradient")
        _region("grad", grad_at, step.logits_nbytes, segment_size)
    if loss_room < 8 * n:
        raise InvalidArgumentError(f"loss: {loss_room} bytes of room; per-sample losses need {8 * n}")
    _region("loss", loss_at, 8 * n, segment_size)
    return step


def _write(segment: mmap.mmap, offset: int, tensor: torch.Tensor) -> None:
    data = _codec.byte_view(tensor)
    segment[offset : offset + data.nbytes] = data


def step_reply(answer: Answer, step: _Step, segment: mmap.mmap) -> bytes:
    """Place the gradient (and per-sample losses) in the segment; the reply header says where."""
    flags = grad_dtype = 0
    if answer.grad is not None:
        _write(segment, step.grad_at, answer.grad)
        flags |= wire.GRAD_IN_SEGMENT
        grad_dtype = wire.CODES[answer.grad.dtype]
    loss = answer.loss
    scalar, elements = 0.0, 0
    if loss.dim() == 0:
        scalar = loss.item()
    else:
        _write(segment, step.loss_at, loss)
        flags |= wire.LOSS_IN_SEGMENT
        elements = loss.numel()
    return wire.pack_reply(
        _OK,
        grad_exponent=answer.grad_exponent,
        loss_dtype=wire.CODES[loss.dtype],
        grad_dtype=grad_dtype,
        flags=flags,
        n_used=answer.n_used,
        n_correct=answer.n_correct,
        epoch=answer.epoch,
        loss=scalar,
        loss_elements=elements,
    )


def _error_reply(error: BaseException) -> bytes:
    code, message = status_of(error, _METHOD)
    return wire.pack_reply(code.value[0], message)


class LocalTransport:
    """The listening socket and one thread per attached client."""

    def __init__(
        self,
        path: Path,
        servicer: LossServicer,
        work_memory: MemoryAccount,
        *,
        admission_wait: float,
        ticket_ttl: float = TICKET_TTL_SECONDS,
        attach_timeout: float = ATTACH_TIMEOUT_SECONDS,
        observe: Callable[[int, float], None] | None = None,
    ) -> None:
        self.path = path
        self.stats = LocalStats()
        self._servicer = servicer
        self._work_memory = work_memory
        self._admission_wait = admission_wait
        self._attach_timeout = attach_timeout
        # Told each step's status code and seconds (the metrics' LocalStep).
        self._observe = observe or (lambda code, seconds: None)
        self._tickets = Tickets(ticket_ttl)
        self._boot_id = boot_id()
        self._listener: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self._draining = False
        self._accepting: threading.Thread | None = None

    # Set-up and shutdown ----------------------------------------------------

    def start(self) -> None:
        """Bind and listen; a stale socket left by a server that died is replaced, a live one refused."""
        path = str(self.path)
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise OSError(
                f"--local-socket {path!r} is {len(os.fsencode(path))} bytes; a Unix socket path is at most "
                f"{MAX_SOCKET_PATH} (pass a shorter --local-socket, or '' to serve without one)"
            )
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _remove_stale(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            listener.bind(path)
            # Anyone who can reach the path may connect, but only a ticket from OpenLocal (gRPC, with the
            # tenant's credentials) attaches; the directory's permissions decide who can reach it.
            os.chmod(path, 0o666)
            listener.listen(64)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self._accepting = threading.Thread(target=self._accept, name="lossd-local-accept", daemon=True)
        self._accepting.start()

    def endpoint(self, owner: str) -> pb.LocalEndpoint:
        """OpenLocal's answer for ``owner``: the socket and a fresh ticket."""
        return pb.LocalEndpoint(
            socket_path=str(self.path),
            ticket=self._tickets.issue(owner),
            ticket_ttl_seconds=self._tickets.ttl,
            boot_id=self._boot_id,
            max_segment_bytes=self._work_memory.limit,
            protocol_version=wire.PROTOCOL_VERSION,
        )

    def drain(self, timeout: float) -> bool:
        """Refuse new steps (UNAVAILABLE) and wait up to ``timeout`` for those running; False if some are left."""
        deadline = time.monotonic() + timeout
        with self._idle:
            self._draining = True
            while self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def close(self) -> None:
        """Stop listening, remove the socket and end every connection (its thread then unmaps the segment)."""
        self._draining = True
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)  # wakes its thread's recv with end-of-file
        if self._accepting is not None:
            self._accepting.join(timeout=5)

    # Connections ----------------------------------------------------------

    def _accept(self) -> None:
        while True:
            listener = self._listener
            if listener is None:
                return
            try:
                connection, _ = listener.accept()
            except OSError:
                if self._listener is None:
                    return
                time.sleep(0.05)  # EMFILE, say: keep serving the connections there are
                continue
            with self._lock:
                full = len(self._connections) >= MAX_CONNECTIONS
                if not full:
                    self._connections.add(connection)
            if full:
                _refuse(connection, ResourceExhaustedError(f"local transport: {MAX_CONNECTIONS} connections are open"))
                continue
            threading.Thread(target=self._serve, args=(connection,), name="lossd-local", daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        segment: mmap.mmap | None = None
        self.stats.add("open")
        try:
            owner, segment = self._attach(connection)
            connection.settimeout(None)  # a trainer may think for as long as it likes between steps
            while True:
                data, fds, flags, _ = socket.recv_fds(connection, wire.MAX_MESSAGE, 1)
                for fd in fds:  # none is expected after the attach
                    os.close(fd)
                if not data:
                    return  # end of file: the client closed, died, or the server is closing
                if flags & socket.MSG_TRUNC:
                    connection.send(_error_reply(InvalidArgumentError("local transport: message too long")))
                    return
                started = time.perf_counter()
                if not self._begin():
                    connection.send(_error_reply(UnavailableError("the server is shutting down")))
                    continue
                try:  # in flight until its reply is sent: a drain that ended sooner could cut the reply off
                    reply, keep = self._step(owner, segment, data)
                    connection.send(reply)
                finally:
                    self._end()
                self._observed(reply, time.perf_counter() - started)
                if not keep:
                    return
        except _Refused as refused:
            self.stats.add("refused")
            with contextlib.suppress(OSError):
                connection.send(_error_reply(refused.error))
        except OSError as error:
            if error.errno not in (errno.EPIPE, errno.ECONNRESET, errno.EBADF, errno.ENOTCONN, None):
                log.warning("local transport connection failed: %s", error)
        finally:
            with self._lock:
                self._connections.discard(connection)
            connection.close()
            if segment is not None:
                with contextlib.suppress(BufferError):  # a view still alive: unmapped with its last reference
                    segment.close()
            self.stats.add("open", -1)

    def _observed(self, reply: bytes, seconds: float) -> None:
        try:
            self._observe(_REPLY_CODE.unpack_from(reply)[1], seconds)
        except Exception:
            log.exception("could not count a local step in the metrics")

    def _attach(self, connection: socket.socket) -> tuple[str, mmap.mmap]:
        connection.settimeout(self._attach_timeout)
        try:
            data, fds, flags, _ = socket.recv_fds(connection, wire.MAX_MESSAGE, 4)
        except TimeoutError:
            raise _Refused(InvalidArgumentError("local transport: no attach message in time")) from None
        try:
            if not data:
                raise _Refused(InvalidArgumentError("local transport: closed before attaching"))
            if len(data) != wire.ATTACH.size or flags & socket.MSG_TRUNC:
                raise _Refused(InvalidArgumentError("local transport: not an attach message"))
            magic, version, size, ticket = wire.ATTACH.unpack(data)
            if magic != wire.ATTACH_MAGIC:
                raise _Refused(InvalidArgumentError("local transport: not an attach message"))
            if version != wire.PROTOCOL_VERSION:
                raise _Refused(
                    InvalidArgumentError(
                        f"local transport: protocol version {version}; this server speaks {wire.PROTOCOL_VERSION}"
                    )
                )
            try:
                owner = self._tickets.redeem(ticket)
            except UnauthenticatedError as error:
                raise _Refused(error) from None
            if len(fds) != 1:
                raise _Refused(InvalidArgumentError(f"attach: expected one segment descriptor, got {len(fds)}"))
            segment = self._map(fds[0], size)
        finally:
            for fd in fds:
                os.close(fd)  # the mapping keeps its own reference
        if self._draining:
            segment.close()
            raise _Refused(UnavailableError("the server is shutting down"))
        connection.send(wire.pack_reply(_OK))
        self.stats.add("attached")
        return owner, segment

    def _map(self, fd: int, size: int) -> mmap.mmap:
        """Map the client's segment, only if no access within ``size`` bytes can ever fault."""
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _Refused(InvalidArgumentError("attach: the segment is not a memfd (not even a regular file)"))
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            raise _Refused(
                InvalidArgumentError("attach: the segment is not a memfd (a file cannot be sealed)")
            ) from None
        if seals & wire.REQUIRED_SEALS != wire.REQUIRED_SEALS:
            raise _Refused(
                InvalidArgumentError(
                    "attach: the memfd is not sealed against shrinking and growing (F_SEAL_SHRINK | F_SEAL_GROW)"
                )
            )
        if size <= 0 or info.st_size != size:
            raise _Refused(InvalidArgumentError(f"attach: the segment is {info.st_size} bytes, not {size}"))
        if size > self._work_memory.limit:
            raise _Refused(
                ResourceExhaustedError(
                    f"attach: a {size}-byte segment is more than request_memory_bytes={self._work_memory.limit}"
                )
            )
        try:
            return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as error:  # sealed against writes, say
            raise _Refused(InvalidArgumentError(f"attach: cannot map the segment: {error.strerror}")) from None

    def _step(self, owner: str, segment: mmap.mmap, data: bytes) -> tuple[bytes, bool]:
        """(the reply, whether the connection stays open)."""
        self.stats.add("steps")
        try:
            step = parse_step(data, len(segment))
        except wire.ProtocolError as error:
            return _error_reply(InvalidArgumentError(f"local transport: {error}")), False
        except LossdError as error:
            return _error_reply(error), True
        try:
            footprint = math_footprint(0, step.logits_nbytes, step.request.logits.dtype)
            with self._work_memory.reserve(footprint, "a local step", wait=self._admission_wait):
                answer = self._servicer.answer(owner, step.request, SegmentPayload(segment, step))
                return step_reply(answer, step, segment), True
        except Exception as error:
            return _error_reply(error), True

    def _begin(self) -> bool:
        """Count a step in flight; False once draining (the step is refused, nothing applied)."""
        with self._lock:
            if self._draining:
                return False
            self._in_flight += 1
            return True

    def _end(self) -> None:
        with self._idle:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.notify_all()


def _refuse(connection: socket.socket, error: LossdError) -> None:
    with contextlib.suppress(OSError):
        connection.send(_error_reply(error))
    connection.close()


def _remove_stale(path: Path) -> None:
    """Remove a socket no server listens on any more (one killed with -9 leaves its file behind)."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise OSError(f"--local-socket {str(path)!r} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        path.unlink(missing_ok=True)  # stale
        return
    except OSError:
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise OSError(f"--local-socket {str(path)!r}: another lossd server is listening on it")
