"""What the snapshot loop costs in server memory, read from a real `lossd serve` process's /proc status.

An idle server must not copy anything (it was OOM-killed by its own snapshot
loop once), and a changed session is written with one staging copy of its
accumulator: SQLite gets the bytes through incremental blob I/O, never as a bound
value that it would copy twice more.
"""

from __future__ import annotations

import signal
import sqlite3
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
import torch

import lossd
from lossd_server.statedb import APPLICATION_ID, FILE_NAME, SCHEMA_VERSION, StateDB
from tests.conftest import ols_spec
from tests.test_durability import Served, wait_for_snapshot

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/status")

C, N = 3000, 64
ACCUMULATOR_BYTES = 8 * C * C  # 72 MB; S is half that
SNAPSHOT_SECONDS = 0.2
MiB = 1 << 20


def status_bytes(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # "VmRSS:   123 kB"
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def reset_peak(pid: int) -> int:
    """Make VmHWM restart from the current RSS (Linux >= 4.0), and return that RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return status_bytes(pid, "VmRSS")


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[Served]:
    server = Served(tmp_path, "--snapshot-seconds", str(SNAPSHOT_SECONDS), "--log-level", "INFO")
    try:
        yield server
    finally:
        server.kill(signal.SIGTERM)  # also closes its log pipe


def train_one(client: lossd.Client, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (N,), generator=generator)
    logits = torch.randn(N, C, generator=generator) + 8.0 * torch.nn.functional.one_hot(labels, C)
    client.compute_loss("big", logits, labels, epoch=0)


def started(client: lossd.Client) -> None:
    """A session with one snapshot of changed statistics behind it, and one more interval to settle."""
    client.create_session("big", ols_spec(C))
    train_one(client, 0)
    wait_for_snapshot(client, "big")
    time.sleep(2 * SNAPSHOT_SECONDS)


def test_an_idle_server_copies_nothing_in_its_snapshot_loop(served: Served) -> None:
    pid = served.process.pid
    with lossd.Client(served.target, retry_deadline=0) as client:
        started(client)
        before = client.get_session("big").snapshot_at
        baseline = reset_peak(pid)
        samples = []
        deadline = time.monotonic() + 12 * SNAPSHOT_SECONDS  # twelve snapshot intervals without a request
        while time.monotonic() < deadline:
            samples.append(status_bytes(pid, "VmRSS"))
            time.sleep(0.01)
        peak = status_bytes(pid, "VmHWM") - baseline
        assert client.get_session("big").snapshot_at == before  # nothing changed, nothing written
    print(
        f"\nidle, {len(samples)} samples over 12 intervals: RSS min {min(samples) / MiB:.1f} MiB, "
        f"max {max(samples) / MiB:.1f} MiB; peak over baseline {peak / MiB:.1f} MiB "
        f"(accumulator {ACCUMULATOR_BYTES / MiB:.1f} MiB)"
    )
    assert max(samples) - min(samples) < 16 * MiB
    assert peak < 16 * MiB  # a copy of the accumulator alone is 69 MiB


def test_a_changed_session_is_snapshotted_with_one_staging_copy(served: Served) -> None:
    pid = served.process.pid
    with lossd.Client(served.target, retry_deadline=0) as client:
        started(client)
        baseline = reset_peak(pid)
        for seed in range(1, 6):
            train_one(client, seed)
            wait_for_snapshot(client, "big")
        peak = status_bytes(pid, "VmHWM") - baseline
    print(
        f"\nchanged, 5 snapshots: peak over baseline {peak / MiB:.1f} MiB "
        f"(accumulator {ACCUMULATOR_BYTES / MiB:.1f} MiB, {peak / ACCUMULATOR_BYTES:.2f}x)"
    )
    assert peak < ACCUMULATOR_BYTES + 24 * MiB  # the staging copy, counts, and SQLite's page cache


def test_a_restart_reads_the_tensors_without_whole_blob_copies(tmp_path: Path) -> None:
    """Freed copies stay in malloc's heap (the server raises its trim threshold), so they show in RSS."""
    state_bytes = 12 * C * C + 8 * C  # accumulator, S, counts
    empty = Served(tmp_path / "empty")
    try:
        baseline = status_bytes(empty.process.pid, "VmRSS")
    finally:
        empty.kill(signal.SIGTERM)
    first = Served(tmp_path / "store", "--snapshot-seconds", str(SNAPSHOT_SECONDS))
    try:
        with lossd.Client(first.target, retry_deadline=0) as client:
            started(client)
            expected = client.get_state("big")
    finally:
        first.kill(signal.SIGTERM)
    second = Served(tmp_path / "store", "--snapshot-seconds", str(SNAPSHOT_SECONDS))
    try:
        grown = status_bytes(second.process.pid, "VmRSS") - baseline  # the session is loaded before it serves
        with lossd.Client(second.target, retry_deadline=0) as client:
            restored = client.get_state("big")
    finally:
        second.kill(signal.SIGTERM)
    print(f"\nrestart: RSS {grown / MiB:.1f} MiB over an empty server, session state {state_bytes / MiB:.1f} MiB")
    assert torch.equal(restored.accumulator, expected.accumulator)
    assert torch.equal(restored.counts, expected.counts)
    assert grown < state_bytes + 32 * MiB  # whole-blob reads left ~1.5x the accumulator more


# Version 1's tables, where the tensors sat before other columns.
SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE sessions (owner TEXT NOT NULL, name TEXT NOT NULL, incarnation TEXT NOT NULL, spec BLOB NOT NULL,
    epoch INTEGER NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL, PRIMARY KEY (owner, name));
CREATE TABLE epochs (owner TEXT NOT NULL, name TEXT NOT NULL, epoch INTEGER NOT NULL, supervise BLOB NOT NULL,
    committed_at REAL NOT NULL, PRIMARY KEY (owner, name, epoch));
CREATE TABLE snapshots (owner TEXT NOT NULL, name TEXT NOT NULL, epoch INTEGER NOT NULL, accumulator BLOB, counts BLOB,
    samples INTEGER NOT NULL, correct INTEGER NOT NULL, samples_lost INTEGER NOT NULL, applied TEXT NOT NULL,
    taken_at REAL NOT NULL, changes INTEGER NOT NULL, PRIMARY KEY (owner, name));
"""


def test_a_version_1_store_is_upgraded_with_its_tensors_intact(tmp_path: Path) -> None:
    c = 40
    generator = torch.Generator().manual_seed(1)
    supervise = [torch.rand(c, c, generator=generator) for _ in range(2)]
    accumulator, counts = torch.rand(c, c, generator=generator, dtype=torch.float64), torch.arange(c)
    spec = ols_spec(c).to_proto().SerializeToString(deterministic=True)
    with closing(sqlite3.connect(tmp_path / FILE_NAME)) as db, db:
        db.executescript(SCHEMA_1)
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        for name, epoch in (("a", 1), ("b", 0)):
            db.execute("INSERT INTO sessions VALUES ('t', ?, ?, ?, ?, 1.0, 2.0)", (name, name + "-1", spec, epoch))
        for epoch, s in enumerate(supervise):
            db.execute("INSERT INTO epochs VALUES ('t', 'a', ?, ?, 3.0)", (epoch, s.numpy().tobytes()))
        row = (accumulator.numpy().tobytes(), counts.numpy().tobytes(), 5, 4, 0, "{}", 4.0, 9)
        db.execute("INSERT INTO snapshots VALUES ('t', 'a', 1, ?, ?, ?, ?, ?, ?, ?, ?)", row)
        db.execute("INSERT INTO snapshots VALUES ('t', 'b', 0, NULL, NULL, 0, 0, 0, '{}', 4.0, 1)")
    store = StateDB(tmp_path)
    try:
        a, b = store.load("t", "a"), store.load("t", "b")
        assert a is not None and a.statistics is not None and a.supervise is not None
        assert torch.equal(a.supervise, supervise[1]) and a.statistics.samples == 5 and a.statistics.changes == 9
        assert a.statistics.accumulator is not None and torch.equal(a.statistics.accumulator, accumulator)
        assert a.statistics.counts is not None and torch.equal(a.statistics.counts, counts)
        kept = store.soft_labels_at("t", "a", 0, c)
        assert kept is not None and torch.equal(kept, supervise[0])
        assert b is not None and b.statistics is not None and b.statistics.accumulator is None
    finally:
        store.close()
    with closing(sqlite3.connect(tmp_path / FILE_NAME)) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)
        assert [row[1] for row in db.execute("PRAGMA table_info(snapshots)")][-2:] == ["counts", "accumulator"]
        assert [row[1] for row in db.execute("PRAGMA table_info(epochs)")][-1] == "supervise"
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert tables == {"meta", "sessions", "epochs", "snapshots"}
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
