"""``lossd.Client``: the session RPCs and the loss calls, with typed errors."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

import grpc
import torch

from lossd import _codec, _wire
from lossd._auth import BearerToken
from lossd._config import DEFAULT_BARRIER_TIMEOUT, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_TIMEOUT, ClientConfig, TLSConfig
from lossd._exceptions import (
    FailedPreconditionError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
    UnimplementedError,
    from_rpc_error,
)
from lossd._local import LocalChannel, LocalUnavailable, describable, layout
from lossd._malloc import tune_client_once
from lossd._retry import RetryPolicy
from lossd._spec import SessionSpec
from lossd._stream import LossStream
from lossd._types import LossResult, SessionInfo, SessionState
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc

R = TypeVar("R")
log = logging.getLogger("lossd")
_LOSS_STREAM = "/lossd.v1.LossService/LossStream"
_COMPUTE_LOSS = "/lossd.v1.LossService/ComputeLoss"
# After the local transport could not be reached (a server restarting, say), "auto" steps go over gRPC
# for this long before they try the socket again.
LOCAL_RETRY_SECONDS = 10.0


class _Connection:
    """The channel, the current loss stream and local channel: what a client must release, kept apart
    from the client so that a finalizer can release it without keeping the client alive."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.closed = False
        self._stream: LossStream | None = None
        self.local: LocalChannel | None = None
        # "auto": why the local transport is not used, and when to try it again (None: never).
        self.local_refusal: str | None = None
        self.local_retry_at: float | None = None
        self.transport: str | None = None  # what the last step used
        self.lock = threading.Lock()

    def stream(self, open_call: Any, timeout: float | None) -> LossStream:
        with self.lock:
            if self.closed:
                raise RuntimeError("this lossd.Client is closed")
            if self._stream is None or not self._stream.usable:
                if self._stream is not None:
                    self._stream.close()  # ends its watchdog thread
                self._stream = LossStream(open_call, timeout)
            return self._stream

    def close(self) -> None:
        with self.lock:
            self.closed = True
            if self._stream is not None:
                self._stream.close()
            if self.local is not None:
                self.local.close()
            self.channel.close()


class Client:
    """A connection to a lossd server.

    ``with lossd.Client("localhost:50051") as client: client.create_session("run", spec)``.
    Without a target it uses ``LOSSD_TARGET``, else ``localhost:50051``.

    ``timeout`` bounds each call; ``barrier_timeout`` how long next_epoch waits for
    the other ranks. A call that fails with UNAVAILABLE (the server restarts, the
    connection drops) is retried with backoff for up to ``retry_deadline`` seconds,
    loss requests under their original id, so none is lost or counted twice.

    ``token`` (else ``LOSSD_TOKEN``) is sent as ``authorization: Bearer`` on every
    call, for a server started with ``--token-file``; ``token=""`` sends none.
    ``tls``: a :class:`lossd.TLSConfig`, ``True`` (TLS with the system's CAs and
    any ``LOSSD_TLS_*`` variables), ``False`` (plaintext), or None: TLS exactly
    when a ``LOSSD_TLS_*`` variable is set. Arguments win over the environment.

    ``transport`` (else ``LOSSD_TRANSPORT``, else ``"auto"``): how loss steps travel.
    ``"local"``: the server's same-host Unix socket, with the tensors in a sealed memfd
    segment both processes map; ``"grpc"``: the gRPC LossStream; ``"auto"``: local when
    the server advertises a socket this process can reach on its host, else gRPC.
    ``local_socket`` (else ``LOSSD_LOCAL_SOCKET``): the socket's path here, when it
    differs from the server's (a container mounting its volume elsewhere).
    See docs/local-transport.md.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        retry_deadline: float = RetryPolicy.deadline,
        barrier_timeout: float | None = DEFAULT_BARRIER_TIMEOUT,
        token: str | None = None,
        tls: TLSConfig | bool | None = None,
        transport: str | None = None,
        local_socket: str | None = None,
    ) -> None:
        self.config = ClientConfig.resolve(
            target,
            timeout=timeout,
            max_message_bytes=max_message_bytes,
            retry_deadline=retry_deadline,
            barrier_timeout=barrier_timeout,
            token=token,
            tls=tls,
            transport=transport,
            local_socket=local_socket,
        )
        tune_client_once()
        self._pid = os.getpid()
        options = self.config.channel_options()
        if self.config.tls is None:
            channel = grpc.insecure_channel(self.config.target, options=options)
        else:
            channel = grpc.secure_channel(self.config.target, self.config.tls.credentials(), options=options)
        # Through the channel, so every call carries the token: streams, reopened streams and retries alike.
        token = self.config.token
        calls = channel if token is None else grpc.intercept_channel(channel, BearerToken(token))
        self._stub = pb_grpc.LossServiceStub(calls)  # type: ignore[no-untyped-call]
        # The loss methods take bytes built by lossd._wire (the tensors copied once) and answer
        # lossd._wire.ReceivedResponse (the gradient a view of the received bytes).
        self._loss_stream = calls.stream_stream(_LOSS_STREAM, response_deserializer=_wire.decode_loss_response)
        self._compute_loss = calls.unary_unary(_COMPUTE_LOSS, response_deserializer=_wire.decode_loss_response)
        self._connection = _Connection(channel)
        # Closes the channel and the stream even when a client is dropped without close().
        self._finalizer = weakref.finalize(self, self._connection.close)

    @property
    def target(self) -> str:
        return self.config.target

    @property
    def closed(self) -> bool:
        return self._connection.closed

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this lossd.Client is closed")
        if os.getpid() != self._pid:
            # A forked child would share the parent's channel and local segment, and could
            # write its tensors under the parent's request in flight.
            raise RuntimeError(
                f"this lossd.Client was created in process {self._pid}; connections do not survive fork: "
                f"create a new lossd.Client (or loss module) in process {os.getpid()}"
            )

    def _call_once(self, method: Callable[..., R], request: Any, timeout: float | None) -> R:
        self._check_open()
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error

    def _call(self, method: Callable[..., R], request: Any, *, timeout: float | None = None) -> R:
        """One RPC, retried on UNAVAILABLE; only for requests that are safe to repeat."""
        call_timeout = self.config.timeout if timeout is None else timeout
        return self.config.retry.run(lambda: self._call_once(method, request, call_timeout), self.target)

    # Sessions -------------------------------------------------------------

    def create_session(self, name: str, spec: SessionSpec) -> tuple[SessionInfo, bool]:
        """Get-or-create: (session, created). The same name with another spec raises AlreadyExistsError."""
        response = self._call(self._stub.CreateSession, pb.CreateSessionRequest(name=name, spec=spec.to_proto()))
        return SessionInfo.from_proto(response.session), response.created

    def get_session(self, name: str) -> SessionInfo:
        return SessionInfo.from_proto(self._call(self._stub.GetSession, pb.GetSessionRequest(name=name)))

    def list_sessions(self) -> list[SessionInfo]:
        response = self._call(self._stub.ListSessions, pb.ListSessionsRequest())
        return [SessionInfo.from_proto(s) for s in response.sessions]

    def delete_session(self, name: str, *, retry: bool = True) -> None:
        """Delete a session; ``retry=False`` makes one attempt (best-effort clean-up at close)."""
        request = pb.DeleteSessionRequest(name=name)
        try:
            self._call_once(self._stub.DeleteSession, request, self.config.timeout)
        except UnavailableError:
            if not retry:
                raise
            with contextlib.suppress(NotFoundError):  # retried: an earlier attempt may have deleted it
                self._call(self._stub.DeleteSession, request)

    def next_epoch(
        self, session: str, epoch: int | None = None, *, rank: int = 0, timeout: float | None = None
    ) -> SessionInfo:
        """Finish ``epoch`` for ``rank``; returns once every rank of the session has finished it.

        A repeat for the epoch just finished returns the same answer, so this is
        safe to retry. Waits up to ``timeout`` (default: the client's
        ``barrier_timeout``) and then raises DeadlineExceededError naming the
        missing ranks. Without ``epoch`` (world_size 1 only) it finishes whatever
        epoch is current and is not retried, since a repeat would advance again.
        """
        request = pb.NextEpochRequest(session=session, rank=rank)
        wait = self.config.barrier_timeout if timeout is None else timeout
        if epoch is None:
            return SessionInfo.from_proto(self._call_once(self._stub.NextEpoch, request, wait))
        request.epoch = epoch
        return SessionInfo.from_proto(self._call(self._stub.NextEpoch, request, timeout=wait))

    def get_state(self, session: str) -> SessionState:
        return SessionState.from_proto(self._call(self._stub.GetState, pb.GetStateRequest(session=session)))

    def load_state(self, session: str, state: SessionState) -> SessionInfo:
        request = pb.LoadStateRequest(session=session, state=state.to_proto())
        return SessionInfo.from_proto(self._call(self._stub.LoadState, request))

    # Epoch-cached mode ------------------------------------------------------------

    def get_soft_labels(self, session: str, epoch: int | None = None) -> tuple[int, torch.Tensor]:
        """(epoch, supervise): the C x C float32 soft labels, column k for class k, of the current epoch,
        or of ``epoch`` if the server still keeps it (else NotFoundError)."""
        message = self._call(self._stub.GetSoftLabels, pb.GetStateRequest(session=session, epoch=epoch))
        return message.epoch, _codec.decode(message.supervise, "supervise").clone()

    def get_soft_label_history(self, session: str) -> tuple[list[int], torch.Tensor]:
        """(epochs, diagonals): the epochs whose S the server keeps, ascending, and [len(epochs), C] float32,
        each class's soft label on itself in each of them."""
        message = self._call(self._stub.GetSoftLabelHistory, pb.GetStateRequest(session=session))
        return list(message.epochs), _codec.decode(message.diagonals, "diagonals").clone()

    def add_statistics(
        self,
        session: str,
        *,
        epoch: int,
        classes: torch.Tensor,
        rows: torch.Tensor,
        counts: torch.Tensor,
        samples: int,
        correct: int,
        rank: int = 0,
        request_id: str | None = None,
    ) -> SessionInfo:
        """Add locally accumulated OLS statistics to ``epoch``: ``rows[j]`` ([K, C] float64) is the summed
        softmax of the ``counts[j]`` correctly predicted samples of class ``classes[j]``.

        Applied once per (session, rank, request_id), so it is retried on UNAVAILABLE under the same id.
        """
        request = pb.StatisticsRequest(
            session=session,
            rank=rank,
            epoch=epoch,
            request_id=request_id or uuid.uuid4().hex,
            classes=_codec.encode(classes),
            rows=_codec.encode(rows),
            counts=_codec.encode(counts),
            samples=samples,
            correct=correct,
        )
        return SessionInfo.from_proto(self._call(self._stub.AddStatistics, request))

    # Losses ---------------------------------------------------------------

    @staticmethod
    def _loss_request(
        session: str,
        logits: torch.Tensor | None,
        labels: torch.Tensor | None,
        training: bool,
        need_grad: bool,
        request_id: str | None,
        rank: int,
        epoch: int | None,
    ) -> pb.LossRequest:
        request = pb.LossRequest(
            session=session,
            logits=None if logits is None else _codec.encode(logits),
            labels=None if labels is None else _codec.encode(labels),
            training=training,
            need_grad=need_grad,
            request_id=request_id or uuid.uuid4().hex,
            rank=rank,
        )
        if epoch is not None:
            request.epoch = epoch
        return request

    def compute_loss(
        self,
        session: str,
        logits: torch.Tensor,
        labels: torch.Tensor,
        *,
        training: bool = True,
        need_grad: bool = True,
        request_id: str | None = None,
        rank: int = 0,
        epoch: int | None = None,
        stream: bool = True,
    ) -> LossResult:
        """Loss and gradient for [N, C] logits and [N] labels.

        ``epoch``, when given, must be the session's epoch (FailedPreconditionError
        otherwise). ``stream=True`` (the per-step path) sends the request on this
        client's bidirectional stream; ``False`` makes one unary call. Either way a
        resend after UNAVAILABLE keeps the request id, so it is applied once.
        """
        if not stream:
            request = self._loss_request(session, None, None, training, need_grad, request_id, rank, epoch)
            data = _wire.encode_loss_request(request, logits, labels)
            return LossResult.from_received(self._call(self._compute_loss, data))
        # Each attempt fills the tensors in: a resend may go over another transport than the first try.
        request = self._loss_request(session, None, None, training, need_grad, request_id, rank, epoch)
        return self.config.retry.run(lambda: self._step(request, logits, labels), self.target)

    def _step(self, request: pb.LossRequest, logits: torch.Tensor, labels: torch.Tensor) -> LossResult:
        self._check_open()
        local = None
        if describable(logits, labels):
            local = self._local_channel(layout(logits, labels, request.need_grad)[3])
        if local is not None:
            result = local.step(request, logits, labels)
            self._used("local", local.socket_path)
            return result
        result = self._open_stream().call_tensors(request, logits, labels)
        self._used("grpc", self._connection.local_refusal or f"transport={self.config.transport!r}")
        return result

    def _open_stream(self) -> LossStream:
        self._check_open()
        return self._connection.stream(self._loss_stream, self.config.timeout)

    @property
    def transport(self) -> str:
        """``"local"`` or ``"grpc"``: what the last loss step used, or (before the first) what the next will."""
        if self._connection.transport is None:
            self._local_channel(0)
            return "local" if self._connection.local is not None else "grpc"
        return self._connection.transport

    def _used(self, transport: str, how: str) -> None:
        connection = self._connection
        if connection.transport != transport:
            connection.transport = transport
            log.debug("lossd client for %s: loss steps use the %s transport (%s)", self.target, transport, how)

    def _local_channel(self, needed: int) -> LocalChannel | None:
        """The attached local channel, (re)attached as needed; None where steps go over gRPC instead.

        ``"local"`` raises where ``"auto"`` would fall back: FailedPreconditionError when this process cannot
        use the server's socket, UnavailableError (retried) while it cannot reach it.
        """
        mode = self.config.transport
        if mode == "grpc":
            return None
        connection = self._connection
        with connection.lock:
            channel = connection.local
            if channel is not None and channel.usable and channel.fits(needed):
                return channel
            if channel is not None:
                channel.close()  # broken (a resend goes to a fresh attach), or a bigger batch needs a bigger segment
                connection.local = None
            if mode == "auto" and connection.local_refusal is not None:
                retry_at = connection.local_retry_at
                if retry_at is None or time.monotonic() < retry_at:
                    return None
            try:
                connection.local = self._attach(needed)
                connection.local_refusal = connection.local_retry_at = None
            except (LocalUnavailable, FailedPreconditionError, UnimplementedError) as error:
                why = f"no local transport: {error}"
                if mode == "local":
                    raise FailedPreconditionError(f"transport='local': {why}") from error
                # Another host, or a server without a socket: for good. A socket not there (yet): for a while.
                transient = isinstance(error, LocalUnavailable) and "cannot connect" in str(error)
                connection.local_refusal = why
                connection.local_retry_at = time.monotonic() + LOCAL_RETRY_SECONDS if transient else None
                return None
            except ResourceExhaustedError:
                if mode == "local":
                    raise
                return None  # a batch larger than the server maps: this one goes over gRPC
            return connection.local

    def _attach(self, needed: int) -> LocalChannel:
        """A ticket over gRPC (so the tenant's credentials decide), then the segment over the socket."""
        endpoint = self._call_once(self._stub.OpenLocal, pb.OpenLocalRequest(), self.config.timeout)
        return LocalChannel.open(endpoint, needed, socket_path=self.config.local_socket, timeout=self.config.timeout)

    # Lifecycle --------------------------------------------------------------

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> Client:
        if self.closed:
            raise RuntimeError("cannot reopen a closed lossd.Client")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"lossd.Client({self.target!r}, {'closed' if self.closed else 'open'})"
