"""Same-host shared-memory transport: the segment a LossStream's client creates and its server maps.

A segment is a file directly under ``/dev/shm`` (POSIX shared memory on Linux),
opened with ``os.open`` and mapped with ``mmap``; ``multiprocessing.shared_memory``
is not used because its resource tracker unlinks (and warns about) segments on
the exit of any process that attached one, and tracks names we unlink ourselves.

Layout: bytes 0-15 the client's nonce, 16-31 the server's, then 64-byte aligned
regions the client lays out per request (logits, labels, gradient). The client
unlinks the name as soon as the server has it mapped, so the memory is freed
when both processes drop their mappings, whatever way they exit.

A mapping is unmapped when its last reference goes, and tensors viewing it hold
a reference: it is never closed explicitly, since that would unmap memory a
tensor still points to.
"""

from __future__ import annotations

import contextlib
import hmac
import math
import mmap
import os
import re
import secrets
import stat
import weakref

import torch

from lossd.v1 import loss_service_pb2 as pb

SHM_DIR = "/dev/shm"
NAME_PREFIX = "lossd-"
NONCE_BYTES = 16
HEADER_BYTES = 64
ALIGN = 64
MIN_SEGMENT_BYTES = 1 << 20
_NAME = re.compile(r"lossd-[0-9a-f]{16,64}")


class SegmentError(OSError):
    """The segment cannot be created, opened or verified: the caller falls back to inline bytes."""


def available() -> bool:
    """Whether this host has a writable /dev/shm (Linux)."""
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK | os.X_OK)


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def segment_size(needed: int) -> int:
    """Room for ``needed`` bytes with headroom: the next power of two, at least 1 MiB."""
    return max(MIN_SEGMENT_BYTES, 1 << (max(needed, 1) - 1).bit_length())


def nbytes_of(dtype: torch.dtype, shape: tuple[int, ...] | list[int]) -> int:
    return math.prod(shape) * dtype.itemsize


class Segment:
    """One mapped /dev/shm file."""

    def __init__(self, name: str, size: int, memory: mmap.mmap | None, fd: int | None = None) -> None:
        self.name = name
        self.size = size
        self._memory = memory
        # The server's side keeps a descriptor and copies with pread/pwrite instead of mapping:
        # the client owns the file and could shrink it, and touching a mapping past the end of
        # a shrunk file is SIGBUS, which would kill the server with every tenant's streams.
        self._fd = fd
        self._closer = weakref.finalize(self, os.close, fd) if fd is not None else None
        self.linked = True

    @property
    def path(self) -> str:
        return os.path.join(SHM_DIR, self.name)

    @classmethod
    def create(cls, size: int) -> tuple[Segment, bytes]:
        """A new segment of ``size`` bytes with a fresh nonce written at offset 0: (segment, nonce)."""
        name = f"{NAME_PREFIX}{secrets.token_hex(16)}"
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise SegmentError(error.errno, f"cannot create {path}: {error.strerror}") from None
        try:
            # Reserve the pages now: on a full tmpfs a plain ftruncate succeeds and the first
            # write past the free space kills the process with SIGBUS instead.
            os.posix_fallocate(fd, 0, size)
            memory = mmap.mmap(fd, size)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise SegmentError(error.errno, f"cannot allocate {size} bytes in {path}: {error.strerror}") from None
        finally:
            os.close(fd)  # the mapping keeps its own reference to the file
        nonce = secrets.token_bytes(NONCE_BYTES)
        memory[0:NONCE_BYTES] = nonce
        return cls(name, size, memory), nonce

    @classmethod
    def attach(cls, name: str, size: int, nonce: bytes) -> tuple[Segment, bytes]:
        """The server side: map the client's segment, check its nonce, write ours: (segment, our nonce)."""
        if not _NAME.fullmatch(name):
            raise SegmentError(0, f"invalid shared-memory segment name {name!r}")
        if len(nonce) != NONCE_BYTES or not HEADER_BYTES <= size <= 1 << 40:
            raise SegmentError(0, "invalid shared-memory attach request")
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as error:
            raise SegmentError(error.errno, f"cannot open {path}: {error.strerror}") from None
        segment = cls(name, size, None, fd)  # owns fd from here: closed with the segment
        segment.linked = False  # the client owns the name
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size != size:
                raise SegmentError(0, f"{path} is not a {size}-byte shared-memory segment")
            if not hmac.compare_digest(os.pread(fd, NONCE_BYTES, 0), nonce):
                raise SegmentError(0, f"{path} holds another nonce: not the client's segment (another host?)")
            ours = secrets.token_bytes(NONCE_BYTES)
            segment.write_bytes(NONCE_BYTES, ours)
        except OSError as error:
            segment.close()
            if isinstance(error, SegmentError):
                raise
            raise SegmentError(error.errno, f"cannot use {path}: {error.strerror}") from None
        return segment, ours

    def close(self) -> None:
        """Release the server side's descriptor now; only where nothing else can be using it."""
        if self._closer is not None:
            self._closer()

    def peer_nonce(self) -> bytes:
        assert self._memory is not None
        return bytes(self._memory[NONCE_BYTES : 2 * NONCE_BYTES])

    def unlink(self) -> None:
        """Remove the name; the memory lives on while either side has it mapped."""
        if self.linked:
            self.linked = False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def contains(self, offset: int, nbytes: int) -> bool:
        return offset >= HEADER_BYTES and offset % 8 == 0 and nbytes >= 0 and offset + nbytes <= self.size

    def view(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
        """A writable tensor over the region at ``offset``; it keeps the mapping alive."""
        count = math.prod(shape)
        if count == 0:
            return torch.empty(tuple(shape), dtype=dtype)
        if self._fd is not None:  # the server's side: a private copy, so the client cannot change it mid-use
            buffer = bytearray(nbytes_of(dtype, shape))
            if os.preadv(self._fd, [buffer], offset) != len(buffer):
                raise SegmentError(0, f"{self.path} is shorter than the region at {offset}: the segment shrank")
            return torch.frombuffer(buffer, dtype=dtype, count=count).reshape(tuple(shape))
        assert self._memory is not None
        return torch.frombuffer(self._memory, dtype=dtype, count=count, offset=offset).reshape(tuple(shape))

    def write_bytes(self, offset: int, data: bytes | memoryview) -> None:
        if self._fd is not None:
            view = memoryview(data)
            while view:  # pwrite past the end extends the file: never SIGBUS
                view = view[os.pwrite(self._fd, view, offset + len(data) - len(view)) :]
            return
        assert self._memory is not None
        self._memory[offset : offset + len(data)] = data


def region(offset: int, nbytes: int) -> pb.SharedRegion:
    return pb.SharedRegion(offset=offset, nbytes=nbytes)
