"""How many samples each session's current epoch has seen, written on every training batch.

Snapshots of the statistics are periodic, so kill -9 loses the batches since the
last one. To *report* that loss, the count of samples seen is written after every
batch to a 16-byte file per session with ``pwrite`` and no fsync: the page cache
outlives the process, so after a crash the count is exact, and it costs a couple
of microseconds rather than a database transaction on the hot path.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from pathlib import Path

_RECORD = struct.Struct("<qq")  # epoch, samples seen in it


def _file_name(owner: str, name: str) -> str:
    return hashlib.sha256(f"{owner}\0{name}".encode()).hexdigest()[:32]


class ProgressFiles:
    def __init__(self, directory: Path) -> None:
        self._directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._open: dict[tuple[str, str], tuple[int, threading.Lock, list[int]]] = {}
        self._lock = threading.Lock()

    def _handle(self, owner: str, name: str) -> tuple[int, threading.Lock, list[int]]:
        with self._lock:
            handle = self._open.get((owner, name))
            if handle is None:
                fd = os.open(self._directory / _file_name(owner, name), os.O_RDWR | os.O_CREAT, 0o600)
                handle = self._open[owner, name] = (fd, threading.Lock(), [-1, -1])
            return handle

    def record(self, owner: str, name: str, epoch: int, samples: int) -> None:
        """Concurrent batches may finish out of order, so only a newer (epoch, samples) is written."""
        fd, lock, last = self._handle(owner, name)
        with lock:
            if (epoch, samples) > (last[0], last[1]):
                last[0], last[1] = epoch, samples
                os.pwrite(fd, _RECORD.pack(epoch, samples), 0)

    def reset(self, owner: str, name: str, epoch: int, samples: int) -> None:
        """After the state was replaced: the count may go down."""
        fd, lock, last = self._handle(owner, name)
        with lock:
            last[0], last[1] = epoch, samples
            os.pwrite(fd, _RECORD.pack(epoch, samples), 0)

    def read(self, owner: str, name: str) -> tuple[int, int] | None:
        try:
            data = (self._directory / _file_name(owner, name)).read_bytes()
        except FileNotFoundError:
            return None
        if len(data) < _RECORD.size:
            return None
        epoch, samples = _RECORD.unpack_from(data)
        return int(epoch), int(samples)

    def forget(self, owner: str, name: str) -> None:
        with self._lock:
            handle = self._open.pop((owner, name), None)
        if handle is not None:
            os.close(handle[0])
        (self._directory / _file_name(owner, name)).unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            handles, self._open = list(self._open.values()), {}
        for fd, _, _ in handles:
            os.close(fd)
