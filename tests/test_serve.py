"""`lossd serve` as a process: settings, the standard services, message limits and graceful shutdown."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import lossd
from lossd_server import cli
from lossd_server.config import Settings
from lossd_server.embedded import EmbeddedServer
from tests.conftest import ComputeGate


@pytest.fixture()
def served() -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A `lossd serve` process on an ephemeral loopback port, configured partly by environment."""
    env = {**os.environ, "LOSSD_DEVICE": "cpu", "LOSSD_WORKERS": "2", "LOSSD_TORCH_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "lossd_server", "serve", "--host", "127.0.0.1", "--port", "0", "--grace-seconds", "30"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    lines = []
    for _ in range(20):  # the store logs what it loaded before the server says where it serves
        lines.append(process.stderr.readline())
        match = re.search(r"serving on (127\.0\.0\.1:\d+) \(device=cpu", lines[-1])
        if match or not lines[-1]:
            break
    assert match, f"unexpected start-up lines: {lines!r}"
    try:
        yield process, match.group(1)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        process.stderr.close()


def test_serve_logs_address_device_version_and_answers_health(served: tuple[subprocess.Popen[str], str]) -> None:
    _, target = served
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "lossd.v1.LossService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_and_describes_the_service(served: tuple[subprocess.Popen[str], str]) -> None:
    _, target = served
    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="lossd.v1.LossService"),
        ]
        listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=5))
    names = {service.name for service in listed.list_services_response.service}
    assert {"lossd.v1.LossService", "grpc.health.v1.Health"} <= names
    assert described.file_descriptor_response.file_descriptor_proto


def test_sigterm_drains_and_exits_cleanly(served: tuple[subprocess.Popen[str], str]) -> None:
    process, target = served
    with lossd.Client(target) as client:
        client.create_session("run", lossd.SessionSpec(kind="cross_entropy", n_classes=3))
        result = client.compute_loss("run", torch.zeros(2, 3), torch.tensor([0, 1]))  # leaves a stream open
        assert result.n_used == 2
        process.send_signal(signal.SIGTERM)
        # An idle stream is not work in flight: it must not hold shutdown up for the 30 s grace.
        assert process.wait(timeout=10) == 0
    assert process.stderr is not None
    log = process.stderr.read()
    assert "draining" in log and "stopped" in log


def test_stop_lets_a_call_in_flight_finish(compute_gate: ComputeGate) -> None:
    server = EmbeddedServer(Settings(port=0, device="cpu", grace_seconds=10)).start()
    client = lossd.Client(server.target)
    client.create_session("drain", lossd.SessionSpec(kind="cross_entropy", n_classes=3))
    outcome: dict[str, object] = {}

    def call() -> None:
        outcome["result"] = client.compute_loss("drain", torch.zeros(2, 3), torch.tensor([0, 1]), stream=False)

    caller = threading.Thread(target=call)
    caller.start()
    assert compute_gate.entered.acquire(timeout=10)
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    compute_gate.release.set()
    caller.join(timeout=30)
    stopper.join(timeout=30)
    client.close()
    assert isinstance(outcome.get("result"), lossd.LossResult)


def test_messages_above_grpc_default_4mib_pass(client: lossd.Client, session_name: str) -> None:
    client.create_session(session_name, lossd.SessionSpec(kind="cross_entropy", n_classes=1000))
    logits = torch.randn(1200, 1000)  # 4.8 MB of float32
    result = client.compute_loss(session_name, logits, torch.randint(0, 1000, (1200,)))
    assert result.grad is not None and result.grad.shape == (1200, 1000)


def test_server_message_limit_is_configurable() -> None:
    settings = Settings(port=0, device="cpu", max_message_bytes=4 << 20)
    with EmbeddedServer(settings) as server, lossd.Client(server.target) as client:
        client.create_session("small", lossd.SessionSpec(kind="cross_entropy", n_classes=1000))
        with pytest.raises(lossd.ResourceExhaustedError):
            client.compute_loss("small", torch.randn(1200, 1000), torch.zeros(1200, dtype=torch.long), stream=False)


def test_environment_settings_and_flag_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOSSD_WORKERS", "3")
    monkeypatch.setenv("LOSSD_PORT", "6000")
    assert Settings().workers == 3
    assert Settings(port=7000).port == 7000  # a flag beats the environment


@pytest.mark.parametrize("argv", [["serve", "--device", "tpu"], ["serve", "--port", "70000"]])
def test_invalid_settings_exit_with_a_message(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    assert "invalid settings" in capsys.readouterr().err


def test_cuda_requested_without_cuda_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    assert cli.main(["serve", "--port", "0", "--device", "cuda"]) == 1
    assert "CUDA is not available" in capsys.readouterr().err


def test_malloc_tuning_applies_on_glibc() -> None:
    # In a child process, so this test process keeps glibc's defaults.
    code = "from lossd._malloc import tune_malloc; import sys; sys.exit(0 if tune_malloc() else 1)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_boolean_settings_parse_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOSSD_TUNE_MALLOC", "false")
    assert Settings().tune_malloc is False
    assert Settings(tune_malloc="true").tune_malloc is True  # type: ignore[arg-type]  # as argparse passes it


def test_work_arriving_while_draining_is_refused_and_not_applied(compute_gate: ComputeGate) -> None:
    server = EmbeddedServer(Settings(port=0, device="cpu", grace_seconds=10)).start()
    spec = lossd.SessionSpec(kind="online_label_smoothing", n_classes=3, alpha=0.5)
    busy, late = lossd.Client(server.target), lossd.Client(server.target, retry_deadline=0)
    busy.create_session("drain", spec)
    running = server._running
    assert running is not None
    logits, labels = torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([0])
    finished: dict[str, lossd.LossResult] = {}
    caller = threading.Thread(target=lambda: finished.setdefault("busy", busy.compute_loss("drain", logits, labels)))
    caller.start()
    assert compute_gate.entered.acquire(timeout=10)  # busy's request is now in flight
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    deadline = time.monotonic() + 10
    while not running.servicer.draining and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(lossd.UnavailableError, match="shutting down"):
        late.compute_loss("drain", logits, labels)
    compute_gate.release.set()
    caller.join(timeout=30)
    stopper.join(timeout=30)
    busy.close()
    late.close()
    assert finished["busy"].n_correct == 1  # the call in flight finished
    session = running.servicer._store.get("", "drain")
    assert session.samples_this_epoch == 1  # the refused call was never applied
