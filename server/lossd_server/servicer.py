"""LossService: decodes requests, calls the store and sessions, encodes responses.

Every method body runs on a worker thread, so the event loop stays free for
health checks and other streams while the math runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from grpc import aio

from lossd import _codec
from lossd._exceptions import InvalidArgumentError, UnavailableError
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc
from lossd_server.batch import decode_batch
from lossd_server.errors import status_of
from lossd_server.session import Session, StateSnapshot
from lossd_server.spec import canonical_spec
from lossd_server.store import SessionStore

T = TypeVar("T")


def session_message(session: Session) -> pb.Session:
    return pb.Session(
        name=session.name,
        spec=session.spec.to_proto(),
        epoch=session.epoch,
        samples_this_epoch=session.samples_this_epoch,
        correct_this_epoch=session.correct_this_epoch,
        created_at=session.created_at,
        updated_at=session.updated_at,
        state_bytes=session.state_bytes,
    )


class LossServicer(pb_grpc.LossServiceServicer):
    def __init__(self, store: SessionStore, executor: ThreadPoolExecutor) -> None:
        self._store = store
        self._executor = executor
        # Touched only on the event loop, so no lock is needed.
        self._draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def _run(self, function: Callable[..., T], *args: object) -> T:
        if self._draining:
            # Refused before it runs, so nothing is applied: the caller can retry on the next server.
            raise UnavailableError("the server is shutting down")
        self._in_flight += 1
        self._idle.clear()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    @property
    def draining(self) -> bool:
        return self._draining

    async def drain(self, timeout: float) -> bool:
        """Refuse new work and wait up to ``timeout`` for the work in flight; False if some is left."""
        self._draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # Session management -------------------------------------------------

    def _create(self, request: pb.CreateSessionRequest) -> pb.CreateSessionResponse:
        session, created = self._store.create(request.name, canonical_spec(request.spec))
        return pb.CreateSessionResponse(session=session_message(session), created=created)

    async def CreateSession(
        self, request: pb.CreateSessionRequest, context: aio.ServicerContext
    ) -> pb.CreateSessionResponse:
        return await self._run(self._create, request)

    async def GetSession(self, request: pb.GetSessionRequest, context: aio.ServicerContext) -> pb.Session:
        return await self._run(lambda: session_message(self._store.get(request.name)))

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: aio.ServicerContext
    ) -> pb.ListSessionsResponse:
        return await self._run(
            lambda: pb.ListSessionsResponse(sessions=[session_message(s) for s in self._store.list()])
        )

    async def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: aio.ServicerContext
    ) -> pb.DeleteSessionResponse:
        await self._run(self._store.delete, request.name)
        return pb.DeleteSessionResponse()

    # Losses ---------------------------------------------------------------

    def _compute(self, request: pb.LossRequest) -> pb.LossResponse:
        session = self._store.get(request.session)
        batch = decode_batch(request, session.spec)
        result = session.compute(batch, training=request.training, need_grad=request.need_grad)
        output = result.output
        response = pb.LossResponse(
            request_id=request.request_id,
            loss=_codec.encode(output.loss),
            n_used=output.n_used,
            n_correct=output.n_correct,
            epoch=result.epoch,
        )
        if output.grad is not None:
            grad, response.grad_exponent = _codec.encode_gradient(output.grad, batch.logits.dtype)
            response.grad.CopyFrom(grad)
        return response

    async def ComputeLoss(self, request: pb.LossRequest, context: aio.ServicerContext) -> pb.LossResponse:
        return await self._run(self._compute, request)

    async def LossStream(
        self, request_iterator: AsyncIterator[pb.LossRequest], context: aio.ServicerContext
    ) -> AsyncIterator[pb.LossResponse]:
        async for request in request_iterator:
            try:
                response = await self._run(self._compute, request)
            except Exception as error:
                code, message = status_of(error, "/lossd.v1.LossService/LossStream")
                response = pb.LossResponse(
                    request_id=request.request_id, error=pb.Error(code=code.value[0], message=message)
                )
            yield response

    # Epochs and state ---------------------------------------------------------

    def _next_epoch(self, request: pb.NextEpochRequest) -> pb.Session:
        session = self._store.get(request.session)
        session.next_epoch(request.epoch if request.HasField("epoch") else None)
        return session_message(session)

    async def NextEpoch(self, request: pb.NextEpochRequest, context: aio.ServicerContext) -> pb.Session:
        return await self._run(self._next_epoch, request)

    def _get_state(self, request: pb.GetStateRequest) -> pb.SessionState:
        state = self._store.get(request.session).snapshot()
        return pb.SessionState(
            epoch=state.epoch,
            # The wire carries the reference layout: column k is the soft label of class k.
            supervise=_codec.encode(state.soft_labels.T),
            accumulator=_codec.encode(state.accumulator.T),
            counts=_codec.encode(state.counts),
            samples_this_epoch=state.samples_this_epoch,
        )

    async def GetState(self, request: pb.GetStateRequest, context: aio.ServicerContext) -> pb.SessionState:
        return await self._run(self._get_state, request)

    def _load_state(self, request: pb.LoadStateRequest) -> pb.Session:
        session = self._store.get(request.session)
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
        return session_message(session)

    async def LoadState(self, request: pb.LoadStateRequest, context: aio.ServicerContext) -> pb.Session:
        return await self._run(self._load_state, request)
