"""The client side of one bidirectional LossStream call: one request in flight, answered in order."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import grpc
import torch

from lossd import _wire
from lossd._exceptions import (
    DeadlineExceededError,
    InternalError,
    LossdError,
    UnavailableError,
    from_rpc_error,
    from_status,
    status_code,
)
from lossd._types import LossResult
from lossd.v1 import loss_service_pb2 as pb

_END = object()
# The longest the watchdog sleeps: how soon it ends after the server ended an idle call.
WATCHDOG_WAKE_SECONDS = 1.0


class LossStream:
    """A request failed by the server is reported in its response and leaves the stream open.

    Anything else (the connection drops, the server stops, no answer within
    ``timeout``, an interrupt while waiting) cancels the call and marks the
    stream broken, so a response can never be paired with the wrong request;
    the client then opens a new stream for the next request.
    """

    def __init__(self, open_call: Any, timeout: float | None) -> None:
        """``open_call``: the LossStream multicallable, taking wire bytes and answering ``_wire.ReceivedResponse``."""
        self._timeout = timeout
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._call: Any = open_call(iter(self._requests.get, _END))
        self._lock = threading.Lock()
        self._broken = False
        self._closed = threading.Event()
        # The caller waits on gRPC's response iterator itself: a reader thread handing responses over
        # would cost a thread wake-up per request. That iterator cannot wait with a timeout, so a
        # watchdog thread cancels the call once the request in flight is past its deadline. It reads
        # _deadline, so a request costs no signalling; _deadline_lock keeps "answered" and "expired"
        # exclusive, so a request answered in time is never reported as timed out.
        self._deadline: float | None = None
        self._expired = False
        self._deadline_lock = threading.Lock()
        if timeout is not None:
            threading.Thread(target=self._watch, args=(timeout,), name="lossd-stream-watchdog", daemon=True).start()

    @property
    def usable(self) -> bool:
        """False once broken, or once the call ended while idle (say, the server restarted)."""
        return not self._broken and not self._call.done()

    def call_tensors(self, request: pb.LossRequest, logits: torch.Tensor, labels: torch.Tensor) -> LossResult:
        """``request`` (without tensors) sent with ``logits`` and ``labels``, each copied once (lossd._wire)."""
        data = _wire.encode_loss_request(request, logits, labels)
        return LossResult.from_received(self.call(request.request_id, data))

    def call(self, request_id: str, data: bytes) -> _wire.ReceivedResponse:
        """One request's wire bytes, and its response; an in-band error is raised as its status."""
        with self._lock:
            item = self._exchange(request_id, data)
        if item.message.HasField("error"):
            raise from_status(status_code(item.message.error.code), item.message.error.message)
        return item

    def _exchange(self, request_id: str, data: bytes) -> _wire.ReceivedResponse:
        """Send one request and wait for its response; the caller holds the lock."""
        if not self.usable:
            raise self._why_closed()
        if self._timeout is not None:
            self._deadline = time.monotonic() + self._timeout
        try:
            self._requests.put(data)
            item: _wire.ReceivedResponse = next(self._call)
        except grpc.RpcError as error:
            if self._abandon():
                raise DeadlineExceededError(f"no response on the loss stream within {self._timeout} s") from None
            raise from_rpc_error(error) from error
        except StopIteration:
            self._abandon()
            raise UnavailableError("the server closed the loss stream") from None
        except BaseException:  # KeyboardInterrupt while waiting, say
            self._abandon()
            raise
        if self._answered():
            self.close()  # the watchdog cancelled the call as this answer came in: keep the answer, not the stream
        if item.message.request_id != request_id:
            self.close()
            raise InternalError(f"loss stream out of step: sent {request_id!r}, got {item.message.request_id!r}")
        return item

    def _abandon(self) -> bool:
        """Close the stream after a failed wait (an answer would now arrive out of step):
        whether the watchdog had cancelled the call for its deadline."""
        expired = self._answered()
        self.close()
        return expired

    def _answered(self) -> bool:
        """Clear the deadline of the request in flight: whether the watchdog had already expired it."""
        with self._deadline_lock:
            self._deadline = None
            return self._expired

    def _watch(self, timeout: float) -> None:
        """Cancel the call once the request in flight is past its deadline; end with the call."""
        longest = min(timeout, WATCHDOG_WAKE_SECONDS)
        wait = longest
        while not self._closed.wait(wait):
            if self._call.done() or self._expire_if_late():
                return
            deadline = self._deadline  # sleep until it, so a late request is cancelled on time
            wait = longest if deadline is None else min(longest, max(deadline - time.monotonic(), 0.0))

    def _expire_if_late(self) -> bool:
        """Cancel the call if the request in flight is past its deadline; whether it was."""
        with self._deadline_lock:
            deadline = self._deadline
            if deadline is None or time.monotonic() < deadline:
                return False
            self._expired = True
        self.close()
        return True

    def _why_closed(self) -> LossdError:
        """The status the server ended the call with, rather than a generic error that hides it."""
        if self._broken or not self._call.done():
            return UnavailableError("the loss stream is closed")
        if self._call.code() == grpc.StatusCode.OK:
            return UnavailableError("the server closed the loss stream")
        return from_rpc_error(self._call)

    def close(self) -> None:
        """Cancel the call and end the watchdog."""
        if not self._broken:
            self._broken = True
            self._closed.set()
            self._requests.put(_END)
            self._call.cancel()
