"""Connections cut mid-request, mid-response and while idle: nothing is lost or counted twice.

The client talks to the shared test server through a :class:`TcpProxy` that cuts
the TCP connection at a chosen byte. Thresholds are counted from the arming and
chosen well inside the payloads: with C=50 and N=256 float32 logits a loss request
is ~53.5 KB up and its response ~51.3 KB down, while the HTTP/2 frames that also
flow (headers, SETTINGS, WINDOW_UPDATE, PING and their acks, a new connection's
preface) come to a few hundred bytes. So a "down" cut at 20 KB falls inside a response (the
server has applied the batch) and an "up" cut at 20 KB inside a request (the
server never sees it).

A spy on the in-process server records how often each request reached it, so
every test also checks that the fault it arms really happened where intended.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import lossd
from lossd import functional as LF
from lossd.v1 import loss_service_pb2 as pb
from lossd_server import session as session_module
from lossd_server.embedded import EmbeddedServer
from lossd_server.servicer import LossServicer
from tests.tcp_proxy import TcpProxy


@pytest.fixture(autouse=True)
def _steps_over_tcp(monkeypatch: pytest.MonkeyPatch) -> None:
    """The faults are cuts and pauses of a TCP proxy: every step must cross it, not the local socket."""
    monkeypatch.setenv("LOSSD_TRANSPORT", "grpc")


C, N = 50, 256
ALPHA, EPS = 0.5, 0.1
REQUEST_BYTES = N * C * 4 + N * 8  # logits and labels, before framing
RESPONSE_BYTES = N * C * 4  # the gradient, before framing
MID = 20_000  # a cut point inside a loss request or response
# With a 200-character session name a NextEpoch answer is ~340 bytes down, and the
# server has received the request before the ~20th byte down after arming.
LONG_NAME_CHARS = 200
MID_NEXT_EPOCH = 150
RTOL, ATOL = 1e-6, 1e-8  # exact on CPU (same ops, same process); slack for a CUDA server

assert 0 < MID < min(REQUEST_BYTES, RESPONSE_BYTES) // 2


# --------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture()
def proxy(server: EmbeddedServer) -> Iterator[TcpProxy]:
    with TcpProxy(server.target) as running:
        yield running
    # close() joined every thread it started; make sure none is left behind.
    assert not [thread.name for thread in threading.enumerate() if thread.name.startswith("tcp-proxy")]


@pytest.fixture()
def direct(server: EmbeddedServer) -> Iterator[lossd.Client]:
    """A client that bypasses the proxy, to read the server's statistics."""
    with lossd.Client(server.target) as connected:
        yield connected


@dataclass
class ServerSpy:
    """What reached the in-process server, per session."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    loss_requests: dict[str, list[str]] = field(default_factory=dict)  # request ids in arrival order
    applied: Counter[str] = field(default_factory=Counter)  # training batches applied
    epoch_calls: Counter[str] = field(default_factory=Counter)  # next_epoch arrivals

    def arrivals(self, session: str) -> list[int]:
        """How many times each distinct request id arrived, in order of first arrival."""
        with self.lock:
            ids = self.loss_requests.get(session, [])
            return list(Counter(ids).values())  # Counter keeps first-insertion order


@pytest.fixture()
def spy(monkeypatch: pytest.MonkeyPatch) -> ServerSpy:
    recorded = ServerSpy()
    answer = LossServicer.answer
    compute = session_module.Session.compute
    arrive = session_module.Session.arrive

    def spied_answer(self: LossServicer, owner: str, request: pb.LossRequest, *payload: Any) -> Any:
        with recorded.lock:
            recorded.loss_requests.setdefault(request.session, []).append(request.request_id)
        return answer(self, owner, request, *payload)

    def spied_compute(self: session_module.Session, *args: Any, **kwargs: Any) -> Any:
        result = compute(self, *args, **kwargs)
        if kwargs.get("training"):
            with recorded.lock:
                recorded.applied[self.name] += 1
        return result

    def spied_arrive(self: session_module.Session, *args: Any, **kwargs: Any) -> Any:
        with recorded.lock:
            recorded.epoch_calls[self.name] += 1
        return arrive(self, *args, **kwargs)

    monkeypatch.setattr(LossServicer, "answer", spied_answer)
    monkeypatch.setattr(session_module.Session, "compute", spied_compute)
    monkeypatch.setattr(session_module.Session, "arrive", spied_arrive)
    return recorded


def make_batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, C] float32 logits (about half the rows predict their label) and [N] labels."""
    labels = torch.randint(0, C, (N,), generator=gen)
    logits = torch.randn((N, C), generator=gen)
    bumped = torch.rand(N, generator=gen) < 0.5
    logits[bumped, labels[bumped]] += 4.0
    return logits, labels


class LocalOLS:
    """The session's OLS state, kept locally with ``lossd.functional`` (class-major, as the server keeps it)."""

    def __init__(self) -> None:
        self.soft = LF.initial_soft_labels(C, EPS, "label_smoothing", "off_target")
        self.acc = torch.zeros((C, C), dtype=torch.float64)
        self.counts = torch.zeros(C, dtype=torch.int64)
        self.samples = 0
        self.epoch = 0

    def train(self, logits: torch.Tensor, labels: torch.Tensor) -> LF.LossOutput:
        out = LF.online_label_smoothing(logits, labels, self.soft, alpha=ALPHA)
        rows, probs = LF.correct_rows(out, labels)
        self.acc.index_add_(0, rows, probs)
        self.counts.index_add_(0, rows, torch.ones_like(rows))
        self.samples += out.n_used
        return out

    def next_epoch(self) -> None:
        self.soft = LF.next_soft_labels(self.acc, self.counts, self.soft, "keep")
        self.acc.zero_()
        self.counts.zero_()
        self.samples = 0
        self.epoch += 1

    def assert_matches(self, state: lossd.SessionState) -> None:
        """The server's state (wire layout: column k is class k) equals this one."""
        assert state.epoch == self.epoch
        assert state.samples_this_epoch == self.samples
        assert torch.equal(state.counts, self.counts), (state.counts, self.counts)
        torch.testing.assert_close(state.accumulator, self.acc.T, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(state.supervise, self.soft.T, rtol=RTOL, atol=ATOL)


def train_step(
    criterion: lossd.OnlineLabelSmoothing, local: LocalOLS, logits: torch.Tensor, labels: torch.Tensor
) -> None:
    """One forward and backward through the module; loss and gradient must equal the local math."""
    expected = local.train(logits, labels)
    assert expected.grad is not None
    leaf = logits.clone().requires_grad_(True)
    loss = criterion(leaf, labels)
    loss.backward()
    torch.testing.assert_close(loss.detach(), expected.loss, rtol=RTOL, atol=ATOL)
    assert leaf.grad is not None
    torch.testing.assert_close(leaf.grad, expected.grad, rtol=RTOL, atol=ATOL)


def ols(proxy: TcpProxy, name: str, **connection: Any) -> lossd.OnlineLabelSmoothing:
    # The cuts fall at byte offsets inside tensors, so the tensors must cross the TCP socket (not the local one).
    connection.setdefault("transport", "grpc")
    return lossd.OnlineLabelSmoothing(ALPHA, C, EPS, session=name, target=proxy.target, **connection)


# --------------------------------------------------------------------------------------
# The proxy itself


def test_the_proxy_forwards_exactly_up_to_the_cut_point() -> None:
    with socket.create_server(("127.0.0.1", 0)) as upstream_listener:
        host, port = upstream_listener.getsockname()[:2]
        with TcpProxy(f"{host}:{port}") as proxy:
            with socket.create_connection(proxy.address) as client:
                upstream, _ = upstream_listener.accept()
                with upstream:
                    client.sendall(b"a" * 100)
                    assert _read_exactly(upstream, 100) == b"a" * 100
                    upstream.sendall(b"b" * 50)
                    assert _read_exactly(client, 50) == b"b" * 50

                    proxy.cut_after("up", 300)
                    client.sendall(b"c" * 1000)
                    assert _read_until_closed(upstream) == b"c" * 300
                    assert _read_until_closed(client) == b""
            assert proxy.cuts == 1
            assert proxy.forwarded("up") == 400 and proxy.forwarded("down") == 50
            assert not proxy.armed("up")

            proxy.pause()  # connections are accepted and dropped at once
            with socket.create_connection(proxy.address) as client:
                assert _read_until_closed(client) == b""
            proxy.resume()
            with socket.create_connection(proxy.address) as client:
                upstream, _ = upstream_listener.accept()
                with upstream:
                    client.sendall(b"d")
                    assert _read_exactly(upstream, 1) == b"d"
                    assert proxy.cut_all() == 1
                    assert _read_until_closed(client) == b""
            assert proxy.cuts == 2
    assert not [thread.name for thread in threading.enumerate() if thread.name.startswith("tcp-proxy")]


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    sock.settimeout(5)
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        assert chunk, f"connection closed after {len(data)} of {count} bytes"
        data += chunk
    return data


def _read_until_closed(sock: socket.socket) -> bytes:
    sock.settimeout(5)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


# --------------------------------------------------------------------------------------
# Training through cuts


@dataclass(frozen=True)
class Fault:
    """Armed just before a step. ``arrivals``: how often the step's request reaches the server."""

    up: int = 0  # cut the request after this many bytes
    down: int = 0  # cut the response after this many bytes
    down_times: int = 1  # ... and the resends' responses, this many times in all
    idle: bool = False  # cut the idle connection between the steps
    arrivals: int = 1

    @property
    def cuts(self) -> int:
        return (self.up > 0) + (self.down_times if self.down else 0) + self.idle

    def arm(self, proxy: TcpProxy) -> None:
        if self.idle:
            assert proxy.cut_all() == 1, "expected the module's one connection to be open"
        if self.up:
            proxy.cut_after("up", self.up)
        if self.down:
            proxy.cut_after("down", self.down, times=self.down_times)


PLAN: dict[int, Fault] = {
    # Mid-response: the server applied the batch; the resend gets the stored answer.
    1: Fault(down=MID, arrivals=2),
    # Mid-request, on the connection made after the cut above: the server never saw it.
    2: Fault(up=MID),
    # The idle stream (and its connection) dies between steps.
    4: Fault(idle=True),
    # The resend's response is cut too: the server answers the same id three times.
    5: Fault(down=MID, down_times=2, arrivals=3),
    # The request is cut, then the resend's response.
    6: Fault(up=MID, down=MID, arrivals=2),
}
STEPS = 8


def test_a_training_loop_survives_cut_connections_exactly_once(
    proxy: TcpProxy, direct: lossd.Client, spy: ServerSpy, session_name: str
) -> None:
    gen = torch.Generator().manual_seed(2024)
    local = LocalOLS()
    criterion = ols(proxy, session_name, retry_deadline=10)
    with criterion:
        for step in range(STEPS):
            fault = PLAN.get(step)
            if fault is not None:
                fault.arm(proxy)
            logits, labels = make_batch(gen)
            train_step(criterion, local, logits, labels)
            assert not proxy.armed("up") and not proxy.armed("down"), f"step {step}: a cut did not happen"
        assert proxy.cuts == sum(fault.cuts for fault in PLAN.values())
        assert spy.arrivals(session_name) == [PLAN.get(step, Fault()).arrivals for step in range(STEPS)]
        assert spy.applied[session_name] == STEPS

        info = direct.get_session(session_name)
        assert info.epoch == 0
        assert info.samples_this_epoch == STEPS * N == local.samples
        assert info.correct_this_epoch == int(local.counts.sum()) > 0
        local.assert_matches(direct.get_state(session_name))

        criterion.next_epoch()
        local.next_epoch()
        assert criterion.epoch == 1
        state = direct.get_state(session_name)
        local.assert_matches(state)
        assert not torch.equal(state.supervise, LF.initial_soft_labels(C, EPS).T), "S did not move"

        # The next epoch trains with the new soft labels, through one more cut.
        proxy.cut_after("down", MID)
        train_step(criterion, local, *make_batch(gen))
        assert proxy.cuts == sum(fault.cuts for fault in PLAN.values()) + 1
        local.assert_matches(direct.get_state(session_name))


@pytest.mark.parametrize(("direction", "arrivals"), [("down", 2), ("up", 1)])
def test_a_unary_loss_call_cut_midway_is_applied_once(
    proxy: TcpProxy, direct: lossd.Client, spy: ServerSpy, session_name: str, direction: str, arrivals: int
) -> None:
    gen = torch.Generator().manual_seed(7)
    local = LocalOLS()
    spec = lossd.SessionSpec(kind="online_label_smoothing", n_classes=C, smoothing=EPS, alpha=ALPHA)
    with lossd.Client(proxy.target, retry_deadline=10) as client:
        client.create_session(session_name, spec)
        for step in range(3):
            logits, labels = make_batch(gen)
            if step == 1:
                proxy.cut_after("down" if direction == "down" else "up", MID)
            result = client.compute_loss(session_name, logits, labels, stream=False)
            expected = local.train(logits, labels)
            torch.testing.assert_close(result.loss, expected.loss, rtol=RTOL, atol=ATOL)
            assert result.grad is not None and expected.grad is not None
            torch.testing.assert_close(result.grad, expected.grad, rtol=RTOL, atol=ATOL)
            assert (result.n_used, result.n_correct, result.epoch) == (N, expected.n_correct, 0)
    assert proxy.cuts == 1
    assert spy.arrivals(session_name) == [1, arrivals, 1]
    assert spy.applied[session_name] == 3
    assert direct.get_session(session_name).samples_this_epoch == 3 * N
    local.assert_matches(direct.get_state(session_name))


# --------------------------------------------------------------------------------------
# An unreachable server


def _calls(client: lossd.Client, name: str, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Callable[[], Any]]:
    return {
        "stream": lambda: client.compute_loss(name, *batch),
        "unary": lambda: client.compute_loss(name, *batch, stream=False),
        "next_epoch": lambda: client.next_epoch(name, epoch=0),
    }


@pytest.mark.parametrize("call", ["stream", "unary", "next_epoch"])
def test_an_outage_longer_than_the_retry_deadline_raises_unavailable(
    proxy: TcpProxy, direct: lossd.Client, spy: ServerSpy, session_name: str, call: str
) -> None:
    deadline = 0.5
    spec = lossd.SessionSpec(kind="online_label_smoothing", n_classes=C, smoothing=EPS, alpha=ALPHA)
    batch = make_batch(torch.Generator().manual_seed(3))
    with lossd.Client(proxy.target, retry_deadline=deadline) as client:
        client.create_session(session_name, spec)
        client.compute_loss(session_name, *batch)  # the loss stream is open
        assert proxy.pause() == 1
        started = time.monotonic()
        with pytest.raises(lossd.UnavailableError) as raised:
            _calls(client, session_name, batch)[call]()
        elapsed = time.monotonic() - started
        proxy.resume()
    assert deadline <= elapsed < deadline + 2.0
    message = raised.value.message
    assert proxy.target in message, message
    tried = re.search(r"after retrying for (\d+\.\d) s", message)
    assert tried is not None, message
    assert deadline <= float(tried.group(1)) <= elapsed + 0.05, message
    assert proxy.accepted >= 2  # it did try again: the first connection, then at least one dropped
    # Nothing reached the server during the outage.
    assert spy.arrivals(session_name) == [1]
    assert spy.epoch_calls[session_name] == 0
    info = direct.get_session(session_name)
    assert (info.epoch, info.samples_this_epoch) == (0, N)


@pytest.mark.parametrize("call", ["stream", "unary", "next_epoch"])
def test_an_outage_within_the_retry_deadline_is_transparent(
    proxy: TcpProxy, direct: lossd.Client, spy: ServerSpy, session_name: str, call: str
) -> None:
    outage = 0.3
    spec = lossd.SessionSpec(kind="online_label_smoothing", n_classes=C, smoothing=EPS, alpha=ALPHA)
    batch = make_batch(torch.Generator().manual_seed(4))
    local = LocalOLS()
    with lossd.Client(proxy.target, retry_deadline=10) as client:
        client.create_session(session_name, spec)
        client.compute_loss(session_name, *batch)  # the loss stream is open
        local.train(*batch)
        assert proxy.pause() == 1
        accepted = proxy.accepted
        resume = threading.Timer(outage, proxy.resume)
        started = time.monotonic()
        resume.start()
        try:
            result = _calls(client, session_name, batch)[call]()
        finally:
            resume.cancel()
            resume.join()
        elapsed = time.monotonic() - started
    assert outage <= elapsed < outage + 3.0
    assert proxy.accepted >= accepted + 2  # at least one connection dropped, then the one that worked
    if call == "next_epoch":
        local.next_epoch()
        assert isinstance(result, lossd.SessionInfo) and result.epoch == 1
        assert spy.epoch_calls[session_name] == 1
        assert spy.arrivals(session_name) == [1]
    else:
        expected = local.train(*batch)
        assert isinstance(result, lossd.LossResult)
        torch.testing.assert_close(result.loss, expected.loss, rtol=RTOL, atol=ATOL)
        assert spy.arrivals(session_name) == [1, 1]
    local.assert_matches(direct.get_state(session_name))


# --------------------------------------------------------------------------------------
# next_epoch


def test_a_next_epoch_whose_answer_is_cut_advances_once(
    proxy: TcpProxy, direct: lossd.Client, spy: ServerSpy, session_name: str
) -> None:
    name = (session_name + "-" + "x" * LONG_NAME_CHARS)[:LONG_NAME_CHARS]
    gen = torch.Generator().manual_seed(11)
    local = LocalOLS()
    criterion = ols(proxy, name, retry_deadline=10)
    with criterion:
        for _ in range(2):
            train_step(criterion, local, *make_batch(gen))
        before = direct.get_state(name)
        local.assert_matches(before)

        proxy.cut_after("down", MID_NEXT_EPOCH)
        criterion.next_epoch()
        local.next_epoch()
        assert proxy.cuts == 1 and not proxy.armed("down")
        # It reached the server twice (the first call advanced, the resend got its answer).
        assert spy.epoch_calls[name] == 2
        assert criterion.epoch == 1
        info = direct.get_session(name)
        assert (info.epoch, info.samples_this_epoch) == (1, 0)
        local.assert_matches(direct.get_state(name))

        # The module goes on in epoch 1 and can finish it.
        train_step(criterion, local, *make_batch(gen))
        criterion.next_epoch()
        local.next_epoch()
        assert criterion.epoch == 2 == direct.get_session(name).epoch
        local.assert_matches(direct.get_state(name))
