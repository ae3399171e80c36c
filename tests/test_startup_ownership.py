"""Who owns what at start-up and shutdown: the port, the saved statistics, the secret and state files.

- a second server on a busy port exits 1 with one line, rather than sharing the port (SO_REUSEPORT);
- a shutdown whose final save fails is not reported as a clean exit;
- a token file or state directory other users can read or write is named in a WARNING;
- unknown bearer tokens are logged at a bounded rate.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import lossd
from lossd._exceptions import UnauthenticatedError
from lossd_server import app, auth
from lossd_server.auth import BearerAuth, load_tokens
from lossd_server.embedded import EmbeddedServer
from tests._security import ALICE, settings, start_error, token_file
from tests.conftest import ols_spec

SERVE = [sys.executable, "-m", "lossd_server", "serve", "--host", "127.0.0.1", "--device", "cpu", "--workers", "1"]
# Patches the child's StateDB so every statistics snapshot fails, as on a full disk, then runs `lossd`.
FULL_DISK_SERVE = (
    "import sqlite3, sys\n"
    "from lossd_server import cli, statedb\n"
    "def full(*args, **kwargs):\n"
    "    raise sqlite3.OperationalError('database or disk is full')\n"
    "statedb.StateDB.put_statistics = full\n"
    "sys.exit(cli.main(sys.argv[1:]))\n"
)
ENV = {**os.environ, "LOSSD_TORCH_THREADS": "1"}


class Child:
    """A `lossd serve` child process: started, read up to its "serving on" line, then read in the background."""

    def __init__(self, argv: list[str]) -> None:
        self.process = subprocess.Popen(argv, env=ENV, stderr=subprocess.PIPE, text=True)
        assert self.process.stderr is not None
        self.log: list[str] = []
        match = None
        for _ in range(50):
            line = self.process.stderr.readline()
            self.log.append(line)
            match = re.search(r"serving on (127\.0\.0\.1):(\d+) ", line)
            if match or not line:
                break
        if match is None:
            self.stop()
            pytest.fail("no 'serving on' line:\n" + "".join(self.log))
        self.target, self.port = f"{match.group(1)}:{match.group(2)}", int(match.group(2))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(timeout=10)
        if hasattr(self, "_reader"):
            self._reader.join(timeout=10)
        assert self.process.stderr is not None
        self.process.stderr.close()
        return code


@pytest.fixture()
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:
        if child.process.poll() is None:
            child.stop(signal.SIGKILL)


def refused_start(*flags: str) -> tuple[int, str]:
    """Run `lossd serve` that must fail to start: its exit status and its whole stderr."""
    result = subprocess.run([*SERVE, *flags], env=ENV, capture_output=True, text=True, timeout=60)
    return result.returncode, result.stderr


# A busy port ---------------------------------------------------------------------------------------


def test_a_second_server_on_a_served_port_exits_1_with_one_line(children: list[Child], tmp_path: Path) -> None:
    first = Child([*SERVE, "--port", "0", "--store", "sqlite", "--state-dir", str(tmp_path / "first")])
    children.append(first)
    code, err = refused_start("--port", str(first.port), "--store", "sqlite", "--state-dir", str(tmp_path / "second"))
    assert code == 1
    assert err.splitlines() == [
        f"lossd serve: could not bind 127.0.0.1:{first.port}: the port is in use (is another lossd server running?)"
    ]
    assert not (tmp_path / "second").exists()  # refused before the store was created
    with lossd.Client(first.target, retry_deadline=0) as client:  # the first still owns the port
        client.create_session("still-mine", lossd.SessionSpec(kind="cross_entropy", n_classes=3))
    assert first.stop() == 0


def test_a_port_another_program_listens_on_makes_lossd_serve_exit_1() -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        code, err = refused_start("--port", str(port), "--store", "memory")
    assert code == 1
    assert err.splitlines() == [
        f"lossd serve: could not bind 127.0.0.1:{port}: the port is in use (is another lossd server running?)"
    ]


def test_grpc_itself_refuses_to_share_the_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the probe (a server that binds between the probe and gRPC) gRPC must still refuse:
    it sets SO_REUSEPORT unless told not to, and then both servers would serve the port."""
    monkeypatch.setattr(app, "_refuse_busy_port", lambda host, port: None)

    async def attempt() -> None:
        first = await app.start(settings())
        try:
            with pytest.raises(OSError, match=rf"could not bind 127\.0\.0\.1:{first.port}"):
                await app.start(settings(port=first.port))
        finally:
            await first.stop(0)

    asyncio.run(attempt())


# A save that fails at shutdown ---------------------------------------------------------------------


def _train_one_batch(target: str, name: str) -> None:
    with lossd.Client(target, retry_deadline=0) as client:
        client.create_session(name, ols_spec(3))
        client.compute_loss(name, torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0]]), torch.tensor([0, 1]))


def test_a_failed_save_at_shutdown_raises_after_releasing_the_state_directory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = settings(store="sqlite", state_dir=tmp_path, snapshot_seconds=3600)
    server = EmbeddedServer(config).start()
    try:
        _train_one_batch(server.target, "unsaved")
        running = server._running
        assert running is not None and running.store is not None

        def full(*args: Any, **kwargs: Any) -> None:
            raise sqlite3.OperationalError("database or disk is full")

        # On this server's database only, so the suite's shared server keeps saving.
        monkeypatch.setattr(running.store._db, "put_statistics", full)  # type: ignore[attr-defined]
        caplog.set_level(logging.ERROR, logger="lossd_server")
    except BaseException:
        server.stop()
        raise
    with pytest.raises(OSError, match=r"statistics of sessions \['unsaved'\] could not be saved at shutdown"):
        server.stop()
    assert not server._thread.is_alive()  # the loop was stopped all the same
    assert any(
        r.levelno == logging.ERROR
        and "could not be saved at shutdown" in r.getMessage()
        and "unsaved" in r.getMessage()
        for r in caplog.records
    )
    monkeypatch.undo()
    # The database and the directory lock were released: the next server opens the store, and the
    # session is there again (from its creation; the batch was the part that could not be saved).
    with EmbeddedServer(config) as again, lossd.Client(again.target, retry_deadline=0) as client:
        info = client.get_session("unsaved")
        assert info.samples_this_epoch == 0 and info.samples_lost == 2


def test_embedded_stop_without_a_failure_still_returns_quietly(tmp_path: Path) -> None:
    server = EmbeddedServer(settings(store="sqlite", state_dir=tmp_path)).start()
    _train_one_batch(server.target, "saved")
    server.stop()  # no exception: every statistic was saved


def test_lossd_serve_exits_1_when_the_final_save_fails(children: list[Child], tmp_path: Path) -> None:
    argv = [sys.executable, "-c", FULL_DISK_SERVE, *SERVE[3:]]
    child = Child(
        [*argv, "--port", "0", "--store", "sqlite", "--state-dir", str(tmp_path), "--snapshot-seconds", "3600"]
    )
    children.append(child)
    _train_one_batch(child.target, "run")
    assert child.stop() == 1
    log = "".join(child.log)
    assert re.search(r"ERROR.*statistics of sessions \['run'\] could not be saved at shutdown", log), log
    assert child.log[-1].startswith("lossd serve: statistics of sessions ['run'] could not be saved at shutdown")
    assert "Traceback" not in log.split("could not be saved at shutdown")[-1]  # the exit itself is one line


def test_lossd_serve_exits_0_after_a_clean_sigterm(children: list[Child], tmp_path: Path) -> None:
    child = Child([*SERVE, "--port", "0", "--store", "sqlite", "--state-dir", str(tmp_path)])
    children.append(child)
    _train_one_batch(child.target, "run")
    assert child.stop() == 0


# Permissions ---------------------------------------------------------------------------------------


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def _start_and_stop(config: Any) -> None:
    async def run() -> None:
        running = await app.start(config)
        await running.stop(0)

    asyncio.run(run())


@pytest.mark.parametrize("mode", [0o644, 0o444, 0o640], ids=oct)
def test_a_token_file_others_can_read_is_named_in_a_warning(
    mode: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = token_file(tmp_path)
    path.chmod(mode)
    caplog.set_level(logging.WARNING, logger="lossd_server")
    _start_and_stop(settings(token_file=path))
    [warning] = [w for w in _warnings(caplog) if "token file" in w]
    assert str(path) in warning and f"mode {mode:04o}" in warning and "chmod 600" in warning


def test_a_private_token_file_and_state_directory_log_no_permission_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    caplog.set_level(logging.WARNING, logger="lossd_server")
    _start_and_stop(settings(token_file=token_file(tmp_path), store="sqlite", state_dir=state))
    assert not [w for w in _warnings(caplog) if "mode" in w]


def test_a_state_directory_others_can_write_is_named_in_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    caplog.set_level(logging.WARNING, logger="lossd_server")
    _start_and_stop(settings(store="sqlite", state_dir=state))
    [warning] = [w for w in _warnings(caplog) if "state directory" in w]
    assert str(state) in warning and "mode 0777" in warning


def test_a_new_state_directory_is_created_private_without_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "new"
    caplog.set_level(logging.WARNING, logger="lossd_server")
    _start_and_stop(settings(store="sqlite", state_dir=state))
    assert state.stat().st_mode & 0o077 == 0
    assert not [w for w in _warnings(caplog) if "state directory" in w]


def test_lossd_serve_warns_about_a_readable_token_file_on_stderr(children: list[Child], tmp_path: Path) -> None:
    path = token_file(tmp_path)
    path.chmod(0o644)
    child = Child([*SERVE, "--port", "0", "--store", "memory", "--token-file", str(path)])
    children.append(child)
    assert child.stop() == 0
    [line] = [line for line in child.log if "token file" in line and "mode 0644" in line]
    assert "WARNING" in line and str(path) in line and "chmod 600" in line


def test_start_up_still_refuses_a_missing_token_file(tmp_path: Path) -> None:
    error = start_error(settings(token_file=tmp_path / "absent"))
    assert "cannot read token file" in str(error)


# Refused tokens, logged at a bounded rate ------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock() -> _Clock:
    return _Clock()


def _bearer(tmp_path: Path, clock: _Clock) -> BearerAuth:
    bearer = BearerAuth(load_tokens(token_file(tmp_path)))
    bearer._refusals = auth._RefusalLog(auth.REFUSAL_LOG_SECONDS, clock)  # a fake clock instead of sleeping
    return bearer


def _refuse(bearer: BearerAuth, times: int) -> None:
    for _ in range(times):
        with pytest.raises(UnauthenticatedError, match="unknown bearer token"):
            bearer.owner_of("not-a-token-of-this-server", None)


def test_unknown_tokens_are_logged_once_per_interval_with_the_count_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, clock: _Clock
) -> None:
    bearer = _bearer(tmp_path, clock)
    caplog.set_level(logging.WARNING, logger="lossd_server")
    _refuse(bearer, 200)
    assert _warnings(caplog) == ["refused a call with an unknown bearer token from ?"]
    clock.now += auth.REFUSAL_LOG_SECONDS / 2
    _refuse(bearer, 100)
    assert len(_warnings(caplog)) == 1
    clock.now += auth.REFUSAL_LOG_SECONDS / 2
    _refuse(bearer, 1)
    [_, second] = _warnings(caplog)
    assert second.startswith("refused 300 calls with an unknown bearer token in the last 10 s (the latest from ?)")
    assert caplog.records[-1].__dict__["refused_calls"] == 300  # a field of the JSON log format
    caplog.clear()
    clock.now += 3 * auth.REFUSAL_LOG_SECONDS  # a lone refusal after a quiet spell is a plain line again
    _refuse(bearer, 1)
    assert _warnings(caplog) == ["refused a call with an unknown bearer token from ?"]
    assert bearer.owner_of(ALICE) == "alice"  # known tokens are unaffected


def test_refusals_from_many_threads_are_all_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, clock: _Clock
) -> None:
    bearer = _bearer(tmp_path, clock)
    caplog.set_level(logging.WARNING, logger="lossd_server")
    threads = [threading.Thread(target=_refuse, args=(bearer, 50)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(_warnings(caplog)) == 1
    clock.now += auth.REFUSAL_LOG_SECONDS
    _refuse(bearer, 1)
    assert _warnings(caplog)[-1].startswith("refused 400 calls")  # 399 left out, plus this one


def test_a_server_flooded_with_bad_tokens_logs_a_couple_of_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = settings(token_file=token_file(tmp_path))
    caplog.set_level(logging.WARNING, logger="lossd_server")
    started = time.monotonic()
    with EmbeddedServer(config) as server, lossd.Client(server.target, token="x" * 32, retry_deadline=0) as client:
        for _ in range(200):
            with pytest.raises(lossd.UnauthenticatedError):
                client.list_sessions()
    refusals = [w for w in _warnings(caplog) if "unknown bearer token" in w]
    # One line per started interval at most (the calls take well under a second on loopback).
    assert 1 <= len(refusals) <= 1 + int((time.monotonic() - started) / auth.REFUSAL_LOG_SECONDS)
