"""Which training batches each session's current epoch applied, written on every batch.

Snapshots of the statistics are periodic, so kill -9 loses the batches since the
last one. To *report* that loss exactly, every applied batch appends a 40-byte
record (epoch, change number, samples, request digest) to a file per session with
``pwrite`` and no fsync: the page cache outlives the process, so after a crash the
log is exact, and it costs a couple of microseconds rather than a database
transaction on the hot path.

After a restart, the records the snapshot does not cover are the lost batches. A
lost batch that its client resends (same rank and request id, so the same
digest) is applied again and stops counting as lost: ``samples_lost`` counts only
what was applied, then lost, and never re-applied.

Each durable snapshot covers the records up to its change number; the log is then
rewritten with only the later ones, so it stays as short as one snapshot interval.
A crash in the middle of that rewrite can leave a record twice: records are keyed
by their change number (unique per session) when read.

Files are named by the session's incarnation (a fresh id each time a name is
created), so a late write for a deleted session can never touch its successor's.
"""

from __future__ import annotations

import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

from lossd_server.session import Progress

_RECORD = struct.Struct("<qqq16s")  # epoch, changes, samples, request digest


@dataclass
class _Handle:
    fd: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    pending: list[Progress] = field(default_factory=list)  # written and not yet covered by a snapshot
    covered: int = -1  # the change number the last durable snapshot covers
    closed: bool = False


class ProgressFiles:
    def __init__(self, directory: Path) -> None:
        self._directory = directory
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._open: dict[str, _Handle] = {}
        self._lock = threading.Lock()

    def _path(self, incarnation: str) -> Path:
        return self._directory / incarnation

    def _handle(self, incarnation: str) -> _Handle:
        with self._lock:
            handle = self._open.get(incarnation)
            if handle is None:
                fd = os.open(self._path(incarnation), os.O_RDWR | os.O_CREAT, 0o600)
                handle = self._open[incarnation] = _Handle(fd)
                # Records of a previous run stay until a snapshot covers them: append after them.
                handle.pending = self._read_fd(fd)
            return handle

    def record(self, incarnation: str, progress: Progress) -> None:
        handle = self._handle(incarnation)
        with handle.lock:
            if handle.closed or progress.changes <= handle.covered:
                return  # a snapshot taken after it was applied covers it already
            offset = len(handle.pending) * _RECORD.size
            os.pwrite(
                handle.fd, _RECORD.pack(progress.epoch, progress.changes, progress.samples, progress.digest), offset
            )
            handle.pending.append(progress)

    def covered(self, incarnation: str, changes: int) -> None:
        """A snapshot reflecting every change up to ``changes`` is durable: drop the records it covers."""
        handle = self._handle(incarnation)
        with handle.lock:
            if handle.closed or changes <= handle.covered:
                return
            handle.covered = changes
            kept = [record for record in handle.pending if record.changes > changes]
            if len(kept) == len(handle.pending):
                return
            data = b"".join(_RECORD.pack(r.epoch, r.changes, r.samples, r.digest) for r in kept)
            if data:
                os.pwrite(handle.fd, data, 0)
            os.ftruncate(handle.fd, len(data))
            handle.pending = kept

    def read(self, incarnation: str) -> list[Progress]:
        try:
            fd = os.open(self._path(incarnation), os.O_RDONLY)
        except FileNotFoundError:
            return []
        try:
            return self._read_fd(fd)
        finally:
            os.close(fd)

    @staticmethod
    def _read_fd(fd: int) -> list[Progress]:
        size = os.fstat(fd).st_size
        data = os.pread(fd, size - size % _RECORD.size, 0)
        return [Progress(*fields) for fields in _RECORD.iter_unpack(data)]

    def release(self, incarnation: str, *, delete: bool = False) -> None:
        """Close the file (a session left memory); ``delete`` also removes it (the session was deleted)."""
        with self._lock:
            handle = self._open.pop(incarnation, None)
        if handle is not None:
            with handle.lock:  # never close a descriptor a record() is writing through
                handle.closed = True
                os.close(handle.fd)
        if delete:
            self._path(incarnation).unlink(missing_ok=True)

    def keep_only(self, incarnations: set[str]) -> None:
        """Remove files of sessions that no longer exist (deleted while a batch was finishing)."""
        for path in self._directory.iterdir():
            if path.name not in incarnations:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            names = list(self._open)
        for incarnation in names:
            self.release(incarnation)
