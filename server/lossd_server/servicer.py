"""LossService: decodes requests, calls the store and sessions, encodes responses.

Every method body runs on a worker thread, so the event loop stays free for
health checks and other streams while the math runs. Ranks waiting in the
next_epoch barrier wait on the event loop, not on a worker.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch
from grpc import aio

from lossd import _codec, _wire
from lossd._exceptions import (
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc
from lossd_server.admission import Undecodable, loss_footprint
from lossd_server.answer import Answer
from lossd_server.auth import Identify, anonymous
from lossd_server.batch import Payload, decode_batch
from lossd_server.errors import status_of
from lossd_server.identifiers import MAX_REQUEST_ID, check_request_id, check_session_name
from lossd_server.memory import MemoryAccount, Reservation, Unlimited, reserve_async
from lossd_server.replay import Commit
from lossd_server.session import Progress, Session, SessionView, StateSnapshot, Upload, check_upload
from lossd_server.spec import canonical_spec
from lossd_server.store import SessionStore

T = TypeVar("T")
log = logging.getLogger("lossd_server")

# A barrier call answers this long before its deadline, so the caller learns
# which ranks are missing instead of a bare DEADLINE_EXCEEDED from gRPC.
MAX_DEADLINE_MARGIN = 1.0


def session_message(view: SessionView, owner: str) -> pb.Session:
    return pb.Session(
        name=view.name,
        owner=owner,
        spec=view.spec.to_proto(),
        epoch=view.epoch,
        samples_this_epoch=view.samples_this_epoch,
        correct_this_epoch=view.correct_this_epoch,
        created_at=view.created_at,
        updated_at=view.updated_at,
        state_bytes=view.state_bytes,
        ranks_finished=view.ranks_finished,
        samples_lost=view.samples_lost,
        snapshot_at=view.snapshot_at,
    )


class WirePayload:
    """The tensors of a LossRequest that arrived over gRPC: views of the received bytes (lossd._wire)."""

    shared = False

    def __init__(self, received: _wire.ReceivedRequest) -> None:
        self._received = received

    @property
    def logits_nbytes(self) -> int:
        return self._received.logits_data.nbytes

    def tensors(self, request: pb.LossRequest) -> tuple[torch.Tensor, torch.Tensor]:
        received = self._received
        try:
            return (
                _wire.decode_tensor(request.logits, received.logits_data, "logits"),
                _wire.decode_tensor(request.labels, received.labels_data, "labels"),
            )
        except _codec.CodecError as error:
            raise InvalidArgumentError(str(error)) from None


LossRequestIn = pb.LossRequest | _wire.ReceivedRequest


def _parts(request: LossRequestIn) -> tuple[pb.LossRequest, WirePayload | None]:
    if isinstance(request, _wire.ReceivedRequest):
        return request.message, WirePayload(request)
    return request, None


# json.dumps with separators builds a new encoder per call; this one gives the same string in half the time.
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))


def _fingerprint(request: pb.LossRequest, logits_nbytes: int) -> str:
    """What a resend must repeat, as a string a snapshot can keep; the tensor bytes are not hashed (hot path).
    The same on every transport, so a step resent on gRPC after the local socket broke matches."""
    return _COMPACT_JSON.encode(
        [
            request.need_grad,
            request.epoch if request.HasField("epoch") else None,
            request.logits.dtype,
            list(request.logits.shape),
            logits_nbytes,
            request.labels.dtype,
            list(request.labels.shape),
        ]
    )


def _statistics_fingerprint(request: pb.StatisticsRequest) -> str:
    """What a resend of an upload must repeat. Uploads are rare and small next to the loss
    stream, so the tensors are hashed: a reused id with other statistics is refused."""
    digest = hashlib.sha256()
    for tensor in (request.classes, request.rows, request.counts):
        digest.update(json.dumps([tensor.dtype, list(tensor.shape)]).encode())
        digest.update(tensor.data)
    return json.dumps(
        ["statistics", request.epoch, request.samples, request.correct, digest.hexdigest()], separators=(",", ":")
    )


def _decode_upload(request: pb.StatisticsRequest) -> Upload:
    tensors: dict[str, torch.Tensor] = {}
    for field in ("classes", "rows", "counts"):
        if not request.HasField(field):
            raise InvalidArgumentError(f"{field}: required")
        try:
            tensors[field] = _codec.decode(getattr(request, field), field)
        except _codec.CodecError as error:
            raise InvalidArgumentError(str(error)) from None
    return Upload(tensors["classes"], tensors["rows"], tensors["counts"], request.samples, request.correct)


class LossServicer(pb_grpc.LossServiceServicer):
    def __init__(
        self,
        store: SessionStore,
        executor: ThreadPoolExecutor,
        identify: Identify = anonymous,
        *,
        on_training_samples: Callable[[int], None] | None = None,
        local_endpoint: Callable[[str], pb.LocalEndpoint] | None = None,
        inline_math_bytes: int = 0,
        work_memory: MemoryAccount | None = None,
        admission_wait: float = 2.0,
    ) -> None:
        self._store = store
        # Calls in flight reserve what they allocate here first (lossd_server.admission).
        self._work_memory = work_memory or Unlimited()
        self._admission_wait = admission_wait
        # Stream requests with at most this many bytes of logits run on the event loop itself: no
        # hand-off to a worker thread and back. 0: every request goes to the workers.
        self._inline_math_bytes = inline_math_bytes
        # Issues a tenant a ticket for the local transport (lossd_server.local_transport); None: no socket.
        self._local_endpoint = local_endpoint
        self._executor = executor
        self._identify = identify
        # Told the samples of each applied training batch (the metrics); a replayed resend never gets here.
        self._on_training_samples = on_training_samples or (lambda samples: None)
        # Touched only on the event loop, so no lock is needed.
        self._draining = False
        self._drain_started = asyncio.Event()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def _run(self, function: Callable[..., T], *args: object, inline: bool = False) -> T:
        if self._draining:
            # Refused before it runs, so nothing is applied: the caller can retry on the next server.
            raise UnavailableError("the server is shutting down")
        self._in_flight += 1
        self._idle.clear()
        try:
            if inline:
                return function(*args)
            return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    def serve_local(self, endpoint: Callable[[str], pb.LocalEndpoint]) -> None:
        """Answer OpenLocal from now on, with ``endpoint(owner)`` (the local transport, once it listens)."""
        self._local_endpoint = endpoint

    @property
    def draining(self) -> bool:
        return self._draining

    async def drain(self, timeout: float) -> bool:
        """Refuse new work and wait up to ``timeout`` for the work in flight; False if some is left."""
        self._draining = True
        self._drain_started.set()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # Session management -------------------------------------------------

    def _create(self, owner: str, request: pb.CreateSessionRequest) -> pb.CreateSessionResponse:
        check_session_name(request.name)
        session, created = self._store.create(owner, request.name, canonical_spec(request.spec))
        with self._session_messages_memory([session.view()], "CreateSession"):
            return pb.CreateSessionResponse(session=session_message(session.view(), owner), created=created)

    def _session_messages_memory(self, views: list[SessionView], what: str) -> Reservation:
        """Room for answers that carry specs: a spec's class weights (8 C bytes) are encoded, then serialised."""
        weights = sum(8 * view.spec.n_classes for view in views if view.spec.weight is not None)
        return self._work_memory.reserve(2 * weights, what, wait=self._admission_wait)

    def _get_session(self, owner: str, name: str) -> pb.Session:
        view = self._store.get(owner, name).view()
        with self._session_messages_memory([view], "GetSession"):
            return session_message(view, owner)

    def _list_sessions(self, owner: str) -> pb.ListSessionsResponse:
        views = self._store.list(owner)
        with self._session_messages_memory(views, "ListSessions"):
            return pb.ListSessionsResponse(sessions=[session_message(view, owner) for view in views])

    async def CreateSession(
        self, request: pb.CreateSessionRequest, context: aio.ServicerContext
    ) -> pb.CreateSessionResponse:
        return await self._run(self._create, self._identify(context), request)

    async def GetSession(self, request: pb.GetSessionRequest, context: aio.ServicerContext) -> pb.Session:
        owner = self._identify(context)
        return await self._run(self._get_session, owner, request.name)

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: aio.ServicerContext
    ) -> pb.ListSessionsResponse:
        owner = self._identify(context)
        return await self._run(self._list_sessions, owner)

    async def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: aio.ServicerContext
    ) -> pb.DeleteSessionResponse:
        await self._run(self._delete, self._identify(context), request.name)
        return pb.DeleteSessionResponse()

    def _delete(self, owner: str, name: str) -> None:
        session = self._store.delete(owner, name)
        if session is not None:
            session.abort_barrier(NotFoundError(f"session {name!r} was deleted while ranks waited in next_epoch"))

    # Losses ---------------------------------------------------------------

    def _compute(self, owner: str, request: LossRequestIn) -> Answer:
        return self.answer(owner, *_parts(request))

    def answer(self, owner: str, request: pb.LossRequest, payload: Payload | None = None) -> Answer:
        """A loss request on any transport: validated, applied at most once, answered. ``payload``: its
        tensors when they did not travel in ``request`` (the local transport's segment, a sliced message)."""
        check_session_name(request.session)
        check_request_id(request.request_id)
        session = self._store.get(owner, request.session)
        session.check_rank(request.rank)
        if not (request.training and request.request_id):
            return self._respond(owner, session, request, payload)  # eval changes no state: a resend recomputes
        nbytes = len(request.logits.data) if payload is None else payload.logits_nbytes
        fingerprint = _fingerprint(request, nbytes)
        answer = session.replay.run_once(
            request.rank,
            request.request_id,
            fingerprint,
            lambda commit: self._respond(owner, session, request, payload, fingerprint, commit=commit),
            recompute=lambda: self._respond(owner, session, request, payload, count=False),
        )
        assert isinstance(answer, Answer)
        return answer

    def _respond(
        self,
        owner: str,
        session: Session,
        request: pb.LossRequest,
        payload: Payload | None,
        fingerprint: str = "",
        *,
        count: bool = True,
        commit: Commit | None = None,
    ) -> Answer:
        """``count=False`` answers a resend whose statistics were applied already: same math, no counting."""
        batch = decode_batch(request, session.spec, payload)
        training = request.training and count
        result = session.compute(
            batch,
            training=training,
            need_grad=request.need_grad,
            rank=request.rank,
            epoch=request.epoch if request.HasField("epoch") else None,
            request=(request.request_id, fingerprint) if training and request.request_id else None,
            commit=commit,
        )
        output = result.output
        if training:
            self._applied(owner, session, result.progress, output.n_used)
        grad, exponent = None, 0
        if output.grad is not None:
            grad, exponent = _codec.scale_gradient(output.grad, batch.logits.dtype)
            grad = grad.to("cpu").contiguous()
        loss = output.loss.to("cpu")
        return Answer(request.request_id, loss, grad, exponent, output.n_used, output.n_correct, result.epoch)

    def _applied(self, owner: str, session: Session, progress: Progress | None, samples: int) -> None:
        """After a batch was applied: the progress log and the metrics, best effort (it is applied either way)."""
        self._store.record_progress(owner, session, progress)
        try:
            self._on_training_samples(samples)
        except Exception:
            log.exception("could not count %d training samples in the metrics", samples)

    async def ComputeLoss(self, request: LossRequestIn, context: aio.ServicerContext) -> Answer:
        return await self._run(self._compute, self._identify(context), request)

    async def LossStream(
        self, request_iterator: AsyncIterator[LossRequestIn | Undecodable], context: aio.ServicerContext
    ) -> AsyncIterator[Answer | pb.LossResponse]:
        owner = self._identify(context)  # once: the stream's credentials do not change
        async for request in request_iterator:
            if isinstance(request, Undecodable):  # answered in band; the stream goes on
                invalid = request.invalid("LossStream")
                yield pb.LossResponse(error=pb.Error(code=invalid.code.value[0], message=invalid.message))
                continue
            reservation: Reservation | None = None
            response: Answer | pb.LossResponse
            try:
                # Admitted now that its size is known: its math and its answer must fit the request budget.
                reservation = await reserve_async(
                    self._work_memory, loss_footprint(request), "a LossStream request", wait=self._admission_wait
                )
                inline = self._runs_inline(request)
                response = await self._run(self._compute, owner, request, inline=inline)
            except Exception as error:
                code, message = status_of(error, "/lossd.v1.LossService/LossStream")
                response = pb.LossResponse(
                    request_id=_parts(request)[0].request_id[:MAX_REQUEST_ID],
                    error=pb.Error(code=code.value[0], message=message),
                )
            try:
                yield response
            finally:
                if reservation is not None:  # held until the answer is written out
                    reservation.release()

    async def OpenLocal(self, request: pb.OpenLocalRequest, context: aio.ServicerContext) -> pb.LocalEndpoint:
        owner = self._identify(context)
        if self._local_endpoint is None:
            raise FailedPreconditionError(
                "this server has no local transport (started with --local-socket ''): use the gRPC stream"
            )
        if self._draining:
            raise UnavailableError("the server is shutting down")
        return self._local_endpoint(owner)

    def _runs_inline(self, request: LossRequestIn) -> bool:
        """Whether a stream request is small enough (--inline-math-bytes) to run on the event loop."""
        if not self._inline_math_bytes:
            return False
        message = _parts(request)[0]
        try:  # from the shape, not len(data): that would copy an inline payload out of the message
            nbytes = math.prod(message.logits.shape) * _codec.torch_dtype(message.logits).itemsize
        except _codec.CodecError:
            return False  # a worker refuses it with the proper message
        return nbytes <= self._inline_math_bytes

    # Epoch-cached mode ------------------------------------------------------------

    def _get_soft_labels(self, owner: str, request: pb.GetStateRequest) -> pb.SessionState:
        check_session_name(request.session)
        with self._answer_memory(self._store.get(owner, request.session), 2, "GetSoftLabels"):
            return self._soft_labels_message(owner, request)

    def _soft_labels_message(self, owner: str, request: pb.GetStateRequest) -> pb.SessionState:
        epoch, soft_labels = self._store.get(owner, request.session).soft_labels()
        if request.HasField("epoch") and request.epoch != epoch:
            past = self._store.soft_labels_at(owner, request.session, request.epoch)
            if past is None:
                kept = [kept_epoch for kept_epoch, _ in self._store.soft_label_history(owner, request.session)]
                raise NotFoundError(
                    f"session {request.session!r} keeps no soft labels of epoch {request.epoch} "
                    f"(kept: {kept}; the current epoch is {epoch})"
                )
            epoch, soft_labels = request.epoch, past
        return pb.SessionState(epoch=epoch, supervise=_codec.encode(soft_labels.T))  # reference layout

    def _soft_label_history(self, owner: str, request: pb.GetStateRequest) -> pb.SoftLabelHistory:
        check_session_name(request.session)
        if request.HasField("epoch"):
            raise InvalidArgumentError("epoch: GetSoftLabelHistory returns every kept epoch; leave it unset")
        history = self._store.soft_label_history(owner, request.session)
        diagonals = torch.stack([soft.diagonal() for _, soft in history]).to(torch.float32)
        return pb.SoftLabelHistory(epochs=[epoch for epoch, _ in history], diagonals=_codec.encode(diagonals))

    async def GetSoftLabelHistory(
        self, request: pb.GetStateRequest, context: aio.ServicerContext
    ) -> pb.SoftLabelHistory:
        return await self._run(self._soft_label_history, self._identify(context), request)

    async def GetSoftLabels(self, request: pb.GetStateRequest, context: aio.ServicerContext) -> pb.SessionState:
        return await self._run(self._get_soft_labels, self._identify(context), request)

    def _add_statistics(self, owner: str, request: pb.StatisticsRequest) -> pb.Session:
        check_session_name(request.session)
        check_request_id(request.request_id)
        session = self._store.get(owner, request.session)
        session.check_rank(request.rank)
        if session.spec.kind != "online_label_smoothing":
            raise InvalidArgumentError(
                f"session: {request.session!r} is a {session.spec.kind} session; "
                "only online_label_smoothing keeps statistics"
            )
        if not request.HasField("epoch"):
            raise InvalidArgumentError("epoch: required (the epoch the statistics belong to)")
        if not request.request_id:
            raise InvalidArgumentError("request_id: required, so that a resend is applied once")
        upload = _decode_upload(request)
        check_upload(session.spec, upload)  # before any state changes
        fingerprint = _statistics_fingerprint(request)

        def apply(commit: Commit) -> pb.Session:
            view, _, progress = session.add_statistics(
                upload, rank=request.rank, epoch=request.epoch, request=(request.request_id, fingerprint), commit=commit
            )
            self._applied(owner, session, progress, upload.samples)
            return session_message(view, owner)

        return session.replay.run_once(  # type: ignore[return-value]
            request.rank,
            request.request_id,
            fingerprint,
            apply,
            # Applied before a restart (its id came back with the snapshot): counted already.
            recompute=lambda: session_message(session.view(), owner),
        )

    async def AddStatistics(self, request: pb.StatisticsRequest, context: aio.ServicerContext) -> pb.Session:
        return await self._run(self._add_statistics, self._identify(context), request)

    # Epochs and state ---------------------------------------------------------

    def _arrive(self, owner: str, request: pb.NextEpochRequest) -> tuple[Session, Future[SessionView]]:
        check_session_name(request.session)
        session = self._store.get(owner, request.session)
        return session, session.arrive(request.rank, request.epoch if request.HasField("epoch") else None)

    async def NextEpoch(self, request: pb.NextEpochRequest, context: aio.ServicerContext) -> pb.Session:
        owner = self._identify(context)
        session, done = await self._run(self._arrive, owner, request)
        if not done.done():
            await self._wait_for_ranks(session, request, done, context.time_remaining())
        return session_message(done.result(), owner)

    async def _wait_for_ranks(
        self, session: Session, request: pb.NextEpochRequest, done: Future[SessionView], remaining: float | None
    ) -> None:
        wait = None if remaining is None else max(0.0, remaining - min(MAX_DEADLINE_MARGIN, 0.1 * remaining))
        # Never cancel the wrapper: that would cancel the future every rank shares.
        finished: asyncio.Future[SessionView] = asyncio.wrap_future(done)
        # The outcome is read from ``done``; this keeps asyncio from logging it as never retrieved.
        finished.add_done_callback(lambda future: future.cancelled() or future.exception())
        draining: asyncio.Future[bool] = asyncio.ensure_future(self._drain_started.wait())
        try:
            await asyncio.wait((finished, draining), timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        finally:
            draining.cancel()
        if done.done():
            return
        if self._draining:
            raise UnavailableError(
                "the server is shutting down while this rank waits in next_epoch; call it again on the next server"
            )
        epoch = request.epoch if request.HasField("epoch") else session.epoch
        missing = session.missing_ranks(epoch)
        if missing is None:  # finished in the instant after the wait ended
            return
        raise DeadlineExceededError(
            f"next_epoch for epoch {epoch} of session {session.name!r}: rank {request.rank} waited {wait:.1f} s "
            f"and ranks {missing} have not called it ({session.world_size - len(missing)} of "
            f"world_size={session.world_size} have); this rank's call stays recorded"
        )

    def _answer_memory(self, session: Session, copies: int, what: str) -> Reservation:
        """A reservation for an answer that copies the session's matrices ``copies`` times (copy, encode, send),
        in host memory and with S in float32 wherever and however the session holds it."""
        return self._work_memory.reserve(
            copies * session.answer_bytes, f"{what} of session {session.name!r}", wait=self._admission_wait
        )

    def _get_state(self, owner: str, request: pb.GetStateRequest) -> pb.SessionState:
        check_session_name(request.session)
        if request.HasField("epoch"):
            raise InvalidArgumentError("epoch: GetState returns the current state; GetSoftLabels reads past epochs")
        session = self._store.get(owner, request.session)
        with self._answer_memory(session, 3, "GetState"):
            return self._state_message(session)

    def _state_message(self, session: Session) -> pb.SessionState:
        state = session.snapshot()
        return pb.SessionState(
            epoch=state.epoch,
            # The wire carries the reference layout: column k is the soft label of class k.
            supervise=_codec.encode(state.soft_labels.T),
            accumulator=_codec.encode(state.accumulator.T),
            counts=_codec.encode(state.counts),
            samples_this_epoch=state.samples_this_epoch,
        )

    async def GetState(self, request: pb.GetStateRequest, context: aio.ServicerContext) -> pb.SessionState:
        return await self._run(self._get_state, self._identify(context), request)

    def _load_state(self, owner: str, request: pb.LoadStateRequest) -> pb.Session:
        check_session_name(request.session)
        session = self._store.get(owner, request.session)
        message = request.state
        tensors: dict[str, torch.Tensor] = {}
        for field in ("supervise", "accumulator", "counts"):
            if not message.HasField(field):
                raise InvalidArgumentError(f"state.{field}: required")
            try:
                tensors[field] = _codec.decode(getattr(message, field), f"state.{field}")
            except _codec.CodecError as error:
                raise InvalidArgumentError(str(error)) from None
        soft, acc = tensors["supervise"], tensors["accumulator"]
        session.restore(
            StateSnapshot(
                epoch=message.epoch,
                soft_labels=soft.T if soft.dim() == 2 else soft,
                accumulator=acc.T if acc.dim() == 2 else acc,
                counts=tensors["counts"],
                samples_this_epoch=message.samples_this_epoch,
            )
        )
        return session_message(session.view(), owner)

    async def LoadState(self, request: pb.LoadStateRequest, context: aio.ServicerContext) -> pb.Session:
        return await self._run(self._load_state, self._identify(context), request)
