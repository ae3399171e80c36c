"""Shared fixtures: a real lossd server on 127.0.0.1 (an ephemeral port), stopped after the tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import torch

import lossd
from lossd_server.config import Settings
from lossd_server.embedded import EmbeddedServer

# Two cores: keep torch from oversubscribing them next to the server's workers.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def server() -> Iterator[EmbeddedServer]:
    with EmbeddedServer(Settings(host="127.0.0.1", port=0, device="cpu", workers=4, grace_seconds=1)) as running:
        yield running


@pytest.fixture()
def client(server: EmbeddedServer) -> Iterator[lossd.Client]:
    with lossd.Client(server.target) as connected:
        yield connected


@pytest.fixture()
def session_name() -> str:
    """A fresh session name per test, so tests sharing the server never collide."""
    return f"test-{uuid.uuid4().hex[:12]}"
