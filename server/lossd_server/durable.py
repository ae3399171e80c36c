"""The default store: sessions in memory for speed, made durable in SQLite under ``--state-dir``.

What is durable, and when (the README's durability promise):

- creating, deleting and LoadState are on disk before they are acknowledged;
- a finished epoch's S is committed (fsync) before any rank's next_epoch returns;
- the current epoch's statistics are snapshotted every ``snapshot_seconds`` when
  they changed, when a session goes idle and moves out of memory, and at shutdown;
- every training batch bumps a per-session progress count, so after kill -9 the
  restored session reports exactly how many of the epoch's samples were lost.

A session object that leaves memory (idle TTL, shutdown, delete) is retired:
calls still holding it get UNAVAILABLE or NOT_FOUND instead of changing state
nothing will save, and the client's retry finds the session again.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lossd._exceptions import LossdError, NotFoundError, ResourceExhaustedError, UnavailableError
from lossd._kernels import MathKernel
from lossd._spec import SessionSpec
from lossd_server.config import Settings
from lossd_server.footprint import SOFT_LABEL_DTYPES, Budgets, snapshot_bytes
from lossd_server.memory import MemoryAccount, Reservation, Unlimited
from lossd_server.progress import ProgressFiles
from lossd_server.replay import ReplayLimits
from lossd_server.session import Progress, Session, SessionView, view_of_stored
from lossd_server.statedb import SessionGone, StateDB, Statistics, StoreFileError
from lossd_server.store import (
    MemoryStore,
    SessionStore,
    SoftLabelHistory,
    StoreStats,
    admit,
    check_name,
    reuse,
)

log = logging.getLogger("lossd_server.durable")
# How long taking a session out of memory (idle, shutdown) waits for room for its snapshot copy.
RETIRE_MEMORY_WAIT_SECONDS = 10.0
Key = tuple[str, str]  # (owner, name)


def _lock_directory(directory: Path) -> int:
    """One server per state directory: two would overwrite each other's snapshots."""
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreFileError(f"{directory}: another lossd server is using this state directory") from None
    return fd


class DurableStore:
    def __init__(
        self,
        directory: Path,
        *,
        device: torch.device,
        max_sessions: int,
        matrix_memory_bytes: int,
        replay: ReplayLimits | None = None,
        snapshot_seconds: float = 5.0,
        history_bytes: int = 64 << 20,
        idle_ttl_seconds: float = 1800.0,
        math_kernel: MathKernel = "eager",
        work_memory: MemoryAccount | None = None,
        device_memory: MemoryAccount | None = None,
        soft_dtype: torch.dtype = torch.float32,
    ) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory = directory
        self._replay = replay or ReplayLimits()
        self._max_sessions = max_sessions
        self.memory = MemoryAccount("state", matrix_memory_bytes, "matrix_memory_bytes")
        self.budgets = Budgets(self.memory, work_memory or Unlimited(), device_memory)
        self._device, self._soft_dtype = device, soft_dtype
        # How this store makes a session, new or from the store: one place for what every session shares.
        self._build = functools.partial(
            Session,
            device=device,
            replay=self._replay,
            math_kernel=math_kernel,
            budgets=self.budgets,
            soft_dtype=soft_dtype,
        )
        self._restore = functools.partial(
            Session.from_stored,
            device=device,
            replay=self._replay,
            math_kernel=math_kernel,
            budgets=self.budgets,
            soft_dtype=soft_dtype,
        )
        self._history_bytes = history_bytes
        self._idle_ttl = idle_ttl_seconds
        self._snapshot_seconds = snapshot_seconds
        self._lock = threading.RLock()
        self._resident: dict[Key, Session] = {}
        self._closed = False
        self._lock_fd = _lock_directory(directory)
        try:
            self._db = StateDB(directory)
            try:
                self._known: set[Key] = set(self._db.names())
                self._progress = ProgressFiles(directory / "progress")
                self._progress.keep_only(self._db.incarnations())
                self._load_at_startup()
            except BaseException:
                self._db.close()
                raise
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._snapshot_loop, name="lossd-snapshots", daemon=True)
        self._thread.start()

    def _load_at_startup(self) -> None:
        """Bring every stored session back, most recently used first, as far as the memory budget allows."""
        loaded = lost = 0
        for key in self._db.most_recent_first():
            try:
                session = self._load(key)
            except ResourceExhaustedError:
                continue  # stays in the store; loaded on first use if memory frees up
            loaded += 1
            lost += session.samples_lost
        log.info(
            "state store %s: %d sessions, %d loaded into memory, %d current-epoch samples lost in a crash",
            self._db.path,
            len(self._known),
            loaded,
            lost,
            extra={"sessions": len(self._known), "loaded": loaded, "samples_lost": lost},
        )

    # Memory residency --------------------------------------------------------------

    def _used_bytes(self) -> int:
        return sum(session.state_bytes for session in self._resident.values())

    def _new_session(self, name: str, spec: SessionSpec, *, new: bool, build: Callable[[], Session]) -> Session:
        return admit(
            name,
            spec,
            sessions=len(self._known) if new else 0,  # a stored session already counts
            max_sessions=self._max_sessions,
            budgets=self.budgets,
            soft_dtype=self._soft_dtype,
            build=build,
            resident=list(self._resident.values()),
            hint=f" (idle sessions leave memory after idle_ttl_seconds={self._idle_ttl:g})",
        )

    def _attach(self, key: Key, session: Session) -> Session:
        owner = key[0]
        session.on_epoch = lambda s, new, supervise: self._commit(owner, s, new, supervise, replaced=False)
        session.on_replace = lambda s, new, supervise: self._commit(owner, s, new, supervise, replaced=True)
        self._resident[key] = session
        return session

    def _load(self, key: Key) -> Session:
        """Called under the store lock."""
        summary = self._db.summary(*key)
        if summary is None:
            raise NotFoundError(f"session {key[1]!r} not found")

        def build() -> Session:
            # Read straight into the session's device and dtype, a chunk at a time: no host copy on a GPU.
            stored = self._db.load(*key, device=self._device, soft_dtype=self._soft_dtype)
            if stored is None:
                raise NotFoundError(f"session {key[1]!r} not found")
            return self._restore(stored, progress=self._progress.read(stored.incarnation))

        # Reserved before the matrices are read, from the spec alone.
        session = self._new_session(key[1], summary.spec, new=False, build=build)
        self._attach(key, session)
        if session.samples_lost:
            log.warning(
                "session %r: %d samples of epoch %d were seen after the last snapshot and lost in a crash",
                key[1],
                session.samples_lost,
                session.epoch,
                extra={"session": key[1], "epoch": session.epoch, "samples_lost": session.samples_lost},
            )
            session.changes += 1  # record the loss in the next snapshot
        return session

    def _commit(
        self, owner: str, session: Session, new: Statistics, supervise: torch.Tensor | None, *, replaced: bool
    ) -> None:
        """Under the session's lock, before anyone is told: the new state is on disk or nothing changes."""
        try:
            self._db.commit_epoch(
                owner,
                session.name,
                session.incarnation,
                new.epoch,
                supervise,
                new,
                self._history_bytes,
                replaced=replaced,
            )
        except SessionGone:
            raise NotFoundError(f"session {session.name!r} was deleted") from None
        except Exception as error:
            log.exception("could not make the new state of session %r durable", session.name)
            raise UnavailableError(
                f"could not make epoch {new.epoch} of session {session.name!r} durable: {error}"
            ) from error
        self._progress.covered(session.incarnation, new.changes)  # the new state covers every batch before it

    # SessionStore ----------------------------------------------------------------

    def create(self, owner: str, name: str, spec: SessionSpec) -> tuple[Session, bool]:
        check_name(name)
        key = (owner, name)
        with self._lock:
            if key in self._resident or key in self._known:
                return reuse(self.get(owner, name), spec), False
            session = self._new_session(
                name,
                spec,
                new=True,
                build=lambda: self._build(name, spec),
            )
            try:
                self._db.put_session(owner, name, session.incarnation, spec, session.created_at)
            except BaseException:
                session.release_memory()
                raise
            self._known.add(key)
            return self._attach(key, session), True

    def get(self, owner: str, name: str) -> Session:
        check_name(name)
        key = (owner, name)
        with self._lock:
            session = self._resident.get(key)
            if session is None:
                if key not in self._known:
                    raise NotFoundError(f"session {name!r} not found")
                session = self._load(key)
            session.last_used = time.time()
            return session

    def soft_labels_at(self, owner: str, name: str, epoch: int) -> torch.Tensor | None:
        session = self.get(owner, name)
        current, soft = session.soft_labels()
        if epoch == current:
            return soft
        return self._db.soft_labels_at(owner, name, epoch, session.spec.n_classes)

    def soft_label_history(self, owner: str, name: str) -> SoftLabelHistory:
        session = self.get(owner, name)
        current = session.soft_labels()  # the live S: a just-finished epoch may be committed, never stale
        kept = [
            (epoch, soft)
            for epoch in self._db.history(owner, name)
            if epoch != current[0]
            and (soft := self._db.soft_labels_at(owner, name, epoch, session.spec.n_classes)) is not None
        ]
        return [*kept, current]

    def list(self, owner: str) -> list[SessionView]:
        with self._lock:
            keys = sorted(key for key in self._known if key[0] == owner)
            resident = {key: self._resident.get(key) for key in keys}
        views = []
        for key in keys:
            session = resident[key]
            if session is not None:
                views.append(session.view())
                continue
            stored = self._db.summary(*key)  # no matrices read for a session out of memory
            if stored is not None:  # else deleted meanwhile
                progress = self._progress.read(stored.incarnation)
                views.append(view_of_stored(stored, progress, self._soft_dtype))
        return views

    def delete(self, owner: str, name: str) -> Session | None:
        check_name(name)
        key = (owner, name)
        with self._lock:
            if key not in self._known:
                raise NotFoundError(f"session {name!r} not found")
            session = self._resident.pop(key, None)
            incarnation = None
            if session is not None:
                # Retired first: a call still holding it can no longer change or save anything.
                session.abort_barrier(NotFoundError(f"session {name!r} was deleted while ranks waited in next_epoch"))
                session.retire(NotFoundError(f"session {name!r} was deleted"))
                session.release_memory()
                incarnation = session.incarnation
            else:
                stored = self._db.summary(owner, name)
                incarnation = stored.incarnation if stored is not None else None
            self._db.delete_session(owner, name)
            self._known.discard(key)
            if incarnation is not None:
                self._progress.release(incarnation, delete=True)
        return session

    def record_progress(self, owner: str, session: Session, progress: Progress | None) -> None:
        """Best effort: the batch is applied already, so a failure here must not fail (and resend) it."""
        if session.retired or progress is None:
            return
        try:
            self._progress.record(session.incarnation, progress)
        except Exception:
            log.exception("could not record progress of session %r; samples_lost may read low", session.name)

    def stats(self) -> StoreStats:
        now = time.time()
        with self._lock:
            sessions = list(self._resident.values())
            count, used = len(self._known), self._used_bytes()
        unsaved = [s for s in sessions if s.changes != s.saved_changes]
        oldest = min((s.snapshot_at or s.created_at for s in unsaved), default=now)
        return StoreStats(sessions=count, matrix_bytes=used, snapshot_age_seconds=max(0.0, now - oldest))

    # Snapshots and idle sessions -------------------------------------------------

    def _save(self, key: Key, session: Session, statistics: Statistics) -> None:
        """Write a snapshot; versioned by Session.changes, so one taken earlier never overwrites a later one."""
        if statistics.changes == session.saved_changes:
            return
        self._db.put_statistics(key[0], key[1], session.incarnation, statistics.epoch, session.updated_at, statistics)
        if statistics.changes > session.saved_changes:
            session.saved_changes = statistics.changes
            session.snapshot_at = statistics.taken_at
        self._progress.covered(session.incarnation, statistics.changes)  # the log keeps only later batches

    def _staging(self, session: Session, wait: float = 0.0) -> Reservation:
        """Room for the snapshot's staging copy of the accumulator, where the accumulator is (Budgets.transients):
        on a GPU it is copied there and written out a chunk at a time, so it costs no host memory."""
        return self.budgets.transients.reserve(
            snapshot_bytes(session.spec), f"the snapshot of session {session.name!r}", wait=wait
        )

    def snapshot_all(self) -> None:
        with self._lock:
            sessions = list(self._resident.items())
        for key, session in sessions:
            if session.changes == session.saved_changes:
                continue  # before statistics(): it copies the accumulator, and an idle server must copy nothing
            try:
                with self._staging(session):
                    statistics, _ = session.statistics()
                    self._save(key, session, statistics)
            except ResourceExhaustedError:
                log.info("snapshot of session %r waits for memory; retried next interval", key[1])
            except LossdError:
                pass  # retired meanwhile (moved out of memory, deleted): whoever retired it saved it
            except Exception:
                log.exception("snapshot of session %r failed; will retry", key[1])

    def _evict_idle(self) -> None:
        if not self._idle_ttl:
            return
        cutoff = time.time() - self._idle_ttl
        with self._lock:
            idle = [(k, s) for k, s in self._resident.items() if max(s.last_used, s.updated_at) < cutoff]
        for key, session in idle:
            if not session.waiting():
                self._retire(key, session, UnavailableError(f"session {key[1]!r} moved out of memory; call again"))

    def _retire(self, key: Key, session: Session, error: UnavailableError) -> bool:
        """Take the session out of memory with its final statistics saved; if saving fails it stays."""
        with self._lock:
            if self._resident.get(key) is not session:
                return True
            try:
                with self._staging(session, wait=RETIRE_MEMORY_WAIT_SECONDS):
                    session.retire(error)  # no batch lands after this, so the check below is final
                    if session.changes != session.saved_changes:  # else nothing to copy: it is saved
                        statistics, _ = session.statistics_of_retired()
                        self._save(key, session, statistics)
            except Exception:
                session.unretire()
                log.exception("could not save session %r; keeping it in memory", key[1])
                return False
            del self._resident[key]
            self._progress.release(session.incarnation)
            session.release_memory()
        log.info("session %r moved out of memory", key[1], extra={"session": key[1]})
        return True

    def _snapshot_loop(self) -> None:
        while not self._stop.wait(self._snapshot_seconds):
            self.snapshot_all()
            self._evict_idle()

    def close(self) -> None:
        """Retire every session with its statistics saved, then release the directory. Idempotent.

        Raises OSError naming the sessions whose final statistics could not be saved, after the
        directory is released all the same: a shutdown that lost work must not look clean.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        self._thread.join()
        with self._lock:
            sessions = list(self._resident.items())
        failed = [
            key[1]
            for key, session in sessions
            if not self._retire(key, session, UnavailableError("the server is shutting down; call again"))
        ]
        if failed:
            log.error("statistics of sessions %s could not be saved at shutdown", failed, extra={"sessions": failed})
        try:
            self._db.close()
            self._progress.close()
        finally:
            os.close(self._lock_fd)
        if failed:
            raise OSError(
                f"statistics of sessions {failed} could not be saved at shutdown; "
                "on restart they resume from their last saved snapshot"
            )


def open_store(
    settings: Settings,
    device: torch.device,
    work_memory: MemoryAccount | None = None,
    device_memory: MemoryAccount | None = None,
) -> SessionStore:
    """The store the settings ask for; a damaged store file raises StoreFileError and is left untouched.
    ``device_memory``: the CUDA device's account (lossd_server.device.device_memory), None on the CPU."""
    replay = ReplayLimits(ids=settings.replay_ids, responses=settings.replay_responses)
    soft_dtype = SOFT_LABEL_DTYPES[settings.soft_label_dtype]
    if settings.store == "memory":
        log.warning("store=memory: sessions are lost when the server stops")
        return MemoryStore(
            device=device,
            max_sessions=settings.max_sessions,
            matrix_memory_bytes=settings.matrix_memory_bytes,
            replay=replay,
            math_kernel=settings.math_kernel,
            work_memory=work_memory,
            device_memory=device_memory,
            soft_dtype=soft_dtype,
        )
    return DurableStore(
        settings.resolved_state_dir,
        device=device,
        max_sessions=settings.max_sessions,
        matrix_memory_bytes=settings.matrix_memory_bytes,
        replay=replay,
        snapshot_seconds=settings.snapshot_seconds,
        history_bytes=settings.history_bytes,
        idle_ttl_seconds=settings.idle_ttl_seconds,
        math_kernel=settings.math_kernel,
        work_memory=work_memory,
        device_memory=device_memory,
        soft_dtype=soft_dtype,
    )
