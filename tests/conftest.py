"""Shared fixtures: a real lossd server on 127.0.0.1 (an ephemeral port), stopped after the tests."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import torch

import lossd
from lossd_server.config import Settings
from lossd_server.embedded import EmbeddedServer

# Two cores: keep torch from oversubscribing them next to the server's workers.
torch.set_num_threads(1)


# LOSSD_TEST_DEVICE=cuda runs the whole suite against a server computing on the GPU.
TEST_DEVICE = os.environ.get("LOSSD_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def server() -> Iterator[EmbeddedServer]:
    settings = Settings(host="127.0.0.1", port=0, device=TEST_DEVICE, workers=4, grace_seconds=1)
    with EmbeddedServer(settings) as running:
        yield running


@pytest.fixture()
def client(server: EmbeddedServer) -> Iterator[lossd.Client]:
    with lossd.Client(server.target) as connected:
        yield connected


@pytest.fixture()
def session_name() -> str:
    """A fresh session name per test, so tests sharing the server never collide."""
    return f"test-{uuid.uuid4().hex[:12]}"
