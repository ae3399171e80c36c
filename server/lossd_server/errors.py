"""The one place where exceptions become gRPC statuses."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from lossd._exceptions import LossdError

log = logging.getLogger("lossd_server")


# Status messages travel in HTTP/2 trailers; past gRPC's metadata limit (8 KiB soft) the client would
# see RESOURCE_EXHAUSTED instead of the status. Client strings are quoted short (identifiers.quoted);
# this caps whatever else a message holds.
MAX_STATUS_MESSAGE = 4096


def capped(message: str) -> str:
    if len(message) <= MAX_STATUS_MESSAGE:
        return message
    return message[: MAX_STATUS_MESSAGE - 40] + f"... ({len(message)} characters in all)"


def status_of(error: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    """Domain errors keep their code; anything else is INTERNAL and logged with its traceback."""
    if isinstance(error, LossdError):
        return error.code, capped(error.message)
    log.error("unexpected error in %s", method, exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(error).__name__}; see the server log"


UnaryBehavior = Callable[..., Awaitable[Any]]
StreamBehavior = Callable[..., AsyncIterator[Any]]


def wrap_handler(
    handler: grpc.RpcMethodHandler,
    unary: Callable[[UnaryBehavior], UnaryBehavior],
    stream: Callable[[StreamBehavior], StreamBehavior],
) -> grpc.RpcMethodHandler:
    """The handler with its unary-unary or stream-stream behaviour wrapped (the only kinds lossd serves)."""
    if handler.unary_unary is not None:
        return handler._replace(unary_unary=unary(handler.unary_unary))
    if handler.stream_stream is not None:
        return handler._replace(stream_stream=stream(handler.stream_stream))
    return handler


class ErrorInterceptor(aio.ServerInterceptor):  # type: ignore[misc]
    """Aborts a call with the status of the exception its handler raised."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return handler
        return wrap_handler(
            handler, lambda behavior: _wrap_unary(behavior, method), lambda behavior: _wrap_stream(behavior, method)
        )


async def _abort(context: aio.ServicerContext, error: Exception, method: str) -> None:
    code, message = status_of(error, method)
    await context.abort(code, message)


def _wrap_unary(behavior: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
    async def wrapper(request: Any, context: aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except (aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as error:
            await _abort(context, error, method)

    return wrapper


def _wrap_stream(behavior: Callable[..., AsyncIterator[Any]], method: str) -> Callable[..., AsyncIterator[Any]]:
    async def wrapper(request_iterator: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for response in behavior(request_iterator, context):
                yield response
        except (aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as error:
            await _abort(context, error, method)

    return wrapper
