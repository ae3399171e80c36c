"""The SQLite file behind the durable store: schema, checks and the few statements it needs.

One file, WAL mode, ``synchronous=FULL``: a commit is on disk when it returns,
so an acknowledged next_epoch survives kill -9 and power loss alike. Tensors are
stored as raw little-endian bytes with their dtype implied by the column.

Opening never changes a file it does not recognise: an existing file is first
checked through a read-only connection, and a new one is built under a temporary
name and renamed into place, so a crash mid-creation leaves no half-made store.
A version-1 file is upgraded in place, in one transaction.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lossd._codec import byte_view
from lossd._spec import SessionSpec
from lossd.v1 import loss_service_pb2 as pb

APPLICATION_ID = 0x4C4F5353  # "LOSS": marks the file as a lossd store
SCHEMA_VERSION = 2  # 2: the tensors are each table's last columns (1 had them in the middle; upgraded on open)
FILE_NAME = "lossd.sqlite3"

# The tensors come last: SQLite keeps a zeroblob as a count of zero bytes only while
# no column after it holds data; otherwise it builds the whole record in memory, and
# writing a tensor costs twice its size again (see _CHUNK).
_EPOCHS = """
CREATE TABLE epochs (
    owner TEXT NOT NULL, name TEXT NOT NULL, epoch INTEGER NOT NULL,
    committed_at REAL NOT NULL,
    supervise BLOB NOT NULL,       -- float32 [C, C], class-major
    PRIMARY KEY (owner, name, epoch)
)"""
_SNAPSHOTS = """
CREATE TABLE snapshots (
    owner TEXT NOT NULL, name TEXT NOT NULL, epoch INTEGER NOT NULL,
    samples INTEGER NOT NULL, correct INTEGER NOT NULL, samples_lost INTEGER NOT NULL,
    applied TEXT NOT NULL,         -- JSON {rank: [[request_id, fingerprint], ...]}
    taken_at REAL NOT NULL,
    changes INTEGER NOT NULL,      -- Session.changes it reflects: an older snapshot never overwrites a newer
    counts BLOB,                   -- int64 [C]; NULL for zeros
    accumulator BLOB,              -- float64 [C, C]; NULL for zeros
    PRIMARY KEY (owner, name)
)"""
_SCHEMA = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE sessions (
    owner TEXT NOT NULL, name TEXT NOT NULL,
    incarnation TEXT NOT NULL,     -- new each time the name is created: writes for a deleted one miss
    spec BLOB NOT NULL,            -- lossd.v1.SessionSpec, canonical
    epoch INTEGER NOT NULL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (owner, name)
);
-- S in force during `epoch`: written when the epoch before it finishes.
{_EPOCHS};
-- The statistics of the current epoch as of `taken_at`.
{_SNAPSHOTS};
"""


class StoreFileError(OSError):
    """The store file is not a lossd store, or is damaged. Nothing was changed."""


class SessionGone(LookupError):
    """The session (this incarnation of the name) was deleted: nothing was written."""


@dataclass(frozen=True)
class Statistics:
    """A session's current-epoch statistics, as snapshotted."""

    epoch: int
    accumulator: torch.Tensor | None  # None: zeros. On the session's device (a GPU's is written in chunks)
    counts: torch.Tensor | None
    samples: int
    correct: int
    samples_lost: int
    applied: dict[int, list[tuple[str, str]]]
    taken_at: float
    changes: int
    # Batches a crash lost that a resend may still re-apply: hex request digest -> samples.
    lost: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredSession:
    owner: str
    name: str
    incarnation: str
    spec: SessionSpec
    epoch: int
    created_at: float
    updated_at: float
    supervise: torch.Tensor | None  # S of `epoch`; None before the first finished epoch or for stateless kinds
    statistics: Statistics | None


# Tensors go through incremental blob I/O in chunks of this size: a row is inserted with
# zeroblob(n) and filled from the tensor's own memory, because a bound value of n bytes
# costs ~2n more (SQLite copies it, then builds the row record from it) and reading a
# whole blob back as bytes costs n more before the tensor is even made.
_CHUNK = 8 << 20


def _nbytes(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.numel() * tensor.element_size()


def _zeroblob(parameter: int) -> str:
    """SQL for a zeroblob of the size bound to ``?parameter``, or NULL for None (zeroblob(NULL) is an empty blob)."""
    return f"CASE WHEN ?{parameter} IS NULL THEN NULL ELSE zeroblob(?{parameter}) END"


def _write_blob(db: sqlite3.Connection, table: str, column: str, rowid: int, tensor: torch.Tensor) -> None:
    """Fill the zeroblob at ``rowid`` with the tensor's bytes, in the caller's transaction."""
    with db.blobopen(table, column, rowid) as blob:
        for chunk in host_chunks(tensor):
            blob.write(chunk)


def host_chunks(tensor: torch.Tensor, *, copy_out: bool | None = None) -> Iterator[memoryview]:
    """The tensor's bytes (little-endian, as stored: the codec refuses big-endian hosts) in chunks of at most
    ``_CHUNK``: views of a CPU tensor's memory; ``copy_out`` (the default on a GPU), each chunk copied to
    the host in turn, so a tensor on a GPU costs one chunk of host memory."""
    if not (tensor.device.type != "cpu" if copy_out is None else copy_out):
        data = byte_view(tensor)
        for start in range(0, len(data), _CHUNK):
            yield data[start : start + _CHUNK]
        return
    flat = tensor.reshape(-1)
    step = _CHUNK // tensor.element_size()
    for start in range(0, flat.numel(), step):
        yield byte_view(flat[start : start + step].cpu())


def _copy_blob(db: sqlite3.Connection, column: str, source: tuple[str, int], target: tuple[str, int]) -> None:
    """Copy a blob into a zeroblob of the same size, a chunk at a time."""
    with (
        db.blobopen(source[0], column, source[1], readonly=True) as read,
        db.blobopen(target[0], column, target[1]) as write,
    ):
        while chunk := read.read(_CHUNK):
            write.write(chunk)


def _read_blob(
    db: sqlite3.Connection,
    table: str,
    column: str,
    rowid: int,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    *,
    device: torch.device | None = None,
    as_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The blob (of ``dtype``) read chunk by chunk into a new tensor: no whole-blob bytes object on the way.
    Into ``device`` and ``as_dtype`` when given, converting a chunk at a time: no whole host copy either."""
    as_dtype = as_dtype or dtype
    if (device is None or device.type == "cpu") and as_dtype == dtype:
        tensor = torch.empty(shape, dtype=dtype)
        target = byte_view(tensor)
        with db.blobopen(table, column, rowid, readonly=True) as blob:
            _check_length(blob, len(target), table, column, shape)
            for start in range(0, len(target), _CHUNK):
                target[start : start + _CHUNK] = blob.read(_CHUNK)
        return tensor
    tensor = torch.empty(shape, dtype=as_dtype, device=device)
    flat = tensor.view(-1)
    chunk = torch.empty(_CHUNK // dtype.itemsize, dtype=dtype)
    with db.blobopen(table, column, rowid, readonly=True) as blob:
        _check_length(blob, flat.numel() * dtype.itemsize, table, column, shape)
        for start in range(0, flat.numel(), chunk.numel()):
            part = chunk[: min(chunk.numel(), flat.numel() - start)]
            byte_view(part)[:] = blob.read(part.numel() * dtype.itemsize)
            flat[start : start + part.numel()].copy_(part)
    return tensor


def _check_length(blob: sqlite3.Blob, expected: int, table: str, column: str, shape: tuple[int, ...]) -> None:
    if len(blob) != expected:
        raise StoreFileError(f"{table}.{column}: {len(blob)} bytes stored, {expected} expected for {shape}")


def _applied_json(statistics: Statistics) -> str:
    """The ``applied`` column: {rank: [[request_id, fingerprint], ...]}, and under "lost" the batches a
    crash lost that a resend may still re-apply ({hex digest: samples}; absent when none)."""
    document: dict[str, object] = {str(rank): ids for rank, ids in statistics.applied.items()}
    if statistics.lost:
        document["lost"] = statistics.lost
    return json.dumps(document)


def _parse_applied(text: str) -> tuple[dict[int, list[tuple[str, str]]], dict[str, int]]:
    document = json.loads(text)
    lost = {str(digest): int(samples) for digest, samples in document.pop("lost", {}).items()}
    applied = {int(rank): [(str(i), str(f)) for i, f in ids] for rank, ids in document.items()}
    return applied, lost


def _spec(blob: bytes) -> SessionSpec:
    message = pb.SessionSpec()
    message.ParseFromString(blob)
    return SessionSpec.from_proto(message)


def _check_existing(path: Path) -> int:
    """Read-only checks: a damaged or foreign file is reported and left exactly as it is. Returns its version."""
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as error:
        raise StoreFileError(f"{path}: cannot open the state store: {error}") from None
    try:
        application_id = connection.execute("PRAGMA application_id").fetchone()[0]
        if application_id != APPLICATION_ID:
            raise StoreFileError(f"{path}: not a lossd state store (application_id {application_id:#x})")
        check = [row[0] for row in connection.execute("PRAGMA quick_check")]
        if check != ["ok"]:
            raise StoreFileError(f"{path}: the state store is damaged: {'; '.join(check[:5])}")
        version = connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if version is None or int(version[0]) not in (1, SCHEMA_VERSION):
            raise StoreFileError(
                f"{path}: state store schema version {version and version[0]}, this server reads {SCHEMA_VERSION}"
                " (and upgrades 1)"
            )
        return int(version[0])
    except sqlite3.Error as error:
        raise StoreFileError(f"{path}: the state store is damaged or not a database: {error}") from None
    finally:
        connection.close()


def _create(path: Path) -> None:
    partial = path.with_name(path.name + ".creating")
    partial.unlink(missing_ok=True)  # ours, from a crash during an earlier creation
    partial.touch(mode=0o600)  # tenants' state: readable by the server's user only (WAL files inherit it)
    connection = sqlite3.connect(partial)
    try:
        connection.executescript(_SCHEMA)
        connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        connection.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        connection.commit()
    finally:
        connection.close()
    with open(partial, "rb+") as file:
        os.fsync(file.fileno())
    os.replace(partial, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class StateDB:
    """All statements on one connection, serialised by a lock; every write is one transaction."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = directory / FILE_NAME
        version = SCHEMA_VERSION
        if self.path.exists():
            version = _check_existing(self.path)
        else:
            _create(self.path)
        self._connection = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._connection.execute("PRAGMA journal_mode = WAL")
        self._connection.execute("PRAGMA synchronous = FULL")
        self._connection.execute("PRAGMA busy_timeout = 10000")
        self._lock = threading.Lock()
        if version == 1:
            try:
                self._upgrade_from_1()
            except BaseException:
                self._connection.close()  # rolled back: the file is still version 1
                raise

    def _upgrade_from_1(self) -> None:
        """Rebuild the tensor tables with the tensors last, in one transaction: a crash leaves version 1.

        Each tensor is copied chunk by chunk (an INSERT ... SELECT would hold two whole copies).
        """
        with self._transaction() as db:
            db.execute("ALTER TABLE epochs RENAME TO epochs_1")
            db.execute("ALTER TABLE snapshots RENAME TO snapshots_1")
            db.execute(_EPOCHS)
            db.execute(_SNAPSHOTS)
            rows = db.execute("SELECT rowid, owner, name, epoch, committed_at, length(supervise) FROM epochs_1")
            for old, *values in rows.fetchall():
                new = db.execute(
                    "INSERT INTO epochs (owner, name, epoch, committed_at, supervise) VALUES (?, ?, ?, ?, zeroblob(?))",
                    values,
                ).lastrowid
                assert new is not None
                _copy_blob(db, "supervise", ("epochs_1", old), ("epochs", new))
            rows = db.execute(
                "SELECT rowid, owner, name, epoch, samples, correct, samples_lost, applied, taken_at, changes, "
                "length(counts), length(accumulator) FROM snapshots_1"
            )
            for old, *values in rows.fetchall():
                new = db.execute(
                    "INSERT INTO snapshots (owner, name, epoch, samples, correct, samples_lost, applied, taken_at, "
                    f"changes, counts, accumulator) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, {_zeroblob(10)}, "
                    f"{_zeroblob(11)})",
                    values,
                ).lastrowid
                assert new is not None
                for column, size in (("counts", values[-2]), ("accumulator", values[-1])):
                    if size is not None:
                        _copy_blob(db, column, ("snapshots_1", old), ("snapshots", new))
            db.execute("DROP TABLE epochs_1")
            db.execute("DROP TABLE snapshots_1")
            db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                yield self._connection
                self._connection.execute("COMMIT")
            except BaseException:
                # SQLite may have rolled back already (an I/O error); never leave one open.
                if self._connection.in_transaction:
                    with suppress(sqlite3.Error):
                        self._connection.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    # Writes -------------------------------------------------------------

    def put_session(self, owner: str, name: str, incarnation: str, spec: SessionSpec, created_at: float) -> None:
        spec_bytes = spec.to_proto().SerializeToString(deterministic=True)
        with self._transaction() as db:
            db.execute(
                "INSERT INTO sessions VALUES (?, ?, ?, ?, 0, ?, ?)",
                (owner, name, incarnation, spec_bytes, created_at, created_at),
            )

    def incarnations(self) -> set[str]:
        with self._lock:
            return {row[0] for row in self._connection.execute("SELECT incarnation FROM sessions")}

    def delete_session(self, owner: str, name: str) -> None:
        with self._transaction() as db:
            for table in ("sessions", "epochs", "snapshots"):
                db.execute(f"DELETE FROM {table} WHERE owner = ? AND name = ?", (owner, name))

    def commit_epoch(
        self,
        owner: str,
        name: str,
        incarnation: str,
        epoch: int,
        supervise: torch.Tensor | None,
        statistics: Statistics,
        history_bytes: int,
        *,
        replaced: bool = False,
    ) -> None:
        """The session is now at ``epoch`` with S ``supervise`` and these statistics; older S beyond the budget go.

        ``replaced``: the state was loaded from elsewhere (LoadState), so any kept S of
        later epochs belongs to a history that no longer leads here and is dropped.
        """
        now = time.time()
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE sessions SET epoch = ?, updated_at = ? WHERE owner = ? AND name = ? AND incarnation = ?",
                (epoch, now, owner, name, incarnation),
            )
            if not cursor.rowcount:
                raise SessionGone(name)
            if replaced:
                db.execute("DELETE FROM epochs WHERE owner = ? AND name = ? AND epoch > ?", (owner, name, epoch))
            if supervise is not None:
                cursor = db.execute(
                    "INSERT OR REPLACE INTO epochs (owner, name, epoch, committed_at, supervise) "
                    "VALUES (?, ?, ?, ?, zeroblob(?))",
                    (owner, name, epoch, now, _nbytes(supervise)),
                )
                assert cursor.lastrowid is not None  # an INSERT always sets it
                _write_blob(db, "epochs", "supervise", cursor.lastrowid, supervise)
                self._trim_history(db, owner, name, history_bytes)
            self._write_statistics(db, owner, name, statistics)

    def _trim_history(self, db: sqlite3.Connection, owner: str, name: str, history_bytes: int) -> None:
        rows = db.execute(
            "SELECT epoch, length(supervise) FROM epochs WHERE owner = ? AND name = ? ORDER BY epoch DESC",
            (owner, name),
        ).fetchall()
        kept = 0
        for index, (epoch, size) in enumerate(rows):
            kept += size
            if index > 0 and kept > history_bytes:  # the newest S is always kept
                db.execute("DELETE FROM epochs WHERE owner = ? AND name = ? AND epoch <= ?", (owner, name, epoch))
                return

    def put_statistics(
        self, owner: str, name: str, incarnation: str, epoch: int, updated_at: float, statistics: Statistics
    ) -> None:
        """A snapshot of the current epoch; skipped if the session moved on to another epoch or was deleted."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE sessions SET updated_at = max(updated_at, ?) "
                "WHERE owner = ? AND name = ? AND incarnation = ? AND epoch = ?",
                (updated_at, owner, name, incarnation, epoch),
            )
            if cursor.rowcount:
                self._write_statistics(db, owner, name, statistics)

    def _write_statistics(self, db: sqlite3.Connection, owner: str, name: str, statistics: Statistics) -> None:
        # The tensors are written after the row, into its zeroblobs. RETURNING gives the rowid
        # of the row written, and no row when the WHERE refuses an older snapshot: then nothing is.
        written = db.execute(
            "INSERT INTO snapshots (owner, name, epoch, samples, correct, samples_lost, applied, taken_at, changes, "
            f"counts, accumulator) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, {_zeroblob(10)}, {_zeroblob(11)}) "
            "ON CONFLICT (owner, name) DO UPDATE SET "
            "epoch = excluded.epoch, accumulator = excluded.accumulator, counts = excluded.counts, "
            "samples = excluded.samples, correct = excluded.correct, samples_lost = excluded.samples_lost, "
            "applied = excluded.applied, taken_at = excluded.taken_at, changes = excluded.changes "
            "WHERE excluded.changes > snapshots.changes RETURNING rowid",
            (
                owner,
                name,
                statistics.epoch,
                statistics.samples,
                statistics.correct,
                statistics.samples_lost,
                _applied_json(statistics),
                statistics.taken_at,
                statistics.changes,
                _nbytes(statistics.counts),
                _nbytes(statistics.accumulator),
            ),
        ).fetchall()  # done stepping before a blob handle opens on the row
        for (rowid,) in written:
            for column, tensor in (("accumulator", statistics.accumulator), ("counts", statistics.counts)):
                if tensor is not None:
                    _write_blob(db, "snapshots", column, rowid, tensor)

    # Reads --------------------------------------------------------------

    def names(self) -> list[tuple[str, str]]:
        with self._lock:
            return [(row[0], row[1]) for row in self._connection.execute("SELECT owner, name FROM sessions")]

    def most_recent_first(self) -> list[tuple[str, str]]:
        with self._lock:
            rows = self._connection.execute("SELECT owner, name FROM sessions ORDER BY updated_at DESC")
            return [(row[0], row[1]) for row in rows]

    def history(self, owner: str, name: str) -> list[int]:
        """The epochs whose S is kept, ascending."""
        with self._lock:
            rows = self._connection.execute(
                "SELECT epoch FROM epochs WHERE owner = ? AND name = ? ORDER BY epoch", (owner, name)
            )
            return [row[0] for row in rows]

    def soft_labels_at(self, owner: str, name: str, epoch: int, n_classes: int) -> torch.Tensor | None:
        """The class-major S kept for ``epoch``, or None."""
        with self._lock:
            row = self._connection.execute(
                "SELECT rowid FROM epochs WHERE owner = ? AND name = ? AND epoch = ?", (owner, name, epoch)
            ).fetchone()
            if row is None:
                return None
            return _read_blob(self._connection, "epochs", "supervise", row[0], torch.float32, (n_classes, n_classes))

    def load(
        self, owner: str, name: str, *, device: torch.device | None = None, soft_dtype: torch.dtype = torch.float32
    ) -> StoredSession | None:
        """The session with its matrices on ``device`` (the CPU by default), S in ``soft_dtype``."""
        with self._lock:
            db = self._connection
            row = db.execute(
                "SELECT spec, epoch, created_at, updated_at, incarnation FROM sessions WHERE owner = ? AND name = ?",
                (owner, name),
            ).fetchone()
            if row is None:
                return None
            spec, epoch = _spec(row[0]), int(row[1])
            c = spec.n_classes
            stored_s = db.execute(
                "SELECT rowid FROM epochs WHERE owner = ? AND name = ? AND epoch = ?", (owner, name, epoch)
            ).fetchone()
            supervise = None
            if stored_s is not None:
                supervise = _read_blob(
                    db, "epochs", "supervise", stored_s[0], torch.float32, (c, c), device=device, as_dtype=soft_dtype
                )
            snap = db.execute(
                "SELECT epoch, length(accumulator), length(counts), samples, correct, samples_lost, applied, "
                "taken_at, changes, rowid FROM snapshots WHERE owner = ? AND name = ?",  # length() reads no blob
                (owner, name),
            ).fetchone()
            # Read only for the current epoch, while the lock keeps the row as selected.
            accumulator = counts = None
            if snap is not None and snap[0] == epoch:
                if snap[1] is not None:
                    accumulator = _read_blob(
                        db, "snapshots", "accumulator", snap[9], torch.float64, (c, c), device=device
                    )
                if snap[2] is not None:
                    counts = _read_blob(db, "snapshots", "counts", snap[9], torch.int64, (c,), device=device)
        statistics = None
        if snap is not None and snap[0] == epoch:
            applied, lost = _parse_applied(snap[6])
            statistics = Statistics(
                epoch=epoch,
                accumulator=accumulator,
                counts=counts,
                samples=int(snap[3]),
                correct=int(snap[4]),
                samples_lost=int(snap[5]),
                applied=applied,
                taken_at=float(snap[7]),
                changes=int(snap[8]),
                lost=lost,
            )
        return StoredSession(owner, name, str(row[4]), spec, epoch, float(row[2]), float(row[3]), supervise, statistics)

    def summary(self, owner: str, name: str) -> StoredSession | None:
        """What ListSessions shows, without reading any matrix (the tensors are None)."""
        with self._lock:
            row = self._connection.execute(
                "SELECT s.spec, s.epoch, s.created_at, s.updated_at, s.incarnation, "
                "n.epoch, n.samples, n.correct, n.samples_lost, n.taken_at, n.changes "
                "FROM sessions s LEFT JOIN snapshots n ON n.owner = s.owner AND n.name = s.name "
                "WHERE s.owner = ? AND s.name = ?",
                (owner, name),
            ).fetchone()
        if row is None:
            return None
        spec, epoch = _spec(row[0]), int(row[1])
        statistics = None
        if row[5] is not None and int(row[5]) == epoch:
            statistics = Statistics(epoch, None, None, int(row[6]), int(row[7]), int(row[8]), {}, row[9], row[10])
        return StoredSession(owner, name, str(row[4]), spec, epoch, row[2], row[3], None, statistics)
