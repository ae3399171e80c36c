"""lossd's exceptions, one per gRPC status code, shared by the server and the client.

The server raises them and one place (``lossd_server.errors``) turns them into
statuses; the client turns statuses back into them with :func:`from_rpc_error`::

    LossdError
    ├── InvalidArgumentError        INVALID_ARGUMENT
    ├── NotFoundError               NOT_FOUND
    ├── AlreadyExistsError          ALREADY_EXISTS
    ├── FailedPreconditionError     FAILED_PRECONDITION
    ├── AbortedError                ABORTED
    ├── ResourceExhaustedError      RESOURCE_EXHAUSTED
    ├── UnauthenticatedError        UNAUTHENTICATED
    ├── PermissionDeniedError       PERMISSION_DENIED
    ├── DeadlineExceededError       DEADLINE_EXCEEDED
    ├── UnavailableError            UNAVAILABLE
    ├── CancelledError              CANCELLED
    ├── UnimplementedError          UNIMPLEMENTED
    └── InternalError               INTERNAL, UNKNOWN and anything else
"""

from __future__ import annotations

import grpc


class LossdError(Exception):
    """Base class. ``code`` is the gRPC status the error travels as."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgumentError(LossdError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(LossdError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(LossdError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(LossdError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(LossdError):
    code = grpc.StatusCode.ABORTED


class ResourceExhaustedError(LossdError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnauthenticatedError(LossdError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(LossdError):
    code = grpc.StatusCode.PERMISSION_DENIED


class DeadlineExceededError(LossdError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnavailableError(LossdError):
    code = grpc.StatusCode.UNAVAILABLE


class CancelledError(LossdError):
    code = grpc.StatusCode.CANCELLED


class UnimplementedError(LossdError):
    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(LossdError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[LossdError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        AbortedError,
        ResourceExhaustedError,
        UnauthenticatedError,
        PermissionDeniedError,
        DeadlineExceededError,
        UnavailableError,
        CancelledError,
        UnimplementedError,
        InternalError,
    )
}
_BY_VALUE: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def status_code(value: int) -> grpc.StatusCode:
    """The StatusCode of a numeric code, as carried in a stream response's ``error``."""
    return _BY_VALUE.get(value, grpc.StatusCode.UNKNOWN)


def from_status(code: grpc.StatusCode, message: str) -> LossdError:
    error = _BY_CODE.get(code, InternalError)(message)
    error.code = code  # keep UNKNOWN, DATA_LOSS, ... visible on the InternalError fallback
    return error


def from_rpc_error(error: grpc.RpcError) -> LossdError:
    """The lossd exception for a failed call; raise it ``from`` the RpcError."""
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    return from_status(code, details or code.name)
