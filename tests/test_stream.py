"""LossStream's own guarantees, against a scripted call: the caller waits on the response iterator
itself and a watchdog thread enforces the per-request timeout by cancelling the call."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

import lossd
from lossd import _stream, _wire
from lossd._stream import LossStream
from lossd.v1 import loss_service_pb2 as pb

Answer = Callable[[pb.LossRequest, "_ScriptedCall"], pb.LossResponse]


class _ScriptedCall(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """A LossStream call that answers each request with ``answer(request, call)``, which may raise."""

    def __init__(self, requests: Iterator[pb.LossRequest], answer: Answer) -> None:
        self._requests = requests
        self._answer = answer
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self.cancelled = threading.Event()

    def __iter__(self) -> _ScriptedCall:
        return self

    def __next__(self) -> _wire.ReceivedResponse:
        request = pb.LossRequest.FromString(next(self._requests))
        return _wire.decode_loss_response(self._answer(request, self).SerializeToString())

    def end(self, code: grpc.StatusCode, details: str) -> _ScriptedCall:
        self._code, self._details = code, details
        return self

    def cancel(self) -> bool:
        if self._code is None:
            self.end(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")
        self.cancelled.set()
        return True

    def done(self) -> bool:
        return self._code is not None

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details


class _Stub:
    """Opens the scripted call, as the client's LossStream multicallable would."""

    def __init__(self, answer: Answer) -> None:
        self._answer = answer
        self.call: _ScriptedCall | None = None

    def __call__(self, requests: Iterator[bytes]) -> _ScriptedCall:
        self.call = _ScriptedCall(requests, self._answer)  # type: ignore[arg-type]
        return self.call


def _call(stream: LossStream, request: pb.LossRequest) -> pb.LossResponse:
    return stream.call(request.request_id, request.SerializeToString()).message


def _echo(request: pb.LossRequest, call: _ScriptedCall) -> pb.LossResponse:
    return pb.LossResponse(request_id=request.request_id, n_used=1)


def _stream_of(answer: Answer, timeout: float | None = 5.0) -> tuple[LossStream, _ScriptedCall]:
    stub = _Stub(answer)
    stream = LossStream(stub, timeout)
    assert stub.call is not None
    return stream, stub.call


def _watchdogs() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name == "lossd-stream-watchdog"}


def _new_watchdog(answer: Answer) -> tuple[LossStream, _ScriptedCall, threading.Thread]:
    before = _watchdogs()
    stream, call = _stream_of(answer)
    (watchdog,) = _watchdogs() - before
    return stream, call, watchdog


def test_answers_are_returned_in_step_and_the_stream_stays_open() -> None:
    stream, _ = _stream_of(_echo)
    for n in range(3):
        assert _call(stream, pb.LossRequest(request_id=f"r{n}")).request_id == f"r{n}"
    assert stream.usable
    stream.close()


def test_an_in_band_error_raises_and_leaves_the_stream_open() -> None:
    def refuse(request: pb.LossRequest, call: _ScriptedCall) -> pb.LossResponse:
        code = grpc.StatusCode.NOT_FOUND.value[0]
        return pb.LossResponse(request_id=request.request_id, error=pb.Error(code=code, message="no such session"))

    stream, _ = _stream_of(refuse)
    with pytest.raises(lossd.NotFoundError, match="no such session"):
        _call(stream, pb.LossRequest(request_id="r1"))
    assert stream.usable
    stream.close()


def test_no_answer_within_the_timeout_is_a_deadline_error_that_breaks_the_stream() -> None:
    def never(request: pb.LossRequest, call: _ScriptedCall) -> pb.LossResponse:
        call.cancelled.wait(10)  # as gRPC's iterator: it returns once the call is cancelled
        raise call

    stream, call = _stream_of(never, timeout=0.2)
    started = time.monotonic()
    with pytest.raises(lossd.DeadlineExceededError, match=r"within 0\.2 s"):
        _call(stream, pb.LossRequest(request_id="r1"))
    assert 0.2 <= time.monotonic() - started < 2
    assert call.cancelled.is_set() and not stream.usable
    with pytest.raises(lossd.UnavailableError):
        _call(stream, pb.LossRequest(request_id="r2"))


def test_an_answer_that_comes_as_the_deadline_passes_is_kept_but_not_the_stream() -> None:
    def at_the_deadline(request: pb.LossRequest, call: _ScriptedCall) -> pb.LossResponse:
        call.cancelled.wait(10)
        return pb.LossResponse(request_id=request.request_id)

    stream, _ = _stream_of(at_the_deadline, timeout=0.1)
    assert _call(stream, pb.LossRequest(request_id="r1")).request_id == "r1"
    assert not stream.usable


def test_a_slow_answer_within_the_timeout_is_not_cancelled() -> None:
    def slow(request: pb.LossRequest, call: _ScriptedCall) -> pb.LossResponse:
        time.sleep(0.15)
        return _echo(request, call)

    stream, call = _stream_of(slow, timeout=0.5)
    for n in range(4):  # 0.6 s in all: the deadline is per request, not per stream
        _call(stream, pb.LossRequest(request_id=f"r{n}"))
    assert stream.usable and not call.cancelled.is_set()
    stream.close()


def test_an_interrupt_while_waiting_closes_the_stream() -> None:
    def interrupted(request: pb.LossRequest, call: _ScriptedCall) -> pb.LossResponse:
        raise KeyboardInterrupt

    stream, call = _stream_of(interrupted)
    with pytest.raises(KeyboardInterrupt):
        _call(stream, pb.LossRequest(request_id="r1"))
    assert call.cancelled.is_set() and not stream.usable


def test_a_call_the_server_fails_raises_its_status_and_breaks_the_stream() -> None:
    def unavailable(request: pb.LossRequest, call: _ScriptedCall) -> pb.LossResponse:
        raise call.end(grpc.StatusCode.UNAVAILABLE, "server shutting down")

    stream, call = _stream_of(unavailable)
    with pytest.raises(lossd.UnavailableError, match="server shutting down") as raised:
        _call(stream, pb.LossRequest(request_id="r1"))
    assert raised.value.__cause__ is call
    assert not stream.usable


def test_a_call_the_server_closed_is_unavailable() -> None:
    def closed(request: pb.LossRequest, call: _ScriptedCall) -> pb.LossResponse:
        call.end(grpc.StatusCode.OK, "")
        raise StopIteration

    stream, _ = _stream_of(closed)
    with pytest.raises(lossd.UnavailableError, match="closed the loss stream"):
        _call(stream, pb.LossRequest(request_id="r1"))
    assert not stream.usable


def test_an_answer_out_of_step_breaks_the_stream() -> None:
    def wrong(request: pb.LossRequest, call: _ScriptedCall) -> pb.LossResponse:
        return pb.LossResponse(request_id="someone-else")

    stream, call = _stream_of(wrong)
    with pytest.raises(lossd.InternalError, match="out of step"):
        _call(stream, pb.LossRequest(request_id="r1"))
    assert call.cancelled.is_set() and not stream.usable


def test_the_watchdog_ends_with_the_stream_and_with_a_call_that_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    stream, _, watchdog = _new_watchdog(_echo)
    stream.close()
    watchdog.join(5)
    assert not watchdog.is_alive()

    monkeypatch.setattr(_stream, "WATCHDOG_WAKE_SECONDS", 0.05)
    stream, call, watchdog = _new_watchdog(_echo)
    call.end(grpc.StatusCode.UNAVAILABLE, "server restarted")  # while idle, without close()
    watchdog.join(5)
    assert not watchdog.is_alive()
    with pytest.raises(lossd.UnavailableError, match="server restarted"):
        _call(stream, pb.LossRequest(request_id="r1"))


def test_no_timeout_needs_no_watchdog() -> None:
    before = _watchdogs()
    stream, _ = _stream_of(_echo, timeout=None)
    assert not _watchdogs() - before
    assert _call(stream, pb.LossRequest(request_id="r1")).request_id == "r1"
    stream.close()
