"""The same-host data plane (lossd_server.local_transport, lossd._local): a Unix SOCK_SEQPACKET socket, a
sealed memfd segment that both processes map, one fixed header per step each way.

- numbers: a module on transport="local" gives bit for bit the loss and gradient of transport="grpc";
- selection: LOSSD_TRANSPORT, a server without a socket, a socket path that is not there, another host;
- exactly once: a step resent after the connection broke (on either transport) is counted once;
- restarts and kill -9 of either side: clients reattach, and no segment stays mapped anywhere;
- the wire: garbage, truncated headers and refused attaches get one status reply, then the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gc
import mmap
import os
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import torch.nn.functional as F

import lossd
from lossd import _local
from lossd import _local_protocol as wire
from lossd._exceptions import status_code
from lossd.v1 import loss_service_pb2 as pb
from lossd_server.config import Settings
from lossd_server.embedded import EmbeddedServer
from lossd_server.local_transport import LocalTransport
from tests._security import ALICE, BOB, token_file
from tests.conftest import ComputeGate, ols_spec
from tests.test_durability import Served

C, N = 5, 16
SEGMENT = 1 << 20
OLS = ols_spec(C)
CE = lossd.SessionSpec(kind="cross_entropy", n_classes=C)
FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LABELS = (torch.int32, torch.int64)
TRAIN = wire.TRAINING | wire.NEED_GRAD
Code = grpc.StatusCode


def settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = dict(host="127.0.0.1", port=0, device="cpu", workers=2, grace_seconds=5, store="memory")
    return Settings(**{**base, **overrides})


def local_of(server: EmbeddedServer) -> LocalTransport:
    running = server._running
    assert running is not None and running.local is not None
    return running.local


def batch(
    seed: int, dtype: torch.dtype = torch.float32, labels_dtype: torch.dtype = torch.int64
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (N,), generator=generator)
    logits = torch.randn(N, C, generator=generator, dtype=torch.float64) + 2.0 * F.one_hot(labels, C)
    return logits.to(dtype), labels.to(labels_dtype)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)


def segment_inodes(pid: int | str = "self") -> set[int]:
    """The inodes of the lossd segments (memfds) mapped in ``pid``."""
    text = Path(f"/proc/{pid}/maps").read_text()
    return {int(line.split()[4]) for line in text.splitlines() if "memfd:lossd-segment" in line}


def memfd_descriptors(pid: int | str = "self") -> set[int]:
    """The inodes of the memfds ``pid`` holds open. CPython's mmap keeps a dup of the descriptor it maps,
    so an attached segment holds one in each process; a segment no one maps, none."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            if "memfd:" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                inodes.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
    return inodes


# The raw wire ---------------------------------------------------------------------------------------


def ticket(client: lossd.Client) -> pb.LocalEndpoint:
    endpoint: pb.LocalEndpoint = client._stub.OpenLocal(pb.OpenLocalRequest(), timeout=10)
    return endpoint


def raw_connect(path: str) -> socket.socket:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    connection.settimeout(10)
    connection.connect(path)
    return connection


def send_attach(
    connection: socket.socket,
    ticket_bytes: bytes,
    fds: list[int],
    size: int,
    *,
    version: int = wire.PROTOCOL_VERSION,
    magic: int = wire.ATTACH_MAGIC,
) -> None:
    message = wire.ATTACH.pack(magic, version, size, ticket_bytes)
    if fds:
        socket.send_fds(connection, [message], fds)
    else:
        connection.send(message)


def reply(connection: socket.socket) -> tuple[grpc.StatusCode, str, tuple[Any, ...]]:
    """One reply: (its status, its message, its fixed fields)."""
    data = connection.recv(wire.MAX_MESSAGE)
    assert len(data) >= wire.REPLY.size, f"no reply (got {data!r})"
    fields = wire.REPLY.unpack_from(data)
    assert fields[0] == wire.REPLY_MAGIC and len(data) == wire.REPLY.size + fields[6]
    return status_code(fields[1]), data[wire.REPLY.size :].decode(), fields


def assert_closed(connection: socket.socket) -> None:
    assert connection.recv(wire.MAX_MESSAGE) == b"", "the server kept the connection open"


@dataclasses.dataclass
class Raw:
    """A hand-made attached connection and its segment."""

    connection: socket.socket
    segment: mmap.mmap

    def close(self) -> None:
        self.connection.close()
        self.segment.close()


def raw_attach(client: lossd.Client, size: int = SEGMENT) -> Raw:
    endpoint = ticket(client)
    connection = raw_connect(endpoint.socket_path)
    fd = wire.create_segment(size)
    try:
        segment = mmap.mmap(fd, size)
        send_attach(connection, endpoint.ticket, [fd], size)
    finally:
        os.close(fd)
    code, message, _ = reply(connection)
    assert code == Code.OK, message
    return Raw(connection, segment)


def step_message(
    session: str,
    request_id: str = "",
    *,
    n: int = N,
    c: int = C,
    logits_code: int = 1,
    labels_code: int = 4,
    flags: int = TRAIN,
    magic: int = wire.STEP_MAGIC,
    **overrides: int,
) -> bytes:
    """A step header with the client's layout (logits at 0), any field of it overridden."""
    logits_nbytes = n * c * wire.DTYPES.get(logits_code, torch.float32).itemsize
    labels_at = wire.align(logits_nbytes)
    grad_at = wire.align(labels_at + n * wire.DTYPES.get(labels_code, torch.int64).itemsize)
    loss_at = wire.align(grad_at + logits_nbytes)
    fields = dict(
        rank=0,
        epoch=0,
        logits_at=0,
        labels_at=labels_at,
        grad_at=grad_at,
        loss_at=loss_at,
        grad_room=logits_nbytes,
        loss_room=8 * n,
    )
    fields.update(overrides)
    name, rid = session.encode(), request_id.encode()
    header = wire.STEP.pack(
        magic, flags, fields["rank"], fields["epoch"], logits_code, labels_code, len(name), len(rid), n, c,
        fields["logits_at"], fields["labels_at"], fields["grad_at"], fields["loss_at"], fields["grad_room"],
        fields["loss_room"],
    )  # fmt: skip
    return header + name + rid


def fill(raw: Raw, logits: torch.Tensor, labels: torch.Tensor) -> None:
    labels_at = wire.align(logits.nbytes)
    raw.segment[: logits.nbytes] = logits.numpy().tobytes()
    raw.segment[labels_at : labels_at + labels.nbytes] = labels.numpy().tobytes()


# Fixtures --------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _default_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients here choose their transport; none inherits it from the environment the suite runs in."""
    monkeypatch.delenv("LOSSD_TRANSPORT", raising=False)
    monkeypatch.delenv("LOSSD_LOCAL_SOCKET", raising=False)


@pytest.fixture()
def grpc_client(server: EmbeddedServer) -> Iterator[lossd.Client]:
    with lossd.Client(server.target, transport="grpc", retry_deadline=0, timeout=10) as connected:
        yield connected


@pytest.fixture()
def own_server() -> Iterator[EmbeddedServer]:
    """A server of the test's own, so breaking its connections touches no other test's."""
    with EmbeddedServer(settings()) as running:
        yield running


@pytest.fixture()
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a Unix socket path is at most 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="lossd-lt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# 1. The numbers -------------------------------------------------------------------------------------


def make_module(kind: str, reduction: str, target: str, transport: str) -> lossd.RemoteLoss:
    connection: dict[str, Any] = dict(target=target, transport=transport, retry_deadline=0, timeout=10)
    if kind == "ce":
        return lossd.CrossEntropyLoss(reduction=reduction, n_classes=C, **connection)  # type: ignore[arg-type]
    if kind == "ls":
        return lossd.CrossEntropyLoss(reduction=reduction, label_smoothing=0.1, n_classes=C, **connection)  # type: ignore[arg-type]
    return lossd.OnlineLabelSmoothing(0.5, C, 0.1, reduction=reduction, **connection)  # type: ignore[arg-type]


def run_step(
    module: lossd.RemoteLoss, logits: torch.Tensor, labels: torch.Tensor, mode: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(loss, d loss / d logits); ``mode``: train, no_grad (need_grad False) or eval."""
    module.train(mode != "eval")
    if mode == "no_grad":
        with torch.no_grad():
            return module(logits, labels), None
    leaf = logits.clone().requires_grad_()
    loss = module(leaf, labels)
    weights = torch.linspace(0.5, 2.0, loss.numel(), dtype=torch.float64).reshape(loss.shape)
    weights = weights.to(device=loss.device, dtype=loss.dtype)
    (loss * weights).sum().backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["ce", "ls", "ols"])
def test_local_and_grpc_give_the_same_bits(server: EmbeddedServer, kind: str, reduction: str) -> None:
    attached = local_of(server).stats.attached
    local = make_module(kind, reduction, server.target, "local")
    remote = make_module(kind, reduction, server.target, "grpc")
    try:
        assert local.transport == "local" and remote.transport == "grpc"
        seed = 0
        for epoch in range(2 if kind == "ols" else 1):
            for dtype in FLOATS:
                for labels_dtype in LABELS:
                    for mode in ("train", "no_grad", "eval"):
                        seed += 1
                        logits, labels = batch(seed, dtype, labels_dtype)
                        loss_local, grad_local = run_step(local, logits, labels, mode)
                        loss_grpc, grad_grpc = run_step(remote, logits, labels, mode)
                        where = f"epoch {epoch}, {dtype}, {labels_dtype}, {mode}"
                        assert loss_local.dtype == loss_grpc.dtype == dtype, where
                        assert loss_local.shape == ((N,) if reduction == "none" else ()), where
                        assert torch.equal(loss_local, loss_grpc), where
                        if mode == "no_grad":
                            assert grad_local is None and grad_grpc is None
                        else:
                            assert grad_local is not None and grad_grpc is not None
                            assert grad_local.dtype == dtype and torch.equal(grad_local, grad_grpc), where
            if isinstance(local, lossd.OnlineLabelSmoothing) and isinstance(remote, lossd.OnlineLabelSmoothing):
                # The statistics the local steps added are the gRPC steps' too, bit for bit.
                assert local.info().samples_this_epoch == remote.info().samples_this_epoch == 16 * N
                local.next_epoch()
                remote.next_epoch()
                assert torch.equal(local.supervise, remote.supervise)
        assert local.transport == "local" and remote.transport == "grpc"
        assert local_of(server).stats.attached == attached + 1  # one segment served every step and dtype
    finally:
        local.close()
        remote.close()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_local_label_smoothing_matches_torch_in_float64(server: EmbeddedServer, reduction: str) -> None:
    with make_module("ls", reduction, server.target, "local") as module:
        logits, labels = batch(7, torch.float64)
        loss, grad = run_step(module, logits, labels, "train")
        assert module.transport == "local"
    leaf = logits.clone().requires_grad_()
    expected = F.cross_entropy(leaf, labels, label_smoothing=0.1, reduction=reduction)
    weights = torch.linspace(0.5, 2.0, expected.numel(), dtype=torch.float64).reshape(expected.shape)
    (expected * weights).sum().backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_logits_travel_through_the_host(server: EmbeddedServer) -> None:
    with (
        make_module("ls", "mean", server.target, "local") as local,
        make_module("ls", "mean", server.target, "grpc") as remote,
    ):
        logits, labels = batch(3)
        loss_cpu, grad_cpu = run_step(local, logits, labels, "train")
        loss_cuda, grad_cuda = run_step(local, logits.cuda(), labels.cuda(), "train")
        loss_grpc, grad_grpc = run_step(remote, logits.cuda(), labels.cuda(), "train")
        assert local.transport == "local"
        assert grad_cuda is not None and grad_cuda.device.type == "cuda" and loss_cuda.device.type == "cuda"
        assert torch.equal(loss_cuda.cpu(), loss_cpu) and torch.equal(loss_cuda, loss_grpc)
        assert grad_cpu is not None and grad_grpc is not None
        assert torch.equal(grad_cuda.cpu(), grad_cpu) and torch.equal(grad_cuda, grad_grpc)


BAD_INPUTS: list[Any] = [
    pytest.param(
        torch.randn(N, C),
        torch.tensor([1]),
        id="labels [1] for N rows",
    ),
    pytest.param(
        torch.randn(N, C),
        torch.zeros(N + 1, dtype=torch.int64),
        id="labels [N+1]",
    ),
    pytest.param(
        torch.randn(N, C),
        torch.zeros(N, 1, dtype=torch.int64),
        id="labels [N, 1]",
    ),
    pytest.param(
        torch.randn(C),
        torch.tensor([1]),
        id="logits [C]",
    ),
    pytest.param(
        torch.randn(2, N // 2, C),
        torch.zeros(2, N // 2, dtype=torch.int64),
        id="logits 3-d",
    ),
    pytest.param(
        torch.randn(N, C),
        torch.zeros(N, dtype=torch.uint8),
        id="uint8 labels",
    ),
    pytest.param(torch.zeros(N, C, dtype=torch.int64), torch.zeros(N, dtype=torch.int64), id="int64 logits"),
    pytest.param(torch.randn(N, C), torch.zeros(N), id="float labels"),
    pytest.param(torch.randn(N, C + 1), torch.zeros(N, dtype=torch.int64), id="C+1 classes"),
    pytest.param(torch.randn(N, C), torch.full((N,), C), id="a label out of range"),
    pytest.param(torch.full((N, C), float("nan")), torch.zeros(N, dtype=torch.int64), id="NaN logits"),
]


@pytest.mark.parametrize(("logits", "labels"), BAD_INPUTS)
def test_local_refuses_what_grpc_refuses(
    server: EmbeddedServer, session_name: str, logits: torch.Tensor, labels: torch.Tensor
) -> None:
    outcomes: dict[str, str] = {}
    for transport in ("grpc", "local"):
        with lossd.Client(server.target, transport=transport, retry_deadline=0) as client:
            client.create_session(session_name, OLS)
            try:
                client.compute_loss(session_name, logits, labels, epoch=0)
                outcomes[transport] = "computed"
            except Exception as error:
                outcomes[transport] = type(error).__name__
            assert client.transport == transport
            assert client.get_session(session_name).samples_this_epoch == 0, f"{transport} counted the step"
    assert outcomes["grpc"] != "computed"
    assert outcomes["local"] == outcomes["grpc"]


@pytest.mark.parametrize("transport", ["grpc", "local"])
def test_0d_labels_are_invalid_argument_on_the_stream(
    server: EmbeddedServer, session_name: str, transport: str
) -> None:
    with lossd.Client(server.target, transport=transport, retry_deadline=0) as client:
        client.create_session(session_name, CE)
        with pytest.raises(lossd.InvalidArgumentError, match="labels"):
            client.compute_loss(session_name, torch.randn(N, C), torch.tensor(1), stream=False)
        with pytest.raises(lossd.InvalidArgumentError, match="labels"):
            client.compute_loss(session_name, torch.randn(N, C), torch.tensor(1))


# 2. Selection ---------------------------------------------------------------------------------------


def one_step(client: lossd.Client, name: str, spec: lossd.SessionSpec = CE, **kwargs: Any) -> lossd.LossResult:
    client.create_session(name, spec)
    return client.compute_loss(name, *batch(1), **kwargs)


def test_lossd_transport_grpc_keeps_the_default_client_off_the_socket(
    server: EmbeddedServer, session_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOSSD_TRANSPORT", "grpc")
    attached = local_of(server).stats.attached
    with lossd.Client(server.target, retry_deadline=0) as client:
        assert client.config.transport == "grpc"
        one_step(client, session_name)
        assert client.transport == "grpc"
    assert local_of(server).stats.attached == attached
    monkeypatch.delenv("LOSSD_TRANSPORT")
    with lossd.Client(server.target, retry_deadline=0) as client:  # the default: auto, and this host can
        one_step(client, session_name)
        assert client.transport == "local"
    assert local_of(server).stats.attached == attached + 1


@pytest.mark.parametrize("how", ["env", "argument"])
def test_an_unknown_transport_is_a_value_error_naming_the_choices(
    server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    if how == "env":
        monkeypatch.setenv("LOSSD_TRANSPORT", "shm")
    with pytest.raises(ValueError, match=r"auto, local, grpc; got 'shm'") as raised:
        lossd.Client(server.target, transport="shm" if how == "argument" else None)
    assert ("LOSSD_TRANSPORT" in str(raised.value)) == (how == "env")


def test_a_server_without_a_socket_serves_auto_over_grpc_and_refuses_local(session_name: str) -> None:
    with EmbeddedServer(settings(local_socket="")) as server:
        assert server._running is not None and server._running.local is None
        assert not list(Path(os.environ["LOSSD_STATE_DIR"]).glob(f"lossd-{server._running.port}.sock"))
        with lossd.Client(server.target, retry_deadline=0) as client:
            assert client.transport == "grpc"
            one_step(client, session_name)
            assert client.transport == "grpc"
        with lossd.Client(server.target, transport="local", retry_deadline=0) as client:
            with pytest.raises(lossd.FailedPreconditionError, match="no local transport"):
                one_step(client, session_name)
            with pytest.raises(lossd.FailedPreconditionError):
                client.transport  # noqa: B018


def test_local_with_a_socket_path_that_is_not_there_names_the_path(
    server: EmbeddedServer, session_name: str, tmp_path: Path
) -> None:
    missing = str(tmp_path / "no-such.sock")
    with (
        lossd.Client(server.target, transport="local", local_socket=missing, retry_deadline=0) as client,
        pytest.raises(lossd.FailedPreconditionError, match=re.escape(missing)),
    ):
        one_step(client, session_name)
    # auto falls back to gRPC with the same path.
    with lossd.Client(server.target, local_socket=missing, retry_deadline=0) as client:
        one_step(client, session_name)
        assert client.transport == "grpc"


def test_local_socket_reaches_the_server_under_another_path(
    server: EmbeddedServer, session_name: str, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A container that mounts the socket's directory elsewhere: LOSSD_LOCAL_SOCKET names it there."""
    alias = short_dir / "mounted.sock"
    alias.symlink_to(local_of(server).path)
    monkeypatch.setenv("LOSSD_LOCAL_SOCKET", str(alias))
    with lossd.Client(server.target, transport="local", retry_deadline=0) as client:
        one_step(client, session_name)
        assert client.transport == "local"
        assert client._connection.local is not None and client._connection.local.socket_path == str(alias)


def test_another_boot_id_means_another_host(
    server: EmbeddedServer, session_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_local, "boot_id", lambda: "other")
    attached = local_of(server).stats.attached
    with lossd.Client(server.target, retry_deadline=0) as client:
        one_step(client, session_name)
        assert client.transport == "grpc"
    with (
        lossd.Client(server.target, transport="local", retry_deadline=0) as client,
        pytest.raises(lossd.FailedPreconditionError, match="another host"),
    ):
        one_step(client, session_name)
    assert local_of(server).stats.attached == attached


# 3. Exactly once across a break ---------------------------------------------------------------------


def break_server_side(server: EmbeddedServer) -> None:
    local = local_of(server)
    with local._lock:
        connections = list(local._connections)
    assert connections
    for connection in connections:
        connection.shutdown(socket.SHUT_RDWR)


@pytest.mark.parametrize("side", ["client", "server"])
def test_a_resend_after_the_connection_broke_is_counted_once(own_server: EmbeddedServer, side: str) -> None:
    stats = local_of(own_server).stats
    with lossd.Client(own_server.target, transport="local", retry_deadline=10, timeout=10) as client:
        client.create_session("run", OLS)
        for seed in range(3):
            client.compute_loss("run", *batch(seed), epoch=0)
        first = client.compute_loss("run", *batch(10), request_id="same", epoch=0)
        assert client.get_session("run").samples_this_epoch == 4 * N
        if side == "client":
            assert client._connection.local is not None
            client._connection.local.close()
        else:
            break_server_side(own_server)
        again = client.compute_loss("run", *batch(10), request_id="same", epoch=0)
        assert client.transport == "local" and stats.attached == 2  # the resend went over a fresh attach
        assert torch.equal(again.loss, first.loss)
        assert again.scaled_grad is not None and first.scaled_grad is not None
        assert torch.equal(again.scaled_grad, first.scaled_grad) and again.grad_exponent == first.grad_exponent
        assert client.get_session("run").samples_this_epoch == 4 * N
        client.compute_loss("run", *batch(11), epoch=0)  # and the training goes on
        assert client.get_session("run").samples_this_epoch == 5 * N
        with lossd.Client(own_server.target, transport="grpc", retry_deadline=0) as other:
            over_grpc = other.compute_loss("run", *batch(10), request_id="same", epoch=0)
            assert torch.equal(over_grpc.loss, first.loss)
            assert over_grpc.scaled_grad is not None and torch.equal(over_grpc.scaled_grad, first.scaled_grad)
            assert other.get_session("run").samples_this_epoch == 5 * N


def test_a_reply_lost_mid_step_is_resent_and_counted_once(
    own_server: EmbeddedServer, compute_gate: ComputeGate
) -> None:
    """The connection breaks while the server computes: the step is applied, its reply cannot be sent,
    and the client's resend (same id, on a new attach) gets the original answer."""
    with lossd.Client(own_server.target, transport="local", retry_deadline=10, timeout=10) as client:
        client.create_session("run", OLS)
        compute_gate.release.set()
        client.compute_loss("run", *batch(0), epoch=0)
        compute_gate.release.clear()
        while compute_gate.entered.acquire(blocking=False):
            pass
        results: list[lossd.LossResult] = []
        stepping = threading.Thread(
            target=lambda: results.append(client.compute_loss("run", *batch(1), request_id="mid", epoch=0))
        )
        stepping.start()
        assert compute_gate.entered.acquire(timeout=10)  # the step is in the math
        break_server_side(own_server)
        time.sleep(0.1)  # the client sees the end of file and resends on a new attach
        compute_gate.release.set()
        stepping.join(timeout=20)
        assert results, "the step did not complete"
        assert client.get_session("run").samples_this_epoch == 2 * N
        with lossd.Client(own_server.target, transport="grpc", retry_deadline=0) as other:
            expected = other.compute_loss("run", *batch(1), request_id="mid", epoch=0)
        assert torch.equal(results[0].loss, expected.loss)
        assert client.get_session("run").samples_this_epoch == 2 * N
        assert local_of(own_server).stats.attached == 2


# 4./5. Server processes: SIGTERM and restart, kill -9 --------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Serve(Served):
    """`lossd serve` on ``port`` with a sqlite store and the local socket ``directory/l.sock``."""

    def __init__(self, port: int, directory: Path) -> None:
        self.socket = directory / "l.sock"
        super().__init__(directory, "--local-socket", str(self.socket), "--grace-seconds", "10", port=port)

    def stop(self, sig: signal.Signals) -> int:
        return self.kill(sig)


@pytest.fixture()
def serve(short_dir: Path) -> Iterator[Callable[[int], Serve]]:
    started: list[Serve] = []

    def start(port: int) -> Serve:
        served = Serve(port, short_dir)
        started.append(served)
        return served

    yield start
    for served in started:
        if served.process.poll() is None:
            served.stop(signal.SIGKILL)


def test_sigterm_and_restart_with_a_local_client_training(serve: Callable[[int], Serve]) -> None:
    port = free_port()
    first = serve(port)
    steps = 24
    with lossd.Client(first.target, transport="auto", retry_deadline=30, timeout=10) as client:
        client.create_session("run", OLS)
        client.compute_loss("run", *batch(0), request_id="step-0", epoch=0)
        assert client.transport == "local"
        assert segment_inodes() & segment_inodes(first.process.pid)  # both map the client's segment
        done: list[int] = []
        failed: list[BaseException] = []

        def train() -> None:
            try:
                for step in range(1, steps):
                    client.compute_loss("run", *batch(step), request_id=f"step-{step}", epoch=0)
                    done.append(step)
                    time.sleep(0.01)
            except BaseException as error:
                failed.append(error)

        trainer = threading.Thread(target=train)
        trainer.start()
        wait_until(lambda: len(done) >= 5 or bool(failed), "five steps")
        assert first.stop(signal.SIGTERM) == 0, "".join(first.log)
        assert not first.socket.exists()  # a clean stop removes its socket
        second = serve(port)
        trainer.join(timeout=60)
        assert not trainer.is_alive() and not failed, failed
        assert done == list(range(1, steps))
        info = client.get_session("run")
        assert (info.samples_this_epoch, info.samples_lost) == (steps * N, 0)  # nothing lost, nothing doubled
        client.compute_loss("run", *batch(steps), epoch=0)
        assert client.transport == "local"  # reattached to the new server's socket
        assert segment_inodes() & segment_inodes(second.process.pid)
        assert client.get_session("run").samples_this_epoch == (steps + 1) * N


CHILD = """
import os, sys, time, torch, lossd
torch.set_num_threads(1)
client = lossd.Client(sys.argv[1], transport="local", retry_deadline=0)
client.create_session(sys.argv[2], lossd.SessionSpec(kind="cross_entropy", n_classes=3))
client.compute_loss(sys.argv[2], torch.zeros(2, 3), torch.tensor([0, 1]))
maps = open("/proc/self/maps").read().splitlines()
inode = next(line.split()[4] for line in maps if "memfd:lossd-segment" in line)
print(os.getpid(), inode, "attached", flush=True)
time.sleep(600)
"""


def test_kill_9_of_a_client_frees_its_connection_and_segment_in_the_server(
    own_server: EmbeddedServer, session_name: str
) -> None:
    stats = local_of(own_server).stats
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, own_server.target, session_name], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        pid, inode, word = child.stdout.readline().split()
        assert (int(pid), word) == (child.pid, "attached")
        assert stats.open == 1 and int(inode) in segment_inodes()  # this process (the server) maps it
        assert int(inode) in memfd_descriptors()
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        wait_until(lambda: stats.open == 0, "the connection thread ended")
        wait_until(lambda: int(inode) not in segment_inodes(), "the segment unmapped")
        assert int(inode) not in memfd_descriptors()
        assert not memfd_descriptors() - segment_inodes()  # no memfd held that is not mapped
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
        if child.stdout is not None:
            child.stdout.close()


def test_kill_9_of_the_server_leaves_no_segment_and_a_restart_replaces_its_socket(
    serve: Callable[[int], Serve],
) -> None:
    port = free_port()
    first = serve(port)
    before = segment_inodes()
    client = lossd.Client(first.target, transport="local", retry_deadline=0.3, timeout=5)
    try:
        one_step(client, "run")
        mine = segment_inodes() - before
        assert len(mine) == 1 and mine <= segment_inodes(first.process.pid)
        assert mine <= memfd_descriptors() and mine == memfd_descriptors(first.process.pid)
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
        with pytest.raises(lossd.UnavailableError):
            client.compute_loss("run", *batch(2))
        assert not mine & (segment_inodes() | memfd_descriptors())  # the broken channel released it at once
    finally:
        client.close()
    del client
    gc.collect()
    assert not mine & (segment_inodes() | memfd_descriptors())
    assert stat.S_ISSOCK(first.socket.lstat().st_mode)  # kill -9 left the socket file behind
    second = serve(port)  # ... which the next server replaces
    raw_connect(str(second.socket)).close()
    with lossd.Client(second.target, transport="local", retry_deadline=0) as again:
        again.compute_loss("run", *batch(3))
        assert again.transport == "local"


# 6. Garbage and truncated headers -------------------------------------------------------------------


@pytest.fixture()
def raw(grpc_client: lossd.Client, session_name: str) -> Iterator[Raw]:
    grpc_client.create_session(session_name, CE)
    attached = raw_attach(grpc_client)
    yield attached
    attached.close()


GARBAGE: dict[str, Callable[[str], bytes]] = {
    "random bytes": lambda name: random.Random(1).randbytes(200),
    "short random bytes": lambda name: b"\x01\x02\x03",
    "empty-ish header": lambda name: bytes(wire.STEP.size),
    "header truncated by 1 byte": lambda name: step_message(name)[: wire.STEP.size - 1],
    "message truncated by 1 byte": lambda name: step_message(name, "id-1")[:-1],
    "message 1 byte too long": lambda name: step_message(name, "id-1") + b"x",
    "wrong magic": lambda name: step_message(name, magic=wire.ATTACH_MAGIC),
    "unknown flags": lambda name: step_message(name, flags=TRAIN | 64),
    "a second attach": lambda name: wire.ATTACH.pack(wire.ATTACH_MAGIC, 1, SEGMENT, bytes(32)),
    "longer than any message": lambda name: step_message(name, "x" * wire.MAX_MESSAGE),
}


@pytest.mark.parametrize("garbage", list(GARBAGE))
def test_garbage_gets_one_invalid_argument_then_the_end(raw: Raw, session_name: str, garbage: str) -> None:
    raw.connection.send(GARBAGE[garbage](session_name))
    code, message, _ = reply(raw.connection)
    assert code == Code.INVALID_ARGUMENT, message
    assert_closed(raw.connection)


WRONG_STEPS: dict[str, dict[str, int]] = {
    "logits dtype int64": dict(logits_code=4),
    "logits dtype 99": dict(logits_code=99),
    "labels dtype float32": dict(labels_code=1),
    "logits outside the segment": dict(logits_at=SEGMENT),
    "labels past the end": dict(labels_at=SEGMENT - 64),
    "misaligned labels": dict(labels_at=wire.align(N * C * 4) + 8),
    "an offset past 2**63": dict(logits_at=(1 << 64) - 64),
    "grad outside the segment": dict(grad_at=SEGMENT),
    "too little grad room": dict(grad_room=N * C * 4 - 1),
    "too little loss room": dict(loss_room=8 * N - 1),
    "a shape larger than the segment": dict(n=1 << 20, c=1 << 20),
    "negative n": dict(n=-1, grad_room=0, loss_room=0),
}


@pytest.mark.parametrize("wrong", list(WRONG_STEPS))
def test_a_wrong_step_is_answered_and_the_connection_stays(
    raw: Raw, grpc_client: lossd.Client, session_name: str, wrong: str
) -> None:
    raw.connection.send(step_message(session_name, "bad", **WRONG_STEPS[wrong]))
    code, message, _ = reply(raw.connection)
    assert code == Code.INVALID_ARGUMENT, message
    assert grpc_client.get_session(session_name).samples_this_epoch == 0
    # The next valid step works, with the numbers of the gRPC stream.
    logits, labels = batch(5)
    fill(raw, logits, labels)
    raw.connection.send(step_message(session_name, "good", flags=wire.NEED_GRAD))
    code, message, fields = reply(raw.connection)
    assert code == Code.OK, message
    expected = grpc_client.compute_loss(session_name, logits, labels, training=False)
    assert fields[10] == float(expected.loss) and fields[7] == N  # the scalar loss; n_used
    assert expected.scaled_grad is not None and fields[2] == expected.grad_exponent
    grad_offset = wire.STEP.unpack_from(step_message(session_name))[12]  # the layout's
    grad = torch.frombuffer(raw.segment, dtype=torch.float32, count=N * C, offset=grad_offset).view(N, C).clone()
    assert torch.equal(grad, expected.scaled_grad)


def test_a_step_on_an_unknown_session_or_rank_is_answered_and_the_connection_stays(raw: Raw, session_name: str) -> None:
    for message, code in (
        (step_message("no-such-session"), Code.NOT_FOUND),
        (step_message(session_name, rank=3), Code.INVALID_ARGUMENT),
        (step_message(session_name, "\xe9"), Code.INVALID_ARGUMENT),  # a request id that is not ASCII
        (step_message(session_name, flags=TRAIN | wire.HAS_EPOCH, epoch=5), Code.FAILED_PRECONDITION),
    ):
        raw.connection.send(message)
        assert reply(raw.connection)[0] == code
    fill(raw, *batch(1))
    raw.connection.send(step_message(session_name))
    assert reply(raw.connection)[0] == Code.OK


# 7. Attach refusals ---------------------------------------------------------------------------------


def refused_attach(
    path: str, ticket_bytes: bytes, fds: list[int], size: int, **options: int
) -> tuple[grpc.StatusCode, str]:
    connection = raw_connect(path)
    try:
        send_attach(connection, ticket_bytes, fds, size, **options)
        code, message, _ = reply(connection)
        assert_closed(connection)
        return code, message
    finally:
        connection.close()


def unsealed(size: int = SEGMENT, seals: int = 0) -> int:
    flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if seals else 0)
    fd = os.memfd_create("lossd-segment", flags)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def pipe() -> int:
    read, write = os.pipe()
    os.close(write)
    return read


def regular_file(directory: Path) -> int:
    path = directory / "segment"
    path.write_bytes(bytes(SEGMENT))
    return os.open(path, os.O_RDWR)


def no_fd(directory: Path) -> list[int]:
    return []


def sealed(directory: Path) -> list[int]:
    return [wire.create_segment(SEGMENT)]


SEGMENTS: dict[str, tuple[Callable[[Path], list[int]], int, grpc.StatusCode, str]] = {
    # name: (the descriptors sent, the size announced, the status, a word of the message)
    "an unsealed memfd": (lambda d: [unsealed()], SEGMENT, Code.INVALID_ARGUMENT, "sealed"),
    "a memfd sealed against shrinking only": (
        lambda d: [unsealed(seals=fcntl.F_SEAL_SHRINK)],
        SEGMENT,
        Code.INVALID_ARGUMENT,
        "sealed",
    ),
    "a regular file": (lambda d: [regular_file(d)], SEGMENT, Code.INVALID_ARGUMENT, "memfd"),
    "a pipe": (lambda d: [pipe()], SEGMENT, Code.INVALID_ARGUMENT, "memfd"),
    "a size larger than the segment": (sealed, 2 * SEGMENT, Code.INVALID_ARGUMENT, "bytes"),
    "a size smaller than the segment": (sealed, SEGMENT // 2, Code.INVALID_ARGUMENT, "bytes"),
    "a zero size": (sealed, 0, Code.INVALID_ARGUMENT, "bytes"),
    "no descriptor": (no_fd, SEGMENT, Code.INVALID_ARGUMENT, "one segment"),
    "two descriptors": (
        lambda d: [wire.create_segment(SEGMENT), wire.create_segment(SEGMENT)],
        SEGMENT,
        Code.INVALID_ARGUMENT,
        "one segment",
    ),
}  # fmt: skip


@pytest.mark.parametrize("segment", list(SEGMENTS))
def test_an_attach_with_a_wrong_segment_is_refused(
    server: EmbeddedServer, grpc_client: lossd.Client, tmp_path: Path, segment: str
) -> None:
    make, size, expected, word = SEGMENTS[segment]
    endpoint = ticket(grpc_client)
    refused = local_of(server).stats.refused
    fds = make(tmp_path)
    try:
        code, message = refused_attach(endpoint.socket_path, endpoint.ticket, fds, size)
    finally:
        for fd in fds:
            os.close(fd)
    assert code == expected and word in message, message
    assert local_of(server).stats.refused == refused + 1
    wait_until(lambda: not memfd_descriptors() - segment_inodes(), "the server closed the descriptors it was sent")


def test_tickets_are_checked_once_and_expire(
    server: EmbeddedServer, grpc_client: lossd.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(local_of(server).path)
    fd = wire.create_segment(SEGMENT)
    try:
        code, message = refused_attach(path, os.urandom(32), [fd], SEGMENT)
        assert code == Code.UNAUTHENTICATED, message
        # Used twice: the first attaches, the second is refused.
        endpoint = ticket(grpc_client)
        assert len(endpoint.ticket) == wire.TICKET_BYTES and endpoint.protocol_version == wire.PROTOCOL_VERSION
        assert endpoint.socket_path == path and endpoint.boot_id == _local.boot_id()
        first = raw_connect(path)
        send_attach(first, endpoint.ticket, [fd], SEGMENT)
        assert reply(first)[0] == Code.OK
        code, message = refused_attach(path, endpoint.ticket, [fd], SEGMENT)
        assert code == Code.UNAUTHENTICATED, message
        first.close()
        # Expired: tickets live ticket_ttl_seconds.
        monkeypatch.setattr(local_of(server)._tickets, "ttl", 0.05)
        endpoint = ticket(grpc_client)
        assert endpoint.ticket_ttl_seconds == pytest.approx(0.05)
        time.sleep(0.1)
        code, message = refused_attach(path, endpoint.ticket, [fd], SEGMENT)
        assert code == Code.UNAUTHENTICATED and "expired" in message, message
        # A wrong protocol version or magic is refused before the ticket is looked at.
        endpoint = ticket(grpc_client)
        assert refused_attach(path, endpoint.ticket, [fd], SEGMENT, version=2)[0] == Code.INVALID_ARGUMENT
        assert refused_attach(path, endpoint.ticket, [fd], SEGMENT, magic=wire.STEP_MAGIC)[0] == Code.INVALID_ARGUMENT
    finally:
        os.close(fd)


def test_a_segment_over_the_request_budget_is_resource_exhausted(session_name: str) -> None:
    with (
        EmbeddedServer(settings(request_memory_bytes=64 << 20)) as server,
        lossd.Client(server.target, transport="grpc", retry_deadline=0) as client,
    ):
        endpoint = ticket(client)
        assert endpoint.max_segment_bytes == 64 << 20
        fd = wire.create_segment(128 << 20)
        try:
            code, message = refused_attach(endpoint.socket_path, endpoint.ticket, [fd], 128 << 20)
        finally:
            os.close(fd)
        assert code == Code.RESOURCE_EXHAUSTED and "request_memory_bytes" in message, message
        # The budget itself is accepted.
        fd = wire.create_segment(64 << 20)
        try:
            endpoint = ticket(client)
            connection = raw_connect(endpoint.socket_path)
            send_attach(connection, endpoint.ticket, [fd], 64 << 20)
            assert reply(connection)[0] == Code.OK
            connection.close()
        finally:
            os.close(fd)
        # A batch that needs more than the budget: transport="local" says so rather than falling back.
        with lossd.Client(server.target, transport="local", retry_deadline=0) as local:
            logits = torch.zeros(16, (65 << 20) // 64)
            with pytest.raises(lossd.ResourceExhaustedError, match="request_memory_bytes"):
                local.compute_loss(session_name, logits, torch.zeros(16, dtype=torch.int64))


def test_a_connection_that_never_attaches_is_closed(
    own_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = local_of(own_server)
    monkeypatch.setattr(local, "_attach_timeout", 0.2)
    started = time.monotonic()
    connection = raw_connect(str(local.path))
    try:
        code, message, _ = reply(connection)
        assert code == Code.INVALID_ARGUMENT and "in time" in message, message
        assert_closed(connection)
    finally:
        connection.close()
    assert time.monotonic() - started < 5
    wait_until(lambda: local.stats.open == 0, "the connection thread ended")


# 8. Tenants -----------------------------------------------------------------------------------------


def test_a_local_client_cannot_reach_another_tenants_session(tmp_path: Path) -> None:
    with EmbeddedServer(settings(token_file=token_file(tmp_path))) as server:
        connection: dict[str, Any] = dict(retry_deadline=0, timeout=10)
        with lossd.Client(server.target, token=ALICE, transport="local", **connection) as alice:
            one_step(alice, "alices", OLS)
            assert alice.transport == "local"
            for transport in ("local", "grpc"):
                with lossd.Client(server.target, token=BOB, transport=transport, **connection) as bob:
                    with pytest.raises(lossd.NotFoundError):
                        bob.compute_loss("alices", *batch(2))
                    assert bob.transport == transport
                    # Bob's own session of that name is his, and Alice's is left alone.
                    bob.create_session("alices", CE)
                    bob.compute_loss("alices", *batch(3))
                    bob.delete_session("alices")
            assert alice.get_session("alices").samples_this_epoch == N
            # Without a token there is no ticket; Bob's ticket attaches as Bob, whoever sends it.
            with lossd.Client(server.target, token="", transport="grpc", **connection) as anonymous:
                with pytest.raises(lossd.UnauthenticatedError):
                    anonymous.compute_loss("alices", *batch(2))
                with pytest.raises(grpc.RpcError) as refused:
                    ticket(anonymous)
                assert refused.value.code() == Code.UNAUTHENTICATED  # type: ignore[attr-defined]
            with lossd.Client(server.target, token=BOB, transport="grpc", **connection) as bob:
                as_bob = raw_attach(bob)
            try:
                as_bob.connection.send(step_message("alices"))
                assert reply(as_bob.connection)[0] == Code.NOT_FOUND
            finally:
                as_bob.close()
            assert alice.get_session("alices").samples_this_epoch == N


# 9. Drain --------------------------------------------------------------------------------------------


def test_stop_waits_for_a_local_step_in_flight(compute_gate: ComputeGate) -> None:
    server = EmbeddedServer(settings()).start()
    try:
        client = lossd.Client(server.target, transport="local", retry_deadline=1, timeout=10)
        compute_gate.release.set()
        one_step(client, "run", OLS)
        compute_gate.release.clear()
        while compute_gate.entered.acquire(blocking=False):
            pass
        running = server._running
        assert running is not None and running.store is not None
        session = running.store.get("", "run")
        outcome: list[Any] = []
        stepping = threading.Thread(target=lambda: outcome.append(_outcome(lambda: client.compute_loss(
            "run", *batch(2), request_id="in-flight"))))  # fmt: skip
        stepping.start()
        assert compute_gate.entered.acquire(timeout=10)
        stopping = threading.Thread(target=server.stop)
        stopping.start()
        time.sleep(0.3)
        assert stopping.is_alive(), "stop() did not wait for the step in flight"
        assert session.samples_this_epoch == N
        compute_gate.release.set()
        stepping.join(timeout=10)
        stopping.join(timeout=20)
        assert not stopping.is_alive() and not stepping.is_alive()
        assert session.samples_this_epoch == 2 * N  # the step ran to the end, once
        # Its reply usually reaches the client; that it always does is the next test.
        assert isinstance(outcome[0], lossd.LossResult | lossd.UnavailableError), outcome
        if isinstance(outcome[0], lossd.LossResult):
            assert outcome[0].n_used == N
        with pytest.raises(lossd.UnavailableError):  # the next step finds no server
            client.compute_loss("run", *batch(3))
        client.close()
    finally:
        server.stop()


def test_stop_waits_until_the_reply_of_a_step_in_flight_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    """As above, with the scheduling gap between the end of the math and the reply's send made 0.5 s."""
    sending, original = threading.Event(), socket.socket.send
    slow = threading.Event()

    def send(self: socket.socket, data: Any, *args: Any) -> int:
        if slow.is_set() and threading.current_thread().name == "lossd-local" and bytes(data[:4]) == REPLY_MAGIC:
            sending.set()
            time.sleep(0.5)
        return original(self, data, *args)

    monkeypatch.setattr(socket.socket, "send", send)
    server = EmbeddedServer(settings()).start()
    try:
        with lossd.Client(server.target, transport="local", retry_deadline=1, timeout=10) as client:
            one_step(client, "run", OLS)
            slow.set()
            results: list[Any] = []
            stepping = threading.Thread(
                target=lambda: results.append(_outcome(lambda: client.compute_loss("run", *batch(2))))
            )
            stepping.start()
            assert sending.wait(timeout=10)  # the step was applied; its reply is on its way
            server.stop()
            stepping.join(timeout=20)
            assert results and isinstance(results[0], lossd.LossResult), results
    finally:
        server.stop()


REPLY_MAGIC = wire.REPLY_MAGIC.to_bytes(4, "little")


def _outcome(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except Exception as error:
        return error
