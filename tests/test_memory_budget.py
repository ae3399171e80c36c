"""Memory accounting, measured from outside: a `lossd serve` child process and its RSS in /proc.

Two findings this proves fixed:

- class weights were kept as Python floats (~850 MiB of RSS for C = 2^24); they are now one
  float64 tensor (8 bytes a class) counted against ``--matrix-memory-bytes``;
- requests had no admission control (two 500 MiB requests OOM-killed the server); calls now
  reserve their footprint against ``--request-memory-bytes`` and past it get RESOURCE_EXHAUSTED.

Figures are printed (run with ``-s``). RSS is read from /proc/PID/status: VmRSS, and VmHWM for
the peak, reset through /proc/PID/clear_refs before each measured step where the kernel allows.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lossd import _codec
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc
from lossd_server.admission import footprint, loss_footprint
from lossd_server.app import ADMISSION_WAIT_SECONDS, request_memory
from lossd_server.config import Settings

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")

MiB = 1 << 20
START_TIMEOUT = 60.0
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]

# The weights server admits one 128 MiB CreateSession: a message of 2^24 float64 weights fits max_message_bytes,
# and request_memory_bytes both passes the start-up check (13 x max_message_bytes) and admits the call's footprint.
WEIGHT_CLASSES = 2**24
WEIGHT_BYTES = 8 * WEIGHT_CLASSES
WEIGHTS_FLAGS = ("--max-message-bytes", str(160 * MiB), "--request-memory-bytes", str(2304 * MiB))
# glibc keeps freed heap (and tune_malloc keeps up to 512 MiB of it on purpose), so RSS says as much about
# malloc as about what the server holds: with the default tuning the same burst peaked anywhere from 146 to
# 338 MiB. Both servers here run untuned, every allocation of 64 KiB or more mmapped and unmapped when freed,
# so RSS follows the memory in use: 128.0-128.3 MiB of growth a weights session, bursts within ~15 MiB run to run.
EXACT_MALLOC_FLAGS = ("--tune-malloc", "false")
EXACT_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}

# The admission server: 320 MiB for calls in flight, 24 MiB messages (13 x 24 MiB = 312 MiB fits the budget).
BUDGET = 320 * MiB
MAX_MESSAGE = 24 * MiB
BURST_FLAGS = ("--request-memory-bytes", str(BUDGET), "--max-message-bytes", str(MAX_MESSAGE))
SMOOTHING = 0.1
N, C = 5000, 1000  # ~19 MiB of float32 logits, a ~172 MiB footprint: one such call fits the budget at a time
THREADS = 12  # 12 x 24 MiB of first reservations is more than the budget: some calls must wait
CALL_TIMEOUT = 30.0
SEQUENTIAL = 10

CLIENT_OPTIONS = [("grpc.max_send_message_length", 256 * MiB), ("grpc.max_receive_message_length", 256 * MiB)]
COMPUTE_LOSS = "/lossd.v1.LossService/ComputeLoss"
LOSS_STREAM = "/lossd.v1.LossService/LossStream"


# The server process and its memory ---------------------------------------------------------------


class ServerProcess:
    """``python -m lossd_server serve`` on 127.0.0.1 (an ephemeral port); :meth:`stop` SIGTERMs it."""

    def __init__(self, *flags: str, env: dict[str, str] | None = None) -> None:
        command = [sys.executable, "-m", "lossd_server", "serve", "--host", "127.0.0.1", "--port", "0"]
        command += ["--store", "memory", "--log-level", "INFO", "--device", "cpu", "--grace-seconds", "1", *flags]
        self.process = subprocess.Popen(
            command,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._address: str | None = None
        self._ready = threading.Event()
        # Drains stderr for the whole life of the process, so a chatty log can never block the server.
        self._reader = threading.Thread(target=self._read, name="lossd-serve-stderr", daemon=True)
        self._reader.start()
        if not self._ready.wait(START_TIMEOUT) or self._address is None:
            self.stop()
            raise AssertionError(f"no 'serving on' within {START_TIMEOUT:.0f} s; stderr: {''.join(self.lines)}")
        self.target: str = self._address

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            match = re.search(r"serving on (127\.0\.0\.1:\d+) ", line)
            if match and self._address is None:
                self._address = match.group(1)
                self._ready.set()
        self._ready.set()  # end of file: the process has gone

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._reader.join(timeout=10)
        assert self.process.stderr is not None
        self.process.stderr.close()


def _status(pid: int) -> dict[str, int]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {key: int(value) * 1024 for key, value in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.MULTILINE)}


def rss(pid: int) -> int:
    return _status(pid)["VmRSS"]


def peak(pid: int) -> int:
    return _status(pid)["VmHWM"]


def reset_peak(pid: int) -> None:
    """VmHWM := VmRSS (clear_refs 5). Where the kernel refuses, VmHWM keeps earlier peaks: a looser, valid bound."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def mib(nbytes: float) -> str:
    return f"{nbytes / MiB:.1f} MiB"


@contextlib.contextmanager
def serving(*flags: str, env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    server = ServerProcess(*flags, env=env)
    try:
        yield server
    finally:
        server.stop()


def channel_to(server: ServerProcess) -> grpc.Channel:
    return grpc.insecure_channel(server.target, options=CLIENT_OPTIONS)


def _stub(channel: grpc.Channel) -> pb_grpc.LossServiceStub:
    return pb_grpc.LossServiceStub(channel)  # type: ignore[no-untyped-call]


def assert_serving(server: ServerProcess, session: str) -> None:
    """Alive, healthy, and still answering for ``session``."""
    assert server.alive(), f"the server exited with {server.process.returncode}; stderr: {''.join(server.lines)}"
    with channel_to(server) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        info = _stub(channel).GetSession(pb.GetSessionRequest(name=session), timeout=30)
        assert info.name == session


# (A) Class weights ---------------------------------------------------------------------------------


def _weights_spec(weights: torch.Tensor) -> pb.SessionSpec:
    return pb.SessionSpec(kind=pb.LOSS_KIND_CROSS_ENTROPY, n_classes=weights.numel(), weight=_codec.encode(weights))


@pytest.fixture(scope="module")
def weights() -> torch.Tensor:
    generator = torch.Generator().manual_seed(12)
    return torch.rand(WEIGHT_CLASSES, dtype=torch.float64, generator=generator) + 0.5


@pytest.fixture(scope="module")
def weights_server() -> Iterator[ServerProcess]:
    with serving(*WEIGHTS_FLAGS, *EXACT_MALLOC_FLAGS, env=EXACT_MALLOC_ENV) as server:
        yield server


def test_class_weights_cost_eight_bytes_a_class(weights_server: ServerProcess, weights: torch.Tensor) -> None:
    pid = weights_server.pid
    request = pb.CreateSessionRequest(name="weights-warm-up", spec=_weights_spec(weights))
    with channel_to(weights_server) as channel:
        stub = _stub(channel)
        # The first large call leaves one-off buffers behind (about one message's worth); a create and delete
        # first, so the figures below are what each further session holds.
        stub.CreateSession(request, timeout=60)
        stub.DeleteSession(pb.DeleteSessionRequest(name="weights-warm-up"), timeout=30)
        before = rss(pid)
        peaks = []
        for name in ("weights-0", "weights-1"):
            request.name = name
            reset_peak(pid)
            start = rss(pid)
            reply = stub.CreateSession(request, timeout=60)
            peaks.append(peak(pid) - start)
            assert reply.created
            assert reply.session.state_bytes == WEIGHT_BYTES  # 8 bytes a class, the matrix_memory_bytes figure
            del reply
        growth = rss(pid) - before
        print(
            f"\n[weights C=2^24] RSS growth for 2 sessions: {mib(growth)} ({mib(growth / 2)} a session; "
            f"the float64 weights are {mib(WEIGHT_BYTES)}); peak during each create: "
            f"{', '.join(mib(p) for p in peaks)} (admission reserves {mib(footprint(request))} for it)"
        )
        # Python floats cost ~770 MiB a session, and a server that keeps each request message ~256 MiB.
        assert growth < 400 * MiB, f"two weights sessions of C=2^24 grew the server's RSS by {mib(growth)}"

        stored = stub.GetSession(pb.GetSessionRequest(name="weights-0"), timeout=60)
        assert stored.spec.n_classes == WEIGHT_CLASSES
        assert torch.equal(_codec.decode(stored.spec.weight, "spec.weight"), weights)
    assert weights_server.alive()


def test_class_weights_count_against_matrix_memory(weights: torch.Tensor) -> None:
    flags = (*WEIGHTS_FLAGS, "--matrix-memory-bytes", str(WEIGHT_BYTES - 1))
    with serving(*flags) as server:
        with channel_to(server) as channel:
            stub = _stub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.CreateSession(pb.CreateSessionRequest(name="too-heavy", spec=_weights_spec(weights)), timeout=60)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            details = refused.value.details() or ""
            assert "matrix_memory_bytes" in details and str(WEIGHT_BYTES) in details, details
            with pytest.raises(grpc.RpcError) as missing:  # nothing was half-created
                stub.GetSession(pb.GetSessionRequest(name="too-heavy"), timeout=10)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            # Without weights the same session holds nothing between calls, so it fits.
            spec = pb.SessionSpec(kind=pb.LOSS_KIND_CROSS_ENTROPY, n_classes=WEIGHT_CLASSES)
            reply = stub.CreateSession(pb.CreateSessionRequest(name="weightless", spec=spec), timeout=30)
            assert reply.created and reply.session.state_bytes == 0
        assert_serving(server, "weightless")


# (B) Request admission -------------------------------------------------------------------------------


def test_start_up_refuses_a_max_message_the_request_budget_cannot_admit() -> None:
    fits = Settings(request_memory_bytes=BUDGET, max_message_bytes=BUDGET // 13 // MiB * MiB)
    assert request_memory(fits).limit == BUDGET
    with pytest.raises(ValueError, match=r"max_message_bytes=.* request_memory_bytes="):
        request_memory(Settings(request_memory_bytes=BUDGET, max_message_bytes=BUDGET // 13 + MiB))
    # Unset, the message limit follows from the budget.
    assert request_memory(Settings(request_memory_bytes=BUDGET)).limit == BUDGET


SESSION = "smoothing"


@pytest.fixture(scope="module")
def burst_server() -> Iterator[ServerProcess]:
    with serving(*BURST_FLAGS, *EXACT_MALLOC_FLAGS, env=EXACT_MALLOC_ENV) as server:
        with channel_to(server) as channel:
            spec = pb.SessionSpec(kind=pb.LOSS_KIND_LABEL_SMOOTHING, n_classes=C, smoothing=SMOOTHING)
            _stub(channel).CreateSession(pb.CreateSessionRequest(name=SESSION, spec=spec), timeout=30)
        yield server


@pytest.fixture(scope="module")
def batch() -> tuple[bytes, float]:
    """A serialised ~19 MiB float32 LossRequest with need_grad, and torch's loss for it."""
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(N, C, generator=generator)
    labels = torch.randint(0, C, (N,), generator=generator)
    request = pb.LossRequest(
        session=SESSION, logits=_codec.encode(logits), labels=_codec.encode(labels), need_grad=True
    )
    assert request.ByteSize() < MAX_MESSAGE and 2 * loss_footprint(request) > BUDGET >= loss_footprint(request)
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=SMOOTHING)
    return request.SerializeToString(), float(expected)


Outcome = tuple[str, object]  # ("ok", LossResponse) | ("exhausted", message) | ("other", description)


def _unary_call(channel: grpc.Channel, payload: bytes) -> Outcome:
    call = channel.unary_unary(COMPUTE_LOSS, request_serializer=None, response_deserializer=pb.LossResponse.FromString)
    try:
        return "ok", call(payload, timeout=CALL_TIMEOUT)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return "exhausted", error.details()
        return "other", f"{error.code()}: {error.details()}"


def _stream_call(channel: grpc.Channel, payload: bytes) -> Outcome:
    call = channel.stream_stream(LOSS_STREAM, request_serializer=None, response_deserializer=pb.LossResponse.FromString)
    try:
        responses = list(call(iter([payload]), timeout=CALL_TIMEOUT))
    except grpc.RpcError as error:  # a stream reports a request's failure in the response, not as its status
        return "other", f"stream status {error.code()}: {error.details()}"
    if len(responses) != 1:
        return "other", f"{len(responses)} responses to one request"
    (response,) = responses
    if not response.HasField("error"):
        return "ok", response
    if response.error.code == RESOURCE_EXHAUSTED:
        return "exhausted", response.error.message
    return "other", f"in-stream error {response.error.code}: {response.error.message}"


def _burst(server: ServerProcess, call: Callable[[grpc.Channel, bytes], Outcome], payload: bytes) -> list[Outcome]:
    """THREADS calls at once, each on its own connection; every outcome, whatever happened."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    start = threading.Barrier(THREADS)

    def one() -> None:
        try:
            with channel_to(server) as channel:
                grpc.channel_ready_future(channel).result(timeout=10)
                start.wait(timeout=30)
                outcome = call(channel, payload)
        except BaseException as error:  # reported by the test, not lost in a thread
            outcome = ("other", repr(error))
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=one, name=f"burst-{i}") for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=CALL_TIMEOUT + 60)
    assert not any(thread.is_alive() for thread in threads), "a burst call never returned"
    return outcomes


def _check_outcome(kind: str, value: object, expected: float) -> None:
    """The right answer, or RESOURCE_EXHAUSTED naming the budget: nothing else."""
    assert kind != "other", value
    if kind == "ok":
        assert isinstance(value, pb.LossResponse)
        loss = float(_codec.decode(value.loss, "loss"))
        assert math.isclose(loss, expected, rel_tol=1e-5), (loss, expected)
        assert list(value.grad.shape) == [N, C]
    else:
        assert "request_memory_bytes" in str(value), value


def _measured_burst(
    server: ServerProcess, call: Callable[[grpc.Channel, bytes], Outcome], batch: tuple[bytes, float]
) -> tuple[Counter[str], int]:
    payload, expected = batch
    with channel_to(server) as channel:  # alone on an idle server a call always fits: it must succeed
        kind, value = call(channel, payload)
    assert kind == "ok", value
    _check_outcome(kind, value, expected)
    time.sleep(0.2)
    reset_peak(server.pid)
    before = rss(server.pid)
    outcomes = _burst(server, call, payload)
    growth = peak(server.pid) - before
    assert len(outcomes) == THREADS
    for kind, value in outcomes:
        _check_outcome(kind, value, expected)
    assert_serving(server, SESSION)
    return Counter(kind for kind, _ in outcomes), growth


def test_unary_burst_stays_within_the_request_budget(burst_server: ServerProcess, batch: tuple[bytes, float]) -> None:
    counts, growth = _measured_burst(burst_server, _unary_call, batch)
    print(
        f"\n[unary burst] {THREADS} x ComputeLoss of {mib(len(batch[0]))}: {counts['ok']} succeeded, "
        f"{counts['exhausted']} RESOURCE_EXHAUSTED; peak RSS growth {mib(growth)} (budget {mib(BUDGET)})"
    )
    # Without admission the same burst peaked at ~650 MiB (with 16 calls, ~810 MiB).
    assert growth < BUDGET + 128 * MiB, f"peak RSS grew by {mib(growth)} with request_memory_bytes={BUDGET}"


def test_stream_burst_stays_within_the_budget_and_its_messages(
    burst_server: ServerProcess, batch: tuple[bytes, float]
) -> None:
    counts, growth = _measured_burst(burst_server, _stream_call, batch)
    # A stream's messages are admitted once read, so each stream's received message is outside the budget.
    bound = BUDGET + THREADS * len(batch[0]) + 64 * MiB
    print(
        f"\n[stream burst] {THREADS} x LossStream of {mib(len(batch[0]))}: {counts['ok']} succeeded, "
        f"{counts['exhausted']} RESOURCE_EXHAUSTED; peak RSS growth {mib(growth)} (bound {mib(bound)})"
    )
    # Without admission the same burst peaked at ~670 MiB (with 16 calls, ~860 MiB).
    assert growth < bound, f"peak RSS grew by {mib(growth)} with request_memory_bytes={BUDGET}"


def test_sequential_unary_calls_hold_no_memory_after_they_answer(
    burst_server: ServerProcess, batch: tuple[bytes, float]
) -> None:
    """Admission reads a unary call's one message from a request stream; a stream left open kept it alive."""
    payload, _ = batch
    with channel_to(burst_server) as channel:
        for _ in range(3):  # one-off buffers first
            kind, value = _unary_call(channel, payload)
            assert kind == "ok", value
        before = rss(burst_server.pid)
        for _ in range(SEQUENTIAL):
            kind, value = _unary_call(channel, payload)
            assert kind == "ok", value
        growth = rss(burst_server.pid) - before
    print(f"\n[{SEQUENTIAL} sequential ComputeLoss of {mib(len(payload))}] RSS growth {mib(growth)}")
    # Keeping each request message grew it by ~19.5 MiB a call.
    assert growth < 64 * MiB, f"{SEQUENTIAL} sequential calls grew the server's RSS by {mib(growth)}"


def test_a_request_that_can_never_fit_is_refused_at_once(burst_server: ServerProcess) -> None:
    # Any loss request within max_message_bytes fits (the start-up check). GetState's answer does not: it
    # reserves 3 copies of the session's matrices, here 3 x 115 MB against a 320 MiB budget.
    big = "never-fits"
    spec = pb.SessionSpec(kind=pb.LOSS_KIND_ONLINE_LABEL_SMOOTHING, n_classes=3100, alpha=0.5)
    with channel_to(burst_server) as channel:
        stub = pb_grpc.LossServiceStub(channel)
        stub.CreateSession(pb.CreateSessionRequest(name=big, spec=spec), timeout=CALL_TIMEOUT)
        needed = 3 * (12 * 3100**2 + 8 * 3100)
        assert needed > BUDGET
        began = time.monotonic()
        with pytest.raises(grpc.RpcError) as raised:
            stub.GetState(pb.GetStateRequest(session=big), timeout=CALL_TIMEOUT)
        elapsed = time.monotonic() - began
        print(f"\n[never fits, GetState] {elapsed:.2f} s: {raised.value.details()}")
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "request_memory_bytes" in str(raised.value.details()) and str(needed) in str(raised.value.details())
        assert elapsed < ADMISSION_WAIT_SECONDS / 2, f"refused after {elapsed:.2f} s, not at once"
        stub.DeleteSession(pb.DeleteSessionRequest(name=big), timeout=CALL_TIMEOUT)
    assert_serving(burst_server, SESSION)
