"""How many samples each session's current epoch has seen, written on every training batch.

Snapshots of the statistics are periodic, so kill -9 loses the batches since the
last one. To *report* that loss, the count of samples seen is written after every
batch to a 16-byte file per session with ``pwrite`` and no fsync: the page cache
outlives the process, so after a crash the count is exact, and it costs a couple
of microseconds rather than a database transaction on the hot path.

Files are named by the session's incarnation (a fresh id each time a name is
created), so a late write for a deleted session can never touch its successor's.
"""

from __future__ import annotations

import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

_RECORD = struct.Struct("<qq")  # epoch, samples seen in it


@dataclass
class _Handle:
    fd: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    last: tuple[int, int] = (-1, -1)
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
            return handle

    def record(self, incarnation: str, epoch: int, samples: int) -> None:
        """Concurrent batches may finish out of order, so only a newer (epoch, samples) is written."""
        handle = self._handle(incarnation)
        with handle.lock:
            if not handle.closed and (epoch, samples) > handle.last:
                handle.last = (epoch, samples)
                os.pwrite(handle.fd, _RECORD.pack(epoch, samples), 0)

    def reset(self, incarnation: str, epoch: int, samples: int) -> None:
        """After the state was replaced: the count may go down."""
        handle = self._handle(incarnation)
        with handle.lock:
            if not handle.closed:
                handle.last = (epoch, samples)
                os.pwrite(handle.fd, _RECORD.pack(epoch, samples), 0)

    def read(self, incarnation: str) -> tuple[int, int] | None:
        try:
            data = self._path(incarnation).read_bytes()
        except FileNotFoundError:
            return None
        if len(data) < _RECORD.size:
            return None
        epoch, samples = _RECORD.unpack_from(data)
        return int(epoch), int(samples)

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
