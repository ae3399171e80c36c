"""Where sessions live. In-memory for now, behind one interface so a durable store can replace it."""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Callable, Collection
from typing import Protocol

import torch

from lossd._exceptions import AlreadyExistsError, NotFoundError, ResourceExhaustedError
from lossd._kernels import MathKernel
from lossd._spec import SessionSpec
from lossd_server.footprint import Budgets, check_fits
from lossd_server.identifiers import check_session_name
from lossd_server.memory import MemoryAccount, Unlimited
from lossd_server.replay import ReplayLimits
from lossd_server.session import Progress, Session, SessionView

check_name = check_session_name  # the stores' name, kept for the callers that import it from here


def spec_diff(existing: SessionSpec, requested: SessionSpec) -> str:
    parts = []
    for field in dataclasses.fields(SessionSpec):
        old, new = getattr(existing, field.name), getattr(requested, field.name)
        if old != new:
            parts.append(f"{field.name} is {old!r}, requested {new!r}" if field.name != "weight" else "weight differs")
    return "; ".join(parts)


def reuse(existing: Session, spec: SessionSpec) -> Session:
    """Get-or-create found ``existing``: it must have been created with the same spec."""
    if existing.spec != spec:
        raise AlreadyExistsError(
            f"session {existing.name!r} exists with another spec: {spec_diff(existing.spec, spec)}"
        )
    return existing


def admit(
    name: str,
    spec: SessionSpec,
    *,
    sessions: int,
    max_sessions: int,
    budgets: Budgets,
    soft_dtype: torch.dtype,
    build: Callable[[], Session],
    resident: Collection[Session] = (),
    hint: str = "",
) -> Session:
    """``build()`` the session with its state reserved; RESOURCE_EXHAUSTED, with the numbers, when it does not fit.
    ``resident``: the sessions in memory, whose epoch ends must keep room on a device."""
    if sessions >= max_sessions:
        raise ResourceExhaustedError(f"too many sessions: {sessions} of max_sessions={max_sessions} are in use")
    held = sum(session.state_bytes for session in resident)
    needed = check_fits(
        name, spec, budgets, soft_dtype, resident=(session.spec for session in resident), resident_bytes=held
    )
    memory = budgets.matrices
    reservation = memory.try_reserve(needed)
    if reservation is None:
        raise ResourceExhaustedError(
            f"session {name!r} needs {needed} bytes of matrices (n_classes={spec.n_classes}); "
            f"{memory.used} of {memory.setting}={memory.limit} are in use{hint}"
        )
    try:
        session = build()
    except BaseException:
        reservation.release()
        raise
    session.memory = reservation
    return session


@dataclasses.dataclass(frozen=True)
class StoreStats:
    """What the metrics report about a store, read at scrape time."""

    sessions: int
    matrix_bytes: int  # OLS matrices held, the figure matrix_memory_bytes (device_memory_bytes on CUDA) limits
    # Age of the oldest change not yet snapshotted (what kill -9 would lose); 0.0 when all is saved or nothing persists.
    snapshot_age_seconds: float


# (epoch, class-major S) per kept epoch, ascending (a name of its own: the stores have a method called list).
SoftLabelHistory = list[tuple[int, torch.Tensor]]


class SessionStore(Protocol):
    """Sessions keyed by (owner, name): an owner never sees another's sessions."""

    def create(self, owner: str, name: str, spec: SessionSpec) -> tuple[Session, bool]:
        """Get-or-create: (session, created). Another spec under the name is AlreadyExistsError."""

    def get(self, owner: str, name: str) -> Session: ...

    def list(self, owner: str) -> list[SessionView]: ...

    def delete(self, owner: str, name: str) -> Session | None:
        """Remove the session; return it if it was in memory (its barrier waiters must be told)."""

    def record_progress(self, owner: str, session: Session, progress: Progress | None) -> None:
        """After each applied training batch (best effort, never raises): so a crash can report what it lost."""

    def soft_label_history(self, owner: str, name: str) -> SoftLabelHistory:
        """(epoch, class-major S) for every epoch whose S is kept, ascending; the last is the current one."""

    def soft_labels_at(self, owner: str, name: str, epoch: int) -> torch.Tensor | None:
        """The class-major S of ``epoch`` if it is kept, else None."""

    def close(self) -> None:
        """Persist what is held in memory and release the store."""

    def stats(self) -> StoreStats:
        """Called on the metrics HTTP thread at each scrape: must be thread-safe and cheap."""


class MemoryStore:
    def __init__(
        self,
        *,
        device: torch.device,
        max_sessions: int,
        matrix_memory_bytes: int,
        replay: ReplayLimits | None = None,
        math_kernel: MathKernel = "eager",
        work_memory: MemoryAccount | None = None,
        device_memory: MemoryAccount | None = None,
        soft_dtype: torch.dtype = torch.float32,
    ) -> None:
        self._replay = replay or ReplayLimits()
        self._max_sessions = max_sessions
        self.memory = MemoryAccount("state", matrix_memory_bytes, "matrix_memory_bytes")
        self.budgets = Budgets(self.memory, work_memory or Unlimited(), device_memory)
        self._soft_dtype = soft_dtype
        self._build = functools.partial(
            Session,
            device=device,
            replay=self._replay,
            math_kernel=math_kernel,
            budgets=self.budgets,
            soft_dtype=soft_dtype,
        )
        self._sessions: dict[tuple[str, str], Session] = {}
        self._lock = threading.Lock()

    def _used_bytes(self) -> int:
        return sum(session.state_bytes for session in self._sessions.values())

    def create(self, owner: str, name: str, spec: SessionSpec) -> tuple[Session, bool]:
        check_name(name)
        with self._lock:
            existing = self._sessions.get((owner, name))
            if existing is not None:
                return reuse(existing, spec), False
            session = admit(
                name,
                spec,
                sessions=len(self._sessions),
                max_sessions=self._max_sessions,
                budgets=self.budgets,
                soft_dtype=self._soft_dtype,
                build=lambda: self._build(name, spec),
                resident=list(self._sessions.values()),
            )
            self._sessions[owner, name] = session
            return session, True

    def get(self, owner: str, name: str) -> Session:
        check_name(name)
        with self._lock:
            session = self._sessions.get((owner, name))
        if session is None:
            raise NotFoundError(f"session {name!r} not found")
        return session

    def soft_label_history(self, owner: str, name: str) -> SoftLabelHistory:
        return [self.get(owner, name).soft_labels()]  # memory keeps no past epochs

    def soft_labels_at(self, owner: str, name: str, epoch: int) -> torch.Tensor | None:
        current, soft = self.get(owner, name).soft_labels()
        return soft if epoch == current else None

    def list(self, owner: str) -> list[SessionView]:
        with self._lock:
            mine = [session for (session_owner, _), session in self._sessions.items() if session_owner == owner]
        return [session.view() for session in sorted(mine, key=lambda session: session.name)]

    def delete(self, owner: str, name: str) -> Session:
        check_name(name)
        with self._lock:
            session = self._sessions.pop((owner, name), None)
        if session is None:
            raise NotFoundError(f"session {name!r} not found")
        session.release_memory()
        return session

    def record_progress(self, owner: str, session: Session, progress: Progress | None) -> None:
        """Nothing survives a restart here, so there is nothing to report."""

    def close(self) -> None:
        """Nothing to persist: memory sessions end with the server."""

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(sessions=len(self._sessions), matrix_bytes=self._used_bytes(), snapshot_age_seconds=0.0)
