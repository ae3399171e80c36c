"""The durability promise, tested against real `lossd serve` processes killed with SIGKILL or SIGTERM.

The oracle is the server's own state read just before the kill: what the promise
says survives must come back bit for bit, and what it says may be lost must be
reported in ``samples_lost``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import lossd
from lossd import SessionSpec
from tests.conftest import ols_spec

C, N = 10, 32
SPEC = ols_spec(C)


class Served:
    """A `lossd serve` process on a free loopback port, reading its log so the pipe never fills."""

    def __init__(self, state_dir: Path, *flags: str, port: int = 0) -> None:
        command = [sys.executable, "-m", "lossd_server", "serve", "--host", "127.0.0.1", "--port", str(port)]
        command += ["--device", "cpu", "--workers", "2", "--store", "sqlite", "--state-dir", str(state_dir), *flags]
        env = {**os.environ, "LOSSD_TORCH_THREADS": "1"}
        self.process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        assert self.process.stderr is not None
        self.log: list[str] = []
        for _ in range(50):
            line = self.process.stderr.readline()
            self.log.append(line)
            match = re.search(r"serving on (127\.0\.0\.1:\d+) ", line)
            if match or not line:
                break
        assert match, "".join(self.log)
        self.target = match.group(1)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> int:
        self.process.send_signal(sig)
        code = self.process.wait(timeout=30)
        self._reader.join(timeout=10)
        assert self.process.stderr is not None
        self.process.stderr.close()
        return code


def start(servers: list[Served], state_dir: Path, *flags: str) -> Served:
    served = Served(state_dir, *flags)
    servers.append(served)
    return served


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (N,), generator=generator)
    logits = torch.randn(N, C, generator=generator) + 2.5 * torch.nn.functional.one_hot(labels, C)
    return logits, labels


def train(client: lossd.Client, name: str, seeds: range, epoch: int) -> None:
    for seed in seeds:
        logits, labels = batch(seed)
        client.compute_loss(name, logits, labels, epoch=epoch)


def assert_same_state(actual: lossd.SessionState, expected: lossd.SessionState) -> None:
    assert actual.epoch == expected.epoch
    assert actual.samples_this_epoch == expected.samples_this_epoch
    torch.testing.assert_close(actual.supervise, expected.supervise, rtol=0, atol=0)
    torch.testing.assert_close(actual.accumulator, expected.accumulator, rtol=0, atol=0)
    torch.testing.assert_close(actual.counts, expected.counts, rtol=0, atol=0)


def wait_for_snapshot(client: lossd.Client, name: str) -> None:
    """Until a snapshot covers the session's last change: its statistics are read under the lock
    after that change (which set updated_at), so snapshot_at >= updated_at says it holds everything."""
    deadline = time.monotonic() + 10
    while True:
        info = client.get_session(name)
        if info.snapshot_at >= info.updated_at:
            return
        assert time.monotonic() < deadline, "no snapshot within 10 s"
        time.sleep(0.02)


def test_kill_9_mid_epoch_keeps_finished_epochs_and_reports_the_lost_samples(
    servers: list[Served], tmp_path: Path
) -> None:
    first = start(servers, tmp_path, "--snapshot-seconds", "3600")  # no periodic snapshot: epoch 1 is all lost
    with lossd.Client(first.target, retry_deadline=0) as client:
        client.create_session("run", SPEC)
        train(client, "run", range(3), epoch=0)
        client.next_epoch("run", 0)
        after_epoch = client.get_state("run")
        probe = batch(99)
        expected_loss = client.compute_loss("run", *probe, training=False).loss
        train(client, "run", range(3, 5), epoch=1)
        assert client.get_session("run").samples_this_epoch == 2 * N
    first.kill()

    second = start(servers, tmp_path)
    with lossd.Client(second.target, retry_deadline=0) as client:
        info = client.get_session("run")
        assert (info.epoch, info.samples_this_epoch, info.samples_lost) == (1, 0, 2 * N)
        assert_same_state(client.get_state("run"), after_epoch)
        restored_loss = client.compute_loss("run", *probe, training=False).loss
        torch.testing.assert_close(restored_loss, expected_loss, rtol=0, atol=0)
        # The loss is reported once, not again at the next restart; a finished epoch clears it.
        train(client, "run", range(5, 6), epoch=1)
        assert client.get_session("run").samples_lost == 2 * N
        client.next_epoch("run", 1)
        assert client.get_session("run").samples_lost == 0
    assert "lost in a crash" in "".join(second.log)


def test_kill_9_after_a_snapshot_restores_the_statistics_and_answers_a_resend_without_recounting(
    servers: list[Served], tmp_path: Path
) -> None:
    first = start(servers, tmp_path, "--snapshot-seconds", "0.05")
    with lossd.Client(first.target, retry_deadline=0) as client:
        client.create_session("run", SPEC)
        train(client, "run", range(3), epoch=0)
        last = batch(3)
        original = client.compute_loss("run", *last, epoch=0, request_id="step-3")
        before = client.get_state("run")
        wait_for_snapshot(client, "run")
    first.kill()

    second = start(servers, tmp_path)
    with lossd.Client(second.target, retry_deadline=0) as client:
        assert client.get_session("run").samples_lost == 0
        assert_same_state(client.get_state("run"), before)
        # The response to step-3 was "lost": the client resends it under the same id.
        resent = client.compute_loss("run", *last, epoch=0, request_id="step-3")
        torch.testing.assert_close(resent.loss, original.loss, rtol=0, atol=0)
        assert resent.grad is not None and original.grad is not None
        torch.testing.assert_close(resent.grad, original.grad, rtol=0, atol=0)
        assert (resent.n_used, resent.n_correct, resent.epoch) == (original.n_used, original.n_correct, 0)
        assert_same_state(client.get_state("run"), before)  # counted once


def test_kill_9_right_after_next_epoch_keeps_the_new_epoch(servers: list[Served], tmp_path: Path) -> None:
    first = start(servers, tmp_path, "--snapshot-seconds", "3600")
    with lossd.Client(first.target, retry_deadline=0) as client:
        client.create_session("run", SPEC)
        train(client, "run", range(4), epoch=0)
        assert client.next_epoch("run", 0).epoch == 1
        after_epoch = client.get_state("run")
    first.kill()  # acknowledged, so it must be on disk

    second = start(servers, tmp_path)
    with lossd.Client(second.target, retry_deadline=0) as client:
        assert_same_state(client.get_state("run"), after_epoch)
        assert client.get_session("run").samples_lost == 0
        # A repeat of the acknowledged call (a client that never saw the answer) does not advance again.
        assert client.next_epoch("run", 0).epoch == 1


def test_sigterm_snapshots_every_accumulator_and_sessions_come_back_as_they_were(
    servers: list[Served], tmp_path: Path
) -> None:
    first = start(servers, tmp_path, "--snapshot-seconds", "3600")
    stateless = SessionSpec(kind="label_smoothing", n_classes=C, smoothing=0.2, convention="uniform")
    with lossd.Client(first.target, retry_deadline=0) as client:
        client.create_session("run", SPEC)
        client.create_session("ls", stateless)
        train(client, "run", range(5), epoch=0)
        before = client.get_state("run")
        names = [info.name for info in client.list_sessions()]
    assert first.kill(signal.SIGTERM) == 0

    second = start(servers, tmp_path)
    with lossd.Client(second.target, retry_deadline=0) as client:
        assert [info.name for info in client.list_sessions()] == names
        assert client.get_session("run").samples_lost == 0
        assert_same_state(client.get_state("run"), before)
        # The spec round-trips exactly: get-or-create with the same spec finds the session.
        assert client.create_session("run", SPEC)[1] is False
        assert client.create_session("ls", stateless)[1] is False
        with pytest.raises(lossd.AlreadyExistsError, match="alpha"):
            client.create_session("run", SessionSpec(**{**SPEC.__dict__, "alpha": 0.9}))
