"""Byte budgets that are reserved before memory is allocated, so a client can never make the server OOM.

The server keeps two accounts, three on a CUDA device:

- ``state`` (``--matrix-memory-bytes``): what the server holds for a client between
  calls: OLS matrices, class weights, the replay log's kept responses;
- ``requests`` (``--request-memory-bytes``): what a call in flight holds: its
  received message and everything its math and response allocate, and on the CPU
  an epoch's end and a snapshot's staging copy;
- ``device`` (``--device-memory-bytes``, CUDA only): the session matrices held on
  the device and the copies an epoch end or a snapshot makes of them there, which
  then leave the two host accounts (``lossd_server.footprint``).

A reservation that does not fit either waits a short while for work in flight to
release memory, or fails with RESOURCE_EXHAUSTED quoting the numbers.
"""

from __future__ import annotations

import asyncio
import threading
import time
from types import TracebackType

from lossd._exceptions import ResourceExhaustedError

MiB = 1 << 20


def _bytes(nbytes: int) -> str:
    return f"{nbytes} bytes" if nbytes < MiB else f"{nbytes} bytes ({nbytes / MiB:.1f} MiB)"


class MemoryAccount:
    """A thread-safe byte budget. ``reserve`` before allocating; the reservation releases it."""

    def __init__(self, name: str, limit: int, setting: str) -> None:
        self.name = name
        self.limit = limit
        self.setting = setting  # the setting that sets ``limit``, quoted in errors
        self._used = 0
        self._peak = 0
        self._condition = threading.Condition()

    @property
    def used(self) -> int:
        return self._used

    @property
    def peak(self) -> int:
        return self._peak

    def _refusal(self, nbytes: int, what: str) -> ResourceExhaustedError:
        return ResourceExhaustedError(
            f"{what} needs {_bytes(nbytes)}; {self._used} of {self.setting}={self.limit} bytes are in use "
            f"({self.name} memory)"
        )

    def _take(self, nbytes: int) -> None:
        self._used += nbytes
        self._peak = max(self._peak, self._used)

    def reserve(self, nbytes: int, what: str, *, wait: float = 0.0) -> Reservation:
        """Reserve ``nbytes``, waiting up to ``wait`` seconds for others to release; else RESOURCE_EXHAUSTED.

        A request larger than the whole budget fails at once: no amount of waiting helps it.
        """
        nbytes = max(0, int(nbytes))
        with self._condition:
            if nbytes > self.limit:
                raise self._refusal(nbytes, what)
            deadline = time.monotonic() + wait
            while self._used + nbytes > self.limit:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._refusal(nbytes, what)
                self._condition.wait(remaining)
            self._take(nbytes)
        return Reservation(self, nbytes)

    def try_reserve(self, nbytes: int) -> Reservation | None:
        """A reservation if it fits right now, else None (for memory the server can do without)."""
        nbytes = max(0, int(nbytes))
        with self._condition:
            if self._used + nbytes > self.limit:
                return None
            self._take(nbytes)
        return Reservation(self, nbytes)

    def _release(self, nbytes: int) -> None:
        with self._condition:
            self._used -= nbytes
            self._condition.notify_all()


async def reserve_async(account: MemoryAccount, nbytes: int, what: str, *, wait: float = 0.0) -> Reservation:
    """:meth:`MemoryAccount.reserve` for the event loop: it polls instead of blocking the loop's thread."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    delay = 0.001
    while True:
        reservation = account.try_reserve(nbytes)
        if reservation is not None:
            return reservation
        if nbytes > account.limit or loop.time() >= deadline:
            return account.reserve(nbytes, what)  # raises RESOURCE_EXHAUSTED with the numbers, or just fits now
        await asyncio.sleep(delay)
        delay = min(2 * delay, 0.02)


class Reservation:
    """Bytes held in an account until :meth:`release` (idempotent) or the end of a ``with`` block."""

    def __init__(self, account: MemoryAccount, nbytes: int) -> None:
        self.account = account
        self.nbytes = nbytes

    def release(self) -> None:
        nbytes, self.nbytes = self.nbytes, 0
        if nbytes:
            self.account._release(nbytes)

    def shrink(self, nbytes: int) -> None:
        """Keep only ``nbytes`` (the call turned out smaller than reserved)."""
        excess = self.nbytes - max(0, nbytes)
        if excess > 0:
            self.nbytes -= excess
            self.account._release(excess)

    def absorb(self, other: Reservation) -> None:
        """Take over ``other``'s bytes (of the same account): one reservation to release from here on."""
        assert other.account is self.account
        self.nbytes, other.nbytes = self.nbytes + other.nbytes, 0

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class Unlimited(MemoryAccount):
    """An account that never refuses: for sessions built outside a server (tests, ListSessions views)."""

    def __init__(self) -> None:
        super().__init__("unlimited", 1 << 62, "none")
