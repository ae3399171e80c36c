"""Where sessions live. In-memory for now, behind one interface so a durable store can replace it."""

from __future__ import annotations

import dataclasses
import re
import threading
from typing import Protocol

import torch

from lossd._exceptions import AlreadyExistsError, InvalidArgumentError, NotFoundError, ResourceExhaustedError
from lossd._spec import SessionSpec
from lossd_server.replay import ReplayLimits
from lossd_server.session import Session, state_bytes

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+=-]{0,255}")


def check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise InvalidArgumentError(
            f"name: expected 1-256 letters, digits and ._:/@+=- starting with a letter or digit, got {name!r}"
        )


def _spec_diff(existing: SessionSpec, requested: SessionSpec) -> str:
    parts = []
    for field in dataclasses.fields(SessionSpec):
        old, new = getattr(existing, field.name), getattr(requested, field.name)
        if old != new:
            parts.append(f"{field.name} is {old!r}, requested {new!r}" if field.name != "weight" else "weight differs")
    return "; ".join(parts)


class SessionStore(Protocol):
    """Sessions keyed by (owner, name): an owner never sees another's sessions."""

    def create(self, owner: str, name: str, spec: SessionSpec) -> tuple[Session, bool]:
        """Get-or-create: (session, created). Another spec under the name is AlreadyExistsError."""

    def get(self, owner: str, name: str) -> Session: ...

    def list(self, owner: str) -> list[Session]: ...

    def delete(self, owner: str, name: str) -> Session:
        """Remove and return the session."""

    def close(self) -> None:
        """Persist what is held in memory and release the store."""


class MemoryStore:
    def __init__(
        self,
        *,
        device: torch.device,
        max_sessions: int,
        matrix_memory_bytes: int,
        replay: ReplayLimits | None = None,
    ) -> None:
        self._device = device
        self._replay = replay or ReplayLimits()
        self._max_sessions = max_sessions
        self._matrix_memory_bytes = matrix_memory_bytes
        self._sessions: dict[tuple[str, str], Session] = {}
        self._lock = threading.Lock()

    def _used_bytes(self) -> int:
        return sum(session.state_bytes for session in self._sessions.values())

    def create(self, owner: str, name: str, spec: SessionSpec) -> tuple[Session, bool]:
        check_name(name)
        with self._lock:
            existing = self._sessions.get((owner, name))
            if existing is not None:
                if existing.spec != spec:
                    raise AlreadyExistsError(
                        f"session {name!r} exists with another spec: {_spec_diff(existing.spec, spec)}"
                    )
                return existing, False
            if len(self._sessions) >= self._max_sessions:
                raise ResourceExhaustedError(
                    f"too many sessions: {len(self._sessions)} of max_sessions={self._max_sessions} are in use"
                )
            needed, used = state_bytes(spec), self._used_bytes()
            if used + needed > self._matrix_memory_bytes:
                raise ResourceExhaustedError(
                    f"session {name!r} needs {needed} bytes of matrices (n_classes={spec.n_classes}); "
                    f"{used} of matrix_memory_bytes={self._matrix_memory_bytes} are in use"
                )
            session = Session(name, spec, self._device, self._replay)
            self._sessions[owner, name] = session
            return session, True

    def get(self, owner: str, name: str) -> Session:
        with self._lock:
            session = self._sessions.get((owner, name))
        if session is None:
            raise NotFoundError(f"session {name!r} not found")
        return session

    def list(self, owner: str) -> list[Session]:
        with self._lock:
            mine = [session for (session_owner, _), session in self._sessions.items() if session_owner == owner]
        return sorted(mine, key=lambda session: session.name)

    def delete(self, owner: str, name: str) -> Session:
        with self._lock:
            session = self._sessions.pop((owner, name), None)
        if session is None:
            raise NotFoundError(f"session {name!r} not found")
        return session

    def close(self) -> None:
        """Nothing to persist: memory sessions end with the server."""
