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
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from lossd._exceptions import FailedPreconditionError, InvalidArgumentError, LossdError

R = TypeVar("R")


@dataclass(frozen=True)
class ReplayLimits:
    ids: int = 1024  # per rank: how late a resend may come
    responses: int = 2  # per rank: a client has one request in flight per stream


@dataclass
class _Entry(Generic[R]):
    fingerprint: Hashable
    done: threading.Event = field(default_factory=threading.Event)
    response: R | None = None
    error: BaseException | None = None
    dropped: bool = False
    restored: bool = False  # applied before a restart; answered by recomputing without counting


@dataclass
class _RankLog(Generic[R]):
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
    def __init__(self, limits: ReplayLimits) -> None:
        self._limits = limits
        self._ranks: dict[int, _RankLog[R]] = {}
        self._lock = threading.Lock()

    def restore_applied(self, rank: int, request_id: str, fingerprint: Hashable) -> None:
        with self._lock:
            log = self._ranks.setdefault(rank, _RankLog())
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
        compute: Callable[[], R],
        recompute: Callable[[], R] | None = None,
    ) -> R:
        """``compute()`` the first time this (rank, id) is seen, else its original outcome.

        A failed computation applied nothing, so it is forgotten and the id may be
        sent again; the copies that waited for it share its error. ``recompute()``
        answers a resend of an id restored by :meth:`restore_applied`.
        """
        entry, first = self._claim(rank, request_id, fingerprint)
        if not first:
            if entry.restored and recompute is not None:
                return recompute()
            return self._outcome(entry, rank, request_id)
        try:
            response = compute()
        except BaseException as error:
            self._settle(rank, request_id, entry, error=error)
            raise
        self._settle(rank, request_id, entry, response=response)
        return response

    def _claim(self, rank: int, request_id: str, fingerprint: Hashable) -> tuple[_Entry[R], bool]:
        with self._lock:
            log = self._ranks.setdefault(rank, _RankLog())
            entry = log.entries.get(request_id)
            if entry is not None:
                if entry.fingerprint != fingerprint:
                    raise InvalidArgumentError(
                        f"request_id {request_id!r} of rank {rank} was already used for a different request; "
                        "ids must be unique per (session, rank, step)"
                    )
                return entry, False
            entry = _Entry(fingerprint)
            log.entries[request_id] = entry
            while len(log.entries) > self._limits.ids:
                log.entries.popitem(last=False)
            return entry, True

    def _outcome(self, entry: _Entry[R], rank: int, request_id: str) -> R:
        entry.done.wait()
        if entry.error is not None:
            raise _copy_error(entry.error)
        if entry.dropped:
            raise FailedPreconditionError(
                f"request_id {request_id!r} of rank {rank} was already applied, and its response is no longer "
                f"kept (the server keeps the last {self._limits.responses} per rank); it is not applied again"
            )
        assert entry.response is not None
        return entry.response

    def _settle(
        self,
        rank: int,
        request_id: str,
        entry: _Entry[R],
        *,
        response: R | None = None,
        error: BaseException | None = None,
    ) -> None:
        with self._lock:
            log = self._ranks[rank]
            if error is not None:
                entry.error = error
                if log.entries.get(request_id) is entry:
                    del log.entries[request_id]
            else:
                entry.response = response
                log.answered.append(entry)
                while len(log.answered) > self._limits.responses:
                    old = log.answered.popleft()
                    old.response, old.dropped = None, True
            entry.done.set()
