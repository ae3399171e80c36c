"""Exactly-once training requests: a (rank, request id) is applied at most once.

A client that loses a response (a dropped connection, a server restart) resends
the request under the same id. The first copy computes and applies; a copy that
arrives while it runs waits for it, and a later one gets the stored response, so
the statistics are never counted twice and both callers see the same bytes.

Memory is bounded per rank: the last ``ids`` ids are remembered, and the
responses of the last ``responses`` of them are kept. A resend of a remembered
id whose response was dropped fails instead of being applied again.

Ids restored from a snapshot after a restart have no stored response: their
statistics are already in the restored accumulator, so a resend is answered by
recomputing without counting, which within the epoch gives the same response.

Apply is all-or-nothing. ``compute`` marks the :class:`Commit` it is handed at
the instant its effects are committed. A computation that fails before that
applied nothing: its id is forgotten and a resend is applied afresh. One that
fails after it was applied: its id is kept like a restored one, so a resend is
answered by recomputing without counting, never by applying again.

The log's memory is accounted: each rank's id log is reserved in full when the
rank first sends, and a kept response only while its reservation fits (else it
is dropped at once, as an old one is).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from lossd._exceptions import FailedPreconditionError, InvalidArgumentError, LossdError
from lossd_server.memory import MemoryAccount, Reservation, Unlimited

R = TypeVar("R")

# What one remembered id may cost, in the log and in the session's copy a snapshot carries:
# an id of at most MAX_REQUEST_ID characters, its fingerprint, and the containers' overhead.
ID_ENTRY_BYTES = 1024


@dataclass(frozen=True)
class ReplayLimits:
    ids: int = 1024  # per rank: how late a resend may come
    responses: int = 2  # per rank: a client has one request in flight per stream


class Commit:
    """Set by a computation at the instant its effects are committed (see the module docstring)."""

    __slots__ = ("applied",)

    def __init__(self) -> None:
        self.applied = False


@dataclass
class _Entry(Generic[R]):
    fingerprint: Hashable
    done: threading.Event = field(default_factory=threading.Event)
    response: R | None = None
    error: BaseException | None = None
    dropped: bool = False
    restored: bool = False  # applied, response not kept: answered by recomputing without counting
    waiters: int = 0  # copies waiting for this one's outcome: its response is kept until they read it
    memory: Reservation | None = None


@dataclass
class _RankLog(Generic[R]):
    memory: Reservation
    entries: OrderedDict[str, _Entry[R]] = field(default_factory=OrderedDict)
    answered: deque[_Entry[R]] = field(default_factory=deque)


def _copy_error(error: BaseException) -> BaseException:
    # Every waiter raises its own instance, so tracebacks from two threads never mix.
    if isinstance(error, LossdError):
        copy = type(error)(error.message)
        copy.code = error.code
        return copy
    return error


class ReplayLog(Generic[R]):
    def __init__(
        self,
        limits: ReplayLimits,
        memory: MemoryAccount | None = None,
        size_of: Callable[[R], int] | None = None,
    ) -> None:
        self._limits = limits
        self._memory = memory or Unlimited()
        self._size_of = size_of or (lambda response: 0)
        self._ranks: dict[int, _RankLog[R]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def _rank_log(self, rank: int) -> _RankLog[R]:
        """Under the lock. A rank's first request reserves its whole id log: RESOURCE_EXHAUSTED if it cannot."""
        log = self._ranks.get(rank)
        if log is None:
            # A closed log belongs to a session that left memory: its stragglers reserve nothing.
            nbytes = 0 if self._closed else self._limits.ids * ID_ENTRY_BYTES
            reservation = self._memory.reserve(nbytes, f"the replay log of rank {rank}")
            log = self._ranks[rank] = _RankLog(reservation)
        return log

    def close(self) -> None:
        """Release every reservation (the session left memory)."""
        with self._lock:
            self._closed = True
            for log in self._ranks.values():
                log.memory.release()
                for entry in log.answered:
                    self._drop(entry)
            self._ranks.clear()

    def restore_applied(self, rank: int, request_id: str, fingerprint: Hashable) -> None:
        with self._lock:
            log = self._rank_log(rank)
            entry: _Entry[R] = _Entry(fingerprint, dropped=True, restored=True)
            entry.done.set()
            log.entries[request_id] = entry
            while len(log.entries) > self._limits.ids:
                log.entries.popitem(last=False)

    def run_once(
        self,
        rank: int,
        request_id: str,
        fingerprint: Hashable,
        compute: Callable[[Commit], R],
        recompute: Callable[[], R] | None = None,
    ) -> R:
        """``compute(commit)`` the first time this (rank, id) is seen, else its original outcome.

        A computation that failed before ``commit.applied`` was set applied nothing, so
        it is forgotten and the id may be sent again; the copies that waited for it
        share its error. ``recompute()`` answers a resend of an id that is applied
        but has no kept response (restored by :meth:`restore_applied`, or failed
        after it was applied).
        """
        entry, first = self._claim(rank, request_id, fingerprint)
        if not first:
            if entry.restored and recompute is not None:
                self._unwait(entry)
                return recompute()
            return self._outcome(entry, rank, request_id, recompute)
        commit = Commit()
        try:
            response = compute(commit)
        except BaseException as error:
            self._settle(rank, request_id, entry, error=error, applied=commit.applied)
            raise
        self._settle(rank, request_id, entry, response=response)
        return response

    def _claim(self, rank: int, request_id: str, fingerprint: Hashable) -> tuple[_Entry[R], bool]:
        with self._lock:
            log = self._rank_log(rank)
            entry = log.entries.get(request_id)
            if entry is not None:
                if entry.fingerprint != fingerprint:
                    raise InvalidArgumentError(
                        f"request_id {request_id!r} of rank {rank} was already used for a different request; "
                        "ids must be unique per (session, rank, step)"
                    )
                entry.waiters += 1  # registered under the lock: its response cannot be dropped before it reads
                return entry, False
            entry = _Entry(fingerprint)
            log.entries[request_id] = entry
            while len(log.entries) > self._limits.ids:
                log.entries.popitem(last=False)
            return entry, True

    def _unwait(self, entry: _Entry[R]) -> R | None:
        """The waiter's read of the entry's response; the last waiter of a dropped entry frees it."""
        with self._lock:
            response = entry.response
            entry.waiters -= 1
            if entry.dropped and not entry.waiters:
                self._drop(entry)
            return response

    def _outcome(self, entry: _Entry[R], rank: int, request_id: str, recompute: Callable[[], R] | None = None) -> R:
        entry.done.wait()
        response = self._unwait(entry)
        if entry.error is not None:
            raise _copy_error(entry.error)
        if response is not None:
            return response
        if entry.restored and recompute is not None:  # the original failed after it was applied
            return recompute()
        raise FailedPreconditionError(
            f"request_id {request_id!r} of rank {rank} was already applied, and its response is no longer "
            f"kept (the server keeps the last {self._limits.responses} per rank); it is not applied again"
        )

    def _drop(self, entry: _Entry[R]) -> None:
        """Under the lock: forget a kept response (a waiter still reading it keeps it until it has)."""
        entry.dropped = True
        if entry.waiters:
            return
        entry.response = None
        if entry.memory is not None:
            entry.memory.release()
            entry.memory = None

    def _settle(
        self,
        rank: int,
        request_id: str,
        entry: _Entry[R],
        *,
        response: R | None = None,
        error: BaseException | None = None,
        applied: bool = False,
    ) -> None:
        # Reserved before the lock: a response that does not fit the budget is not kept.
        memory = None if response is None or self._closed else self._memory.try_reserve(self._size_of(response))
        with self._lock:
            log = self._ranks.get(rank)
            if error is not None and applied:
                # Applied, then failed: remembered, so a resend recomputes instead of applying again.
                entry.restored = entry.dropped = True
            elif error is not None:
                entry.error = error
                if log is not None and log.entries.get(request_id) is entry:
                    del log.entries[request_id]
            elif memory is None or log is None:
                entry.restored = entry.dropped = True  # over budget: answered like a restored id
                if memory is not None:
                    memory.release()
            else:
                entry.response, entry.memory = response, memory
                log.answered.append(entry)
                while len(log.answered) > self._limits.responses:
                    self._drop(log.answered.popleft())
            entry.done.set()
