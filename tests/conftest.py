"""Shared fixtures: a real lossd server on 127.0.0.1 (an ephemeral port), stopped after the tests."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

# Without a GPU, Triton's interpreter runs lossd's Triton kernels on the CPU, so CI checks their numbers.
# Triton reads this when a kernel is defined, so it is set before anything imports lossd._fused_triton
# (tests._kernels below does).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lossd
from lossd_server import session as session_module
from lossd_server.config import Settings
from lossd_server.embedded import EmbeddedServer
from tests._kernels import KERNEL_PARAMS, Kernel, kernel_of

# Two cores: keep torch from oversubscribing them next to the server's workers.
torch.set_num_threads(1)


# LOSSD_TEST_DEVICE=cuda runs the whole suite against a server computing on the GPU.
TEST_DEVICE = os.environ.get("LOSSD_TEST_DEVICE", "cpu")

# Servers a test starts without choosing a store keep their sessions in memory, so no
# test writes to the real state directory (~/.local/state/lossd) or sees another's sessions.
os.environ["LOSSD_STORE"] = "memory"
# ... and their default local-transport sockets (lossd-PORT.sock in the state directory) go here, too.
_STATE_DIR = tempfile.mkdtemp(prefix="lossd-tests-")
os.environ["LOSSD_STATE_DIR"] = _STATE_DIR
atexit.register(shutil.rmtree, _STATE_DIR, ignore_errors=True)


@pytest.fixture(params=KERNEL_PARAMS)
def kernel(request: pytest.FixtureRequest) -> Kernel:
    """Each loss kernel the pure functions can run (a test taking it runs once per kernel)."""
    return kernel_of(request.param)


@pytest.fixture(scope="session")
def eager_server() -> Iterator[EmbeddedServer]:
    """A server on the eager math, beside the shared one on the default (the fused kernel)."""
    settings = Settings(host="127.0.0.1", port=0, device=TEST_DEVICE, workers=4, grace_seconds=1, math_kernel="eager")
    with EmbeddedServer(settings) as running:
        yield running


@pytest.fixture(params=["fused", "eager"])
def kernel_client(request: pytest.FixtureRequest) -> Iterator[lossd.Client]:
    """A client of a server on each math kernel: the shared server (fused, its default) and the eager one."""
    running: EmbeddedServer = request.getfixturevalue("server" if request.param == "fused" else "eager_server")
    with lossd.Client(running.target, barrier_timeout=30) as connected:
        yield connected


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """The shared server runs the default durable store, so every test also exercises it."""
    settings = Settings(
        host="127.0.0.1",
        port=0,
        device=TEST_DEVICE,
        workers=4,
        grace_seconds=1,
        store="sqlite",
        state_dir=tmp_path_factory.mktemp("state"),
    )
    with EmbeddedServer(settings) as running:
        yield running


def ols_spec(n_classes: int) -> lossd.SessionSpec:
    """The spec an ``OnlineLabelSmoothing(0.5, n_classes)`` module creates, with every default filled in."""
    return lossd.SessionSpec(
        kind="online_label_smoothing",
        n_classes=n_classes,
        smoothing=0.1,
        convention="off_target",
        alpha=0.5,
        init="label_smoothing",
        empty_class="keep",
    )


@pytest.fixture()
def client(server: EmbeddedServer) -> Iterator[lossd.Client]:
    with lossd.Client(server.target, barrier_timeout=30) as connected:
        yield connected


@pytest.fixture()
def session_name() -> str:
    """A fresh session name per test, so tests sharing the server never collide."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture()
def servers() -> Iterator[list[Any]]:
    """`lossd serve` child processes a test starts (tests.test_durability.start); killed at its end."""
    started: list[Any] = []
    yield started
    for served in started:
        if served.process.poll() is None:
            served.kill()


@dataclass
class ComputeGate:
    """Holds every Session.compute call until :attr:`release` is set; :attr:`entered` counts arrivals."""

    entered: threading.Semaphore
    release: threading.Event


@pytest.fixture()
def compute_gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[ComputeGate]:
    gate = ComputeGate(threading.Semaphore(0), threading.Event())
    original = session_module.Session.compute

    def gated(self: session_module.Session, *args: Any, **kwargs: Any) -> Any:
        gate.entered.release()
        gate.release.wait(timeout=30)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(session_module.Session, "compute", gated)
    yield gate
    gate.release.set()
