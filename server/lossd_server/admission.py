"""Admission control: a call reserves the memory it will hold before it holds it.

gRPC receives a whole message before a handler sees it, so refusing inside the
handler comes too late: N concurrent large requests would already be resident.
Unary calls are therefore admitted when they start. The interceptor serves each
unary method as a client-streaming one (the wire format is the same), reserves
the largest admissible message against ``--request-memory-bytes`` *before*
reading it, and, once the message is in, resizes the reservation to what that
call needs. With ``grpc.http2.bdp_probe`` off, a call that has not been read yet
holds no more than gRPC's 64 KiB stream window.

A LossStream stays open between a trainer's steps, so a read waiting on it
cannot hold a reservation (idle trainers would starve busy ones, or deadlock a
collective). Its messages are admitted one by one once read, before any math
(LossServicer.LossStream): only the received bytes themselves, at most one
message per stream, are outside the budget.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from lossd import _wire
from lossd._exceptions import InvalidArgumentError, LossdError
from lossd.v1 import loss_service_pb2 as pb
from lossd_server.answer import serialize_loss_response
from lossd_server.errors import capped
from lossd_server.memory import MemoryAccount, Reservation, reserve_async

# Per element of the logits, at the peak of a loss request: the float32 (float64 for float64) math holds
# the upcast logits, exponentials, probabilities and gradient, and the answer holds the gradient twice
# more in the wire dtype (the tensor, then its bytes); the message itself is held twice (parsed, decoded).
_MATH_COPIES = 4
_WIRE_COPIES = 3
_MESSAGE_COPIES = 2
_ITEMSIZE: dict[int, int] = {pb.DTYPE_FLOAT64: 8, pb.DTYPE_FLOAT32: 4, pb.DTYPE_FLOAT16: 2, pb.DTYPE_BFLOAT16: 2}
# Every other request: the message, its decoded tensors, and the copies the server keeps of them.
_OTHER_COPIES = 5
_OVERHEAD = 64 << 10  # a call's fixed cost: protobuf objects, Python frames, small tensors
_LOSS_METHODS = frozenset({"LossStream", "ComputeLoss"})
# A unary call's message comes with the call; one that does not, within this, gives back its reservation.
READ_TIMEOUT_SECONDS = 30.0


def loss_footprint(request: pb.LossRequest | _wire.ReceivedRequest) -> int:
    """The bytes a LossRequest holds at its peak, from its size and dtype (never from its claimed shape alone)."""
    if isinstance(request, _wire.ReceivedRequest):  # the payloads are views of the received message
        payloads = request.logits_data.nbytes + request.labels_data.nbytes
        message = request.message
        return math_footprint(message.ByteSize() + payloads, request.logits_data.nbytes, message.logits.dtype)
    # ByteSize, not len(data): reading a bytes field copies it out of protobuf's arena.
    return math_footprint(request.ByteSize(), request.logits.ByteSize(), request.logits.dtype)


def math_footprint(message_bytes: int, logits_bytes: int, dtype: int) -> int:
    """A loss request's peak: ``message_bytes`` held twice (parsed, decoded), and per element of the
    ``logits_bytes`` of wire ``dtype`` (a lossd.v1 DType number) its math and its answer.
    The local transport's tensors are in the client's segment: it passes message_bytes=0."""
    itemsize = _ITEMSIZE.get(dtype, 4)
    elements = logits_bytes // itemsize
    compute = 8 if itemsize == 8 else 4
    return _OVERHEAD + _MESSAGE_COPIES * message_bytes + elements * (_MATH_COPIES * compute + _WIRE_COPIES * itemsize)


def footprint(request: Any) -> int:
    if isinstance(request, pb.LossRequest | _wire.ReceivedRequest):
        return loss_footprint(request)
    return _OVERHEAD + _OTHER_COPIES * int(request.ByteSize())


def loss_footprint_factor() -> float:
    """What a loss request of W bytes holds at most, in W: float16 and bfloat16 logits, whose math runs
    in float32 (13x; float32 and float64 hold 9x). The settings size max_message_bytes from it."""
    return max(_MESSAGE_COPIES + (_MATH_COPIES * max(4, size) + _WIRE_COPIES * size) / size for size in (2, 4, 8))


class AdmissionInterceptor(aio.ServerInterceptor):  # type: ignore[misc]
    """Reserves each LossService unary call's memory before its request is read. Must come first."""

    def __init__(self, account: MemoryAccount, max_message_bytes: int, prefix: str, wait: float) -> None:
        self._account = account
        self._max_message = max_message_bytes
        self._prefix = prefix
        self._wait = wait

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not method.startswith(self._prefix):
            return handler
        deserializer, serializer = handler.request_deserializer, handler.response_serializer
        if method.rsplit("/", 1)[-1] in _LOSS_METHODS:  # tensors in and out with one copy (lossd._wire)
            deserializer, serializer = _wire.decode_loss_request, serialize_loss_response
        deserializer = _tolerant(deserializer)
        if handler.unary_unary is None:  # LossStream: admitted message by message by the servicer
            return handler._replace(request_deserializer=deserializer, response_serializer=serializer)
        return grpc.stream_unary_rpc_method_handler(
            self._admitted(handler.unary_unary, method),
            request_deserializer=deserializer,
            response_serializer=serializer,
        )

    def _admitted(self, behavior: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
        account, limit, wait = self._account, self._max_message, self._wait
        rpc = method.rsplit("/", 1)[-1]

        async def admitted(request_iterator: Any, context: aio.ServicerContext) -> Any:
            reservation: Reservation | None = None
            try:
                try:
                    reservation = await reserve_async(
                        account, limit + _OVERHEAD, f"a {rpc} call", wait=_wait_for(context, wait)
                    )
                    request = await asyncio.wait_for(_only_message(request_iterator, rpc), READ_TIMEOUT_SECONDS)
                    needed = footprint(request)
                    if needed <= reservation.nbytes:
                        reservation.shrink(needed)
                    else:
                        # Released before waiting for more, so calls that each fit never starve one another.
                        reservation.release()
                        reservation = await reserve_async(account, needed, f"a {rpc} call", wait=wait)
                except LossdError as error:
                    await context.abort(error.code, capped(error.message))
                except TimeoutError:
                    await context.abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"{rpc}: the request message did not arrive within {READ_TIMEOUT_SECONDS:g} s of the call",
                    )
                return await behavior(request, context)
            finally:
                if reservation is not None:
                    _release_when_done(context, reservation)

        return admitted


class Undecodable:
    """What a request that is not a valid message parses to, so the handler answers INVALID_ARGUMENT
    (gRPC would answer UNKNOWN on a unary call and end a stream)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def invalid(self, rpc: str) -> InvalidArgumentError:
        return InvalidArgumentError(f"{rpc}: the request is not a valid message: {type(self.error).__name__}")


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as error:  # protobuf's DecodeError, or anything a parser raises on garbage
            return Undecodable(error)

    return deserialize


async def _only_message(request_iterator: Any, rpc: str) -> Any:
    """The one request of a unary call, read to the client's half-close (a generator left open would keep
    its message alive); a second message is refused."""
    request = None
    async for message in request_iterator:
        if request is not None:
            raise InvalidArgumentError(f"{rpc}: a unary method takes one request message")
        request = message
    if request is None:
        raise InvalidArgumentError(f"{rpc}: no request message")
    if isinstance(request, Undecodable):
        raise request.invalid(rpc)
    return request


def _release_when_done(context: aio.ServicerContext, reservation: Reservation) -> None:
    """Released once the call is over, so the answer still being serialised and sent stays counted."""
    try:
        context.add_done_callback(lambda _: reservation.release())
    except Exception:  # a context that takes no callbacks: release now rather than never
        reservation.release()


def _wait_for(context: aio.ServicerContext, wait: float) -> float:
    """The admission wait, cut short by the call's own deadline."""
    remaining = context.time_remaining()
    return wait if remaining is None else max(0.0, min(wait, remaining - 0.05))


__all__ = ["AdmissionInterceptor", "footprint", "loss_footprint", "loss_footprint_factor", "math_footprint"]
