"""The state store's file: damaged, foreign or busy files stop the server and are left untouched;
idle sessions move to the store and back; the history of S keeps to its byte budget."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lossd
from lossd_server.batch import Batch
from lossd_server.config import Settings
from lossd_server.durable import DurableStore
from lossd_server.embedded import EmbeddedServer
from lossd_server.session import Session, StateSnapshot
from lossd_server.statedb import FILE_NAME, StoreFileError
from tests.conftest import ols_spec

C = 64


def open_store(directory: Path, **options: float) -> DurableStore:
    return DurableStore(
        directory,
        device=torch.device("cpu"),
        max_sessions=16,
        matrix_memory_bytes=1 << 30,
        **options,  # type: ignore[arg-type]
    )


def settings(directory: Path, **overrides: object) -> Settings:
    return Settings(
        host="127.0.0.1",
        port=0,
        device="cpu",
        workers=2,
        store="sqlite",
        state_dir=directory,
        **overrides,  # type: ignore[arg-type]
    )


def train(module: lossd.OnlineLabelSmoothing, seeds: range) -> None:
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, C, (48,), generator=generator)
        module(torch.randn(48, C, generator=generator) + 3 * F.one_hot(labels, C), labels)


@pytest.fixture()
def valid_store(tmp_path: Path) -> Path:
    """A store holding one OLS session with a finished epoch and a snapshot, closed cleanly."""
    with (
        EmbeddedServer(settings(tmp_path)) as server,
        lossd.OnlineLabelSmoothing(0.5, C, session="kept", target=server.target) as module,
    ):
        train(module, range(3))
        module.next_epoch()
        train(module, range(3, 5))
    return tmp_path / FILE_NAME


def leftovers(directory: Path) -> set[str]:
    return {path.name for path in directory.iterdir()}


def test_a_file_that_is_not_a_database_is_reported_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    garbage = os.urandom(8192)
    path.write_bytes(garbage)
    with pytest.raises(StoreFileError, match=rf"{path}: .*(not a database|not a lossd state store)"):
        open_store(tmp_path)
    assert path.read_bytes() == garbage
    assert leftovers(tmp_path) == {FILE_NAME, "lock"}  # no -wal, -shm or replacement file


def test_a_truncated_store_is_reported_and_left_untouched(valid_store: Path) -> None:
    data = valid_store.read_bytes()
    valid_store.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreFileError, match=rf"{valid_store}: the state store is damaged"):
        open_store(valid_store.parent)
    assert valid_store.read_bytes() == data[: len(data) // 2]


@pytest.mark.parametrize("kind", ["empty", "foreign"])
def test_an_empty_or_foreign_sqlite_file_is_not_taken_over(tmp_path: Path, kind: str) -> None:
    path = tmp_path / FILE_NAME
    if kind == "foreign":
        with sqlite3.connect(path) as other:
            other.execute("CREATE TABLE mine (x)")
        other.close()
    else:
        path.touch()
    before = path.read_bytes()
    with pytest.raises(StoreFileError, match="not a lossd state store"):
        open_store(tmp_path)
    assert path.read_bytes() == before


def test_two_servers_cannot_share_a_state_directory(tmp_path: Path) -> None:
    first = open_store(tmp_path)
    try:
        with pytest.raises(StoreFileError, match="another lossd server is using"):
            open_store(tmp_path)
    finally:
        first.close()
    open_store(tmp_path).close()  # free again once the first is closed


def test_lossd_serve_exits_with_the_reason_when_the_store_is_damaged(valid_store: Path) -> None:
    data = valid_store.read_bytes()
    valid_store.write_bytes(data[:1000])
    command = [sys.executable, "-m", "lossd_server", "serve", "--port", "0", "--device", "cpu"]
    command += ["--store", "sqlite", "--state-dir", str(valid_store.parent)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"lossd serve: {valid_store}: the state store is damaged" in result.stderr
    assert valid_store.read_bytes() == data[:1000]


def test_a_valid_store_comes_back_with_its_sessions(valid_store: Path) -> None:
    store = open_store(valid_store.parent)
    try:
        session = store.get("", "kept")
        assert session.epoch == 1 and session.samples_this_epoch == 2 * 48 and session.samples_lost == 0
    finally:
        store.close()


def test_an_idle_session_moves_to_the_store_and_back_without_losing_anything(tmp_path: Path) -> None:
    with (
        EmbeddedServer(settings(tmp_path, idle_ttl_seconds=0.2, snapshot_seconds=0.05)) as server,
        EmbeddedServer(Settings(host="127.0.0.1", port=0, device="cpu", store="memory")) as reference_server,
        lossd.OnlineLabelSmoothing(0.5, C, session="idle", target=server.target) as module,
        lossd.OnlineLabelSmoothing(0.5, C, session="reference", target=reference_server.target) as reference,
    ):
        for criterion in (module, reference):
            train(criterion, range(3))
            criterion.next_epoch()
            train(criterion, range(3, 5))
        store = server._running.store  # type: ignore[union-attr]
        assert store is not None
        deadline = time.monotonic() + 10
        while store.stats().matrix_bytes:  # evicted: no matrices left in memory
            assert time.monotonic() < deadline, "the idle session never left memory"
            time.sleep(0.02)
        assert [info.name for info in module.client.list_sessions()] == ["idle"]  # still listed
        for criterion in (module, reference):  # the next batch brings it back
            train(criterion, range(5, 8))
            criterion.next_epoch()
        a, b = module.state(), reference.state()
        assert a.epoch == b.epoch == 2
        assert torch.equal(a.supervise, b.supervise)
        assert torch.equal(a.accumulator, b.accumulator) and torch.equal(a.counts, b.counts)


@pytest.mark.parametrize(("budget", "kept"), [(0, [3]), (2 * C * C * 4, [2, 3]), (1 << 30, [1, 2, 3])])
def test_the_history_of_soft_labels_keeps_to_its_byte_budget(tmp_path: Path, budget: int, kept: list[int]) -> None:
    with (
        EmbeddedServer(settings(tmp_path, history_bytes=budget)) as server,
        lossd.OnlineLabelSmoothing(0.5, C, session="history", target=server.target) as module,
    ):
        for epoch in range(3):
            train(module, range(epoch * 2, epoch * 2 + 2))
            module.next_epoch()
        store = server._running.store  # type: ignore[union-attr]
        assert isinstance(store, DurableStore)
        assert store._db.history("", "history") == kept


# Races between the snapshot thread and changes of state, driven directly on the store.

LOOSE = {"snapshot_seconds": 3600.0}  # no periodic snapshots: each test takes the ones it needs


def apply(session: Session, seeds: range) -> None:
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, C, (20,), generator=generator)
        logits = torch.randn(20, C, generator=generator) + 3 * F.one_hot(labels, C)
        session.compute(Batch(logits, labels), training=True, need_grad=False)


def crash(store: DurableStore) -> None:
    """What kill -9 leaves: no final snapshot, the directory lock released by the kernel."""
    store._stop.set()
    store._thread.join()
    store._db.close()
    store._progress.close()
    os.close(store._lock_fd)


def test_a_snapshot_taken_before_a_delete_never_lands_in_the_session_recreated_under_the_name(tmp_path: Path) -> None:
    store = open_store(tmp_path, **LOOSE)
    old, _ = store.create("", "run", ols_spec(C))
    apply(old, range(5))
    stale, _ = old.statistics()  # the snapshot thread has read the old statistics ...
    store.delete("", "run")
    new, created = store.create("", "run", ols_spec(C))
    store._save(("", "run"), old, stale)  # ... and writes them only now
    assert created and new.samples_this_epoch == 0
    store.close()
    store = open_store(tmp_path, **LOOSE)
    try:
        assert store.get("", "run").samples_this_epoch == 0
    finally:
        store.close()


def test_an_older_snapshot_never_overwrites_a_newer_one(tmp_path: Path) -> None:
    store = open_store(tmp_path, **LOOSE)
    session, _ = store.create("", "run", ols_spec(C))
    apply(session, range(2))
    older, _ = session.statistics()
    apply(session, range(2, 4))
    newer, _ = session.statistics()
    store._save(("", "run"), session, newer)
    session.saved_changes = -1  # as if the older write had not been seen yet
    store._save(("", "run"), session, older)
    crash(store)
    store = open_store(tmp_path, **LOOSE)
    try:
        assert store.get("", "run").samples_this_epoch == 4 * 20
    finally:
        store.close()


def test_a_deleted_session_cannot_finish_an_epoch_and_the_store_still_opens(tmp_path: Path) -> None:
    store = open_store(tmp_path, **LOOSE)
    old, _ = store.create("", "run", ols_spec(C))
    apply(old, range(3))
    store.delete("", "run")
    with pytest.raises(lossd.NotFoundError, match="deleted"):
        old.arrive(0, 0).result(timeout=5)
    store.create("", "run", lossd.SessionSpec(kind="cross_entropy", n_classes=4))
    store.close()
    store = open_store(tmp_path, **LOOSE)
    try:
        assert store.get("", "run").spec.kind == "cross_entropy"
    finally:
        store.close()


def test_an_acknowledged_load_state_survives_a_crash(tmp_path: Path) -> None:
    store = open_store(tmp_path, **LOOSE)
    session, _ = store.create("", "run", ols_spec(C))
    apply(session, range(3))
    store._save(("", "run"), session, session.statistics()[0])
    generator = torch.Generator().manual_seed(9)
    supervise = torch.rand(C, C, generator=generator).softmax(dim=0)
    counts = torch.zeros(C, dtype=torch.int64)
    counts[:3] = 2
    accumulator = torch.zeros(C, C, dtype=torch.float64)
    accumulator[:3] = 1.0
    session.restore(StateSnapshot(4, supervise, accumulator, counts, 7))
    crash(store)
    store = open_store(tmp_path, **LOOSE)
    try:
        state = store.get("", "run").snapshot()
        assert (state.epoch, state.samples_this_epoch) == (4, 7)
        assert torch.equal(state.soft_labels, supervise)
        assert torch.equal(state.accumulator, accumulator) and torch.equal(state.counts, counts)
    finally:
        store.close()


def test_the_store_is_private_to_the_servers_user(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    open_store(directory).close()
    assert directory.stat().st_mode & 0o777 == 0o700
    assert (directory / FILE_NAME).stat().st_mode & 0o777 == 0o600
