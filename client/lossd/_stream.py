"""The client side of one bidirectional LossStream call: one request in flight, answered in order."""

from __future__ import annotations

import queue
import threading
from typing import Any

import grpc

from lossd._exceptions import (
    DeadlineExceededError,
    InternalError,
    LossdError,
    UnavailableError,
    from_rpc_error,
    from_status,
    status_code,
)
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc

_END = object()


class LossStream:
    """A request failed by the server is reported in its response and leaves the stream open.

    Anything else (the connection drops, the server stops, no answer within
    ``timeout``, an interrupt while waiting) cancels the call and marks the
    stream broken, so a response can never be paired with the wrong request;
    the client then opens a new stream for the next request.
    """

    def __init__(self, stub: pb_grpc.LossServiceStub, timeout: float | None) -> None:
        self._timeout = timeout
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._responses: queue.SimpleQueue[pb.LossResponse | LossdError] = queue.SimpleQueue()
        self._call: Any = stub.LossStream(iter(self._requests.get, _END))
        self._lock = threading.Lock()
        self._broken = False
        # gRPC's response iterator cannot wait with a timeout, so a reader thread
        # hands responses over through a queue that can.
        threading.Thread(target=self._read, name="lossd-stream-reader", daemon=True).start()

    @property
    def usable(self) -> bool:
        """False once broken, or once the call ended while idle (say, the server restarted)."""
        return not self._broken and not self._call.done()

    def _read(self) -> None:
        try:
            for response in self._call:
                self._responses.put(response)
            self._responses.put(UnavailableError("the server closed the loss stream"))
        except grpc.RpcError as error:
            failure = from_rpc_error(error)
            failure.__cause__ = error
            self._responses.put(failure)
        except Exception as error:
            self._responses.put(InternalError(f"loss stream reader failed: {type(error).__name__}: {error}"))

    def call(self, request: pb.LossRequest) -> pb.LossResponse:
        with self._lock:
            if not self.usable:
                raise self._why_closed()
            try:
                self._requests.put(request)
                item = self._responses.get(timeout=self._timeout)
            except queue.Empty:
                self.close()
                raise DeadlineExceededError(f"no response on the loss stream within {self._timeout} s") from None
            except BaseException:  # KeyboardInterrupt while waiting: the answer would arrive out of step
                self.close()
                raise
            if isinstance(item, LossdError):
                self.close()
                raise item
            if item.request_id != request.request_id:
                self.close()
                raise InternalError(f"loss stream out of step: sent {request.request_id!r}, got {item.request_id!r}")
        if item.HasField("error"):
            raise from_status(status_code(item.error.code), item.error.message)
        return item

    def _why_closed(self) -> LossdError:
        """The error the reader saw when the call ended, rather than a generic one that hides it."""
        try:
            item = self._responses.get_nowait()
        except queue.Empty:
            return UnavailableError("the loss stream is closed")
        if isinstance(item, LossdError):
            return item
        return UnavailableError("the loss stream is closed")

    def close(self) -> None:
        """Cancel the call; the reader thread ends with it."""
        if not self._broken:
            self._broken = True
            self._requests.put(_END)
            self._call.cancel()
