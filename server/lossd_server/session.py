"""One session: its spec and, for OLS, the soft labels and this epoch's statistics.

The math lives in ``lossd.functional``; this class only owns state and its lock,
so concurrent requests never lose or double-apply an update. Ranks that share the
session finish an epoch together: :meth:`Session.arrive` records each rank's
next_epoch, and the last arrival publishes S from everyone's statistics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from lossd import functional as F
from lossd._exceptions import AbortedError, FailedPreconditionError, InvalidArgumentError, LossdError
from lossd._kernels import MathKernel
from lossd._spec import SessionSpec
from lossd_server.batch import Batch
from lossd_server.footprint import Budgets, epoch_end_bytes, ols_math_kernel, state_bytes
from lossd_server.memory import Reservation, Unlimited
from lossd_server.replay import Commit, ReplayLimits, ReplayLog
from lossd_server.spec import MAX_COUNT, MAX_EPOCH, finite_in_float32
from lossd_server.statedb import Statistics, StoredSession

# Called under the session lock before a new state is published: when an epoch
# finishes, or LoadState replaces the state. Receives the new state's statistics
# and S (None for stateless kinds). If it raises, nothing changes.
DurableHook = Callable[["Session", Statistics, "torch.Tensor | None"], None]


def request_digest(rank: int, request_id: str) -> bytes:
    """A fixed-size key for (rank, request id): what the progress log records and a resend is matched by."""
    return hashlib.blake2b(f"{rank}\0{request_id}".encode(), digest_size=16).digest()


@dataclass(frozen=True)
class Progress:
    """One applied training batch, as the progress log records it (see lossd_server.progress)."""

    epoch: int
    changes: int  # Session.changes right after it: unique, so a record written twice counts once
    samples: int
    digest: bytes  # request_digest, or 16 zero bytes for a request without an id (it cannot be resent)


NO_DIGEST = bytes(16)


@dataclass(frozen=True)
class StateSnapshot:
    epoch: int
    soft_labels: torch.Tensor  # class-major [C, C] float32 (whatever the session holds), CPU
    accumulator: torch.Tensor  # class-major [C, C] float64, CPU
    counts: torch.Tensor  # [C] int64, CPU
    samples_this_epoch: int


@dataclass(frozen=True)
class Upload:
    """Statistics an epoch-cached client accumulated: rows of the class-major accumulator."""

    classes: torch.Tensor  # [K] int64 in [0, C)
    rows: torch.Tensor  # [K, C] float64: row j is added to accumulator row classes[j]
    counts: torch.Tensor  # [K] int64 >= 0
    samples: int
    correct: int


@dataclass(frozen=True)
class Result:
    output: F.LossOutput
    epoch: int
    samples_seen: int = 0  # in this epoch, after this batch, counting samples a crash lost
    progress: Progress | None = None  # for the progress log; None when nothing was counted


@dataclass(frozen=True)
class SessionView:
    """A consistent copy of what GetSession reports."""

    name: str
    spec: SessionSpec
    epoch: int
    samples_this_epoch: int
    correct_this_epoch: int
    created_at: float
    updated_at: float
    state_bytes: int
    ranks_finished: tuple[int, ...]
    samples_lost: int = 0
    snapshot_at: float = 0.0


def _response_bytes(response: object) -> int:
    """What a kept replay response costs: its own ``nbytes``, or a protobuf message's size."""
    nbytes = getattr(response, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    byte_size = getattr(response, "ByteSize", None)
    return int(byte_size()) if callable(byte_size) else 0


@dataclass(frozen=True)
class _Finished:
    epoch: int  # the epoch that was finished
    view: SessionView  # the answer every rank got


class Session:
    def __init__(
        self,
        name: str,
        spec: SessionSpec,
        device: torch.device,
        replay: ReplayLimits | None = None,
        *,
        math_kernel: MathKernel = "eager",
        budgets: Budgets | None = None,
        soft_dtype: torch.dtype = torch.float32,
        initial_state: bool = True,
    ) -> None:
        """``initial_state=False`` leaves the matrices empty for :meth:`from_stored` to fill, so a
        session loaded from the store never holds a second, initial set beside the stored one.
        ``soft_dtype``: what S is held in (float32 or bfloat16); it is float32 wherever it leaves."""
        self.name = name
        # The budgets: what the session holds (its reservation is the store's), and transient work.
        self.memory: Reservation | None = None
        self._budgets = budgets or Budgets(Unlimited(), Unlimited())
        self._soft_dtype = soft_dtype
        self._ols = spec.kind == "online_label_smoothing"
        # The eager ops or the device's fused kernel (lossd._kernels); only OLS sessions read S.
        self.math_kernel = ols_math_kernel(math_kernel, soft_dtype, device) if self._ols else math_kernel
        self.spec = spec
        self.device = device
        self.created_at = self.updated_at = time.time()
        self.epoch = 0
        self.samples_this_epoch = 0
        self.correct_this_epoch = 0
        self._replay_limits = replay or ReplayLimits()
        self.replay: ReplayLog[object] = ReplayLog(self._replay_limits, self._budgets.state, _response_bytes)
        self._lock = threading.Lock()
        # Durability: training ids whose statistics are in the accumulator (so a snapshot
        # carries them), a counter of changes since the last snapshot, and what a crash lost.
        self._applied: dict[int, OrderedDict[str, str]] = {}
        self.incarnation = uuid.uuid4().hex  # this creation of the name, as the store keys it
        self.changes = 0  # bumped by every change of state; never goes down
        self.saved_changes = 0  # what the store last made durable
        self.samples_lost = 0
        # Batches a crash lost that a resend may still re-apply: request_digest -> samples.
        self.lost: dict[bytes, int] = {}
        self.snapshot_at = 0.0
        self.last_used = time.time()
        self.on_epoch: DurableHook | None = None
        self.on_replace: DurableHook | None = None
        self._retired: LossdError | None = None
        # The barrier of the current epoch: who has called next_epoch, and what they wait on.
        self._ranks_finished: set[int] = set()
        self._epoch_done: Future[SessionView] = Future()
        self._last_finished: _Finished | None = None
        # Bumped whenever the soft labels or the epoch change, so a computation started
        # outside the lock can tell whether it still applies.
        self._generation = 0
        weights = spec.weight_tensor
        self._weight = weights.to(device) if weights is not None else None
        c = spec.n_classes
        if self._ols:
            assert spec.init is not None and spec.convention in ("uniform", "off_target")
            self._soft_labels = self._initial_soft_labels() if initial_state else torch.empty(0)
            self._accumulator = torch.zeros((c, c) if initial_state else 0, dtype=torch.float64, device=device)
            self._counts = torch.zeros(c, dtype=torch.int64, device=device)

    @property
    def state_bytes(self) -> int:
        return state_bytes(self.spec, self._soft_dtype)

    @property
    def answer_bytes(self) -> int:
        """The session's matrices as answers carry them: S in float32."""
        return state_bytes(self.spec)

    def _initial_soft_labels(self) -> torch.Tensor:
        spec, c = self.spec, self.spec.n_classes
        assert spec.init is not None and spec.convention in ("uniform", "off_target")
        initial = F.initial_soft_labels(c, spec.smoothing, spec.init, spec.convention, device=self.device)
        if self._soft_dtype == torch.float32:
            return initial
        # Rounded from the float32 values, as every later S is; the float32 copy is there for a moment.
        with self._budgets.transients.reserve(initial.nbytes, f"the initial soft labels of session {self.name!r}"):
            rounded = initial.to(self._soft_dtype)
            del initial
            return rounded

    @property
    def world_size(self) -> int:
        return self.spec.world_size

    def check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise InvalidArgumentError(f"rank: expected 0 <= rank < world_size={self.world_size} but got {rank}")

    def _view(self) -> SessionView:
        return SessionView(
            name=self.name,
            spec=self.spec,
            epoch=self.epoch,
            samples_this_epoch=self.samples_this_epoch,
            correct_this_epoch=self.correct_this_epoch,
            created_at=self.created_at,
            updated_at=self.updated_at,
            state_bytes=self.state_bytes,
            ranks_finished=tuple(sorted(self._ranks_finished)),
            samples_lost=self.samples_lost,
            snapshot_at=self.snapshot_at,
        )

    def view(self) -> SessionView:
        with self._lock:
            return self._view()

    def _check_epoch(self, epoch: int | None, rank: int, training: bool) -> None:
        """Called under the lock: a request must be for the current epoch, from a rank still in it."""
        self._check_live()
        if epoch is not None and epoch != self.epoch:
            raise FailedPreconditionError(
                f"session {self.name!r} is at epoch {self.epoch}, but the request from rank {rank} is for epoch {epoch}"
            )
        if training and rank in self._ranks_finished:
            raise FailedPreconditionError(
                f"rank {rank} already called next_epoch for epoch {self.epoch} of session {self.name!r}; "
                "its training batches for the epoch are closed until every rank has called it"
            )

    def _forward(
        self, logits: torch.Tensor, labels: torch.Tensor, need_grad: bool, soft_labels: torch.Tensor | None
    ) -> F.LossOutput:
        # The kinds differ only in their targets; everything else is one code path.
        spec = self.spec
        safe, valid = F.safe_labels(labels, spec.ignore_index)
        if soft_labels is not None:
            assert spec.alpha is not None
            targets = F.ols_targets(soft_labels, spec.alpha)
        else:
            assert spec.convention is not None
            targets = F.smoothed_targets(spec.n_classes, spec.smoothing, spec.convention)
        return F.target_cross_entropy(
            logits,
            safe,
            valid,
            targets,
            weight=self._weight,
            reduction=spec.reduction,
            need_grad=need_grad,
            kernel=self.math_kernel,
        )

    def _soft_labels_or_none(self) -> torch.Tensor | None:
        return self._soft_labels if self._ols else None

    def _check_live(self) -> None:
        if self._retired is not None:
            raise self._retired

    @property
    def retired(self) -> bool:
        return self._retired is not None

    def waiting(self) -> bool:
        """Whether ranks wait in next_epoch (such a session must stay in memory)."""
        with self._lock:
            return bool(self._ranks_finished)

    def statistics_of_retired(self) -> tuple[Statistics, int]:
        """The final statistics of a retired session (no batch can land any more)."""
        assert self._retired is not None
        return self._statistics_unchecked()

    def unretire(self) -> None:
        with self._lock:
            self._retired = None

    def retire(self, error: LossdError) -> None:
        """This object no longer holds the session (moved to the store, or the server stopped).

        Calls that still hold it get ``error`` (UNAVAILABLE, so clients retry and find
        the session again) instead of changing state that nothing will save.
        """
        with self._lock:
            self._retired = error
            self._release_waiters(error)

    def release_memory(self) -> None:
        """Give back what the session reserved (it left memory for good); its tensors go with the object."""
        self.replay.close()
        if self.memory is not None:
            self.memory.release()

    def compute(
        self,
        batch: Batch,
        *,
        training: bool,
        need_grad: bool,
        rank: int = 0,
        epoch: int | None = None,
        request: tuple[str, str] | None = None,
        commit: Commit | None = None,
    ) -> Result:
        """Loss and gradient; in training mode, also this epoch's statistics, atomically.

        ``epoch``, when given, must be the session's epoch. The math runs outside the
        lock, on the (epoch, soft labels) pair current when it starts, so ranks sharing
        a session compute in parallel; only adding the statistics is serialised.

        All or nothing: everything that can fail runs before the one in-place change
        (the accumulator's ``index_add_``); ``commit`` is marked right after it.
        """
        self.check_rank(rank)
        logits, labels = batch.logits.to(self.device), batch.labels.to(self.device)
        with self._lock:
            self._check_epoch(epoch, rank, training)
            generation, current, soft_labels = self._generation, self.epoch, self._soft_labels_or_none()
        # next_epoch and restore replace the soft-label tensor, they never write into it.
        output = self._forward(logits, labels, need_grad, soft_labels)
        if not training:
            return Result(output, current)
        rows, probs = self._statistics_of(output, labels, batch.shared)
        with self._lock:
            self._check_epoch(epoch, rank, training)
            if generation != self._generation:
                # The epoch ended or the state was replaced meanwhile (an untagged request):
                # compute again against the state the statistics will be added to.
                output = self._forward(logits, labels, need_grad, self._soft_labels_or_none())
                rows, probs = self._statistics_of(output, labels, batch.shared)
            counts = None
            if rows is not None and probs is not None:
                counts = self._counts.index_add(0, rows, torch.ones_like(rows))  # a new tensor: nothing changed yet
            self._check_totals(output.n_used, counts)
            if rows is not None and probs is not None:
                self._accumulator.index_add_(0, rows, probs)
            progress = self._counted(output.n_used, output.n_correct, counts, rank, request, commit)
            return Result(output, self.epoch, self.samples_this_epoch + self.samples_lost, progress)

    def _statistics_of(
        self, output: F.LossOutput, labels: torch.Tensor, shared: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The correct rows and their softmax that a training batch adds (None, None but for OLS).

        ``shared``: the logits are memory the client can still write, so the finite check before the math
        proves nothing about what the math read; what would go into the accumulator is checked again.
        """
        if not self._ols:
            return None, None
        rows, probs = F.correct_rows(output, labels)
        if shared and probs.numel() and not bool(torch.isfinite(probs).all()):
            raise InvalidArgumentError(
                "logits: changed in the segment during the step (NaN or infinity after the check found none)"
            )
        return rows, probs

    def _check_totals(self, samples: int, counts: torch.Tensor | None) -> None:
        """Under the lock, before anything changes: no total may pass MAX_COUNT (so none can overflow).
        The correct count is at most the samples, so bounded by the same check."""
        if self.samples_this_epoch + samples + self.samples_lost > MAX_COUNT or (
            counts is not None and counts.numel() and int(counts.max()) > MAX_COUNT
        ):
            raise InvalidArgumentError(
                f"samples: session {self.name!r} would count more than {MAX_COUNT} samples in epoch {self.epoch} "
                f"({self.samples_this_epoch} so far, {samples} more); call next_epoch first"
            )

    def _counted(
        self,
        samples: int,
        correct: int,
        counts: torch.Tensor | None,
        rank: int,
        request: tuple[str, str] | None,
        commit: Commit | None,
    ) -> Progress:
        """Under the lock, after the accumulator took the batch: the commit. Nothing here can fail."""
        if counts is not None:
            self._counts = counts
        if commit is not None:
            commit.applied = True
        self.samples_this_epoch += samples
        self.correct_this_epoch += correct
        self.updated_at = time.time()
        self.changes += 1
        digest = NO_DIGEST
        if request is not None:
            applied = self._applied.setdefault(rank, OrderedDict())
            applied[request[0]] = request[1]
            while len(applied) > self._replay_limits.ids:
                applied.popitem(last=False)
            digest = request_digest(rank, request[0])
            if self.lost:  # after a crash: a resend of a lost batch is counted now, so it is no longer lost
                self.samples_lost -= self.lost.pop(digest, 0)
        return Progress(self.epoch, self.changes, samples, digest)

    def add_statistics(
        self,
        upload: Upload,
        *,
        rank: int,
        epoch: int,
        request: tuple[str, str] | None = None,
        commit: Commit | None = None,
    ) -> tuple[SessionView, int, Progress]:
        """Epoch-cached mode: add a client's locally accumulated statistics, atomically.

        ``upload`` must already be validated by :func:`check_upload`. Returns the
        session after it and the epoch's samples seen (counting samples a crash lost).
        """
        self.check_rank(rank)
        if not self._ols:
            raise InvalidArgumentError(
                f"session: {self.name!r} is a {self.spec.kind} session; only online_label_smoothing keeps statistics"
            )
        classes = upload.classes.to(self.device)
        rows = upload.rows.to(self.device, torch.float64)
        counts = upload.counts.to(self.device, torch.int64)
        with self._lock:
            self._check_epoch(epoch, rank, True)
            new_counts = self._counts.index_add(0, classes, counts) if classes.numel() else None
            self._check_totals(upload.samples, new_counts)
            if classes.numel():
                self._accumulator.index_add_(0, classes, rows)
            progress = self._counted(upload.samples, upload.correct, new_counts, rank, request, commit)
            return self._view(), self.samples_this_epoch + self.samples_lost, progress

    def soft_labels(self) -> tuple[int, torch.Tensor]:
        """(epoch, class-major S on the CPU), read together: what an epoch-cached client computes with."""
        with self._lock:
            self._check_live()
            if not self._ols:
                raise InvalidArgumentError(
                    f"session: {self.name!r} is a {self.spec.kind} session; only online_label_smoothing has soft labels"
                )
            return self.epoch, self._soft_labels.to("cpu", torch.float32, copy=True)

    def arrive(self, rank: int, epoch: int | None) -> Future[SessionView]:
        """Record that ``rank`` finished ``epoch``; the future resolves when every rank has.

        The last arrival finishes the epoch before returning. A repeat for the epoch
        just finished gets the answer the first calls got, and advances nothing.
        """
        self.check_rank(rank)
        with self._lock:
            self._check_live()
            if epoch is None:
                if self.world_size > 1:
                    raise InvalidArgumentError(
                        f"epoch: required when world_size > 1 (session {self.name!r} has world_size={self.world_size})"
                    )
                epoch = self.epoch
            last = self._last_finished
            if last is not None and last.epoch == epoch == self.epoch - 1:
                repeat: Future[SessionView] = Future()
                repeat.set_result(last.view)
                return repeat
            if epoch != self.epoch:
                raise FailedPreconditionError(
                    f"session {self.name!r} is at epoch {self.epoch}, but next_epoch was called for epoch {epoch}"
                    + (f" by rank {rank}" if self.world_size > 1 else "")
                )
            if self.epoch >= MAX_EPOCH:  # no epoch past the bound, so every state stays loadable
                raise FailedPreconditionError(f"session {self.name!r} is at epoch {self.epoch}, the last one")
            self._ranks_finished.add(rank)
            done = self._epoch_done
            if len(self._ranks_finished) == self.world_size:
                try:
                    with self._budgets.transients.reserve(
                        epoch_end_bytes(self.spec), f"the end of epoch {self.epoch} of session {self.name!r}", wait=5.0
                    ):
                        self._finish_epoch()
                except BaseException:
                    self._ranks_finished.discard(rank)  # not finished: this rank's retry arrives afresh
                    raise
            return done

    def missing_ranks(self, epoch: int) -> list[int] | None:
        """The ranks that have not called next_epoch for ``epoch``; None once it is over."""
        with self._lock:
            if epoch != self.epoch:
                return None
            return [r for r in range(self.world_size) if r not in self._ranks_finished]

    def abort_barrier(self, error: LossdError) -> None:
        """Fail every rank waiting in next_epoch (the session was deleted or its state replaced)."""
        with self._lock:
            self._release_waiters(error)

    def _release_waiters(self, error: LossdError) -> None:
        if self._ranks_finished:
            self._epoch_done.set_exception(error)
            self._epoch_done = Future()
            self._ranks_finished.clear()

    def _finish_epoch(self) -> None:
        """Called under the lock by the last rank to arrive."""
        finished = self.epoch
        self._advance()
        self._ranks_finished.clear()
        view = self._view()
        self._last_finished = _Finished(finished, view)
        self._epoch_done.set_result(view)
        self._epoch_done = Future()

    def _advance(self) -> None:
        soft_labels = stored = None
        if self._ols:
            assert self.spec.empty_class is not None
            # Computed in float64 and float32 whatever S is held in, then rounded once (epoch_end_bytes).
            soft_labels = F.next_soft_labels(self._accumulator, self._counts, self._soft_labels, self.spec.empty_class)
            soft_labels = soft_labels.to(self._soft_dtype)
            stored = soft_labels.to(torch.float32)  # the store keeps float32; on a GPU it is copied out in chunks
        new = Statistics(self.epoch + 1, None, None, 0, 0, 0, {}, time.time(), self.changes + 1)
        if self.on_epoch is not None:
            self.on_epoch(self, new, stored)  # durable first
            self.saved_changes, self.snapshot_at = new.changes, new.taken_at
        if soft_labels is not None:
            self._soft_labels = soft_labels
            self._accumulator.zero_()
            self._counts.zero_()
        self.samples_lost = 0
        self.lost.clear()
        self.changes = new.changes
        self._applied.clear()  # ids of the finished epoch: its requests are refused by their epoch tag now
        self.epoch += 1
        self._generation += 1
        self.samples_this_epoch = 0
        self.correct_this_epoch = 0
        self.updated_at = time.time()

    def statistics(self) -> tuple[Statistics, int]:
        """The current epoch's statistics (copied on the session's device: snapshot_bytes of the
        transients account) and the change count they reflect."""
        with self._lock:
            self._check_live()
        return self._statistics_unchecked()

    def _statistics_unchecked(self) -> tuple[Statistics, int]:
        with self._lock:
            acc = counts = None
            if self._ols:
                acc, counts = self._accumulator.clone(), self._counts.clone()  # briefly under the lock
            applied = {rank: list(ids.items()) for rank, ids in self._applied.items()}
            statistics = Statistics(
                self.epoch,
                acc,
                counts,
                self.samples_this_epoch,
                self.correct_this_epoch,
                self.samples_lost,
                applied,
                time.time(),
                self.changes,
                {digest.hex(): samples for digest, samples in self.lost.items()},
            )
            return statistics, self.changes

    @classmethod
    def from_stored(
        cls,
        stored: StoredSession,
        device: torch.device,
        replay: ReplayLimits | None,
        progress: list[Progress],
        *,
        math_kernel: MathKernel = "eager",
        budgets: Budgets | None = None,
        soft_dtype: torch.dtype = torch.float32,
    ) -> Session:
        """Rebuild a session from the store.

        ``progress``: the batches the progress log recorded as applied; those of the
        stored epoch that the snapshot does not cover are what the crash lost.
        """
        session = cls(
            stored.name,
            stored.spec,
            device,
            replay,
            math_kernel=math_kernel,
            budgets=budgets,
            soft_dtype=soft_dtype,
            initial_state=False,
        )
        try:
            session._restore_stored(stored, progress)
        except BaseException:
            session.replay.close()  # the replay log's reservations go with the half-built session
            raise
        return session

    def _restore_stored(self, stored: StoredSession, progress: list[Progress]) -> None:
        device, c = self.device, self.spec.n_classes
        self.incarnation = stored.incarnation
        self.created_at, self.updated_at = stored.created_at, stored.updated_at
        self.epoch = stored.epoch
        if self._ols:
            if stored.supervise is not None:
                self._soft_labels = stored.supervise.to(device, self._soft_dtype)
            else:
                self._soft_labels = self._initial_soft_labels()
        statistics = stored.statistics
        if self._ols:
            if statistics is not None and statistics.accumulator is not None and statistics.counts is not None:
                self._accumulator = statistics.accumulator.to(device, torch.float64)
                self._counts = statistics.counts.to(device, torch.int64)
            else:
                self._accumulator = torch.zeros((c, c), dtype=torch.float64, device=device)
        if statistics is not None:
            self.samples_this_epoch, self.correct_this_epoch = statistics.samples, statistics.correct
            self.snapshot_at = statistics.taken_at
            self.changes = self.saved_changes = statistics.changes
            for rank, ids in statistics.applied.items():
                applied = self._applied.setdefault(rank, OrderedDict())
                for request_id, fingerprint in ids:
                    applied[request_id] = fingerprint
                    self.replay.restore_applied(rank, request_id, fingerprint)
        self.samples_lost, self.lost, last_change = lost_in_crash(stored, progress)
        # Later changes must not reuse the numbers of the records still in the log.
        self.changes = self.saved_changes = max(self.changes, last_change)
        if self.epoch > 0:
            # A rank whose next_epoch answer was lost in the crash repeats the call: answer it
            # as the epoch's end was answered (the new epoch, before any of its batches).
            finished = dataclasses.replace(
                self._view(), samples_this_epoch=0, correct_this_epoch=0, samples_lost=0, snapshot_at=0.0
            )
            self._last_finished = _Finished(self.epoch - 1, finished)

    def snapshot(self) -> StateSnapshot:
        with self._lock:
            self._check_live()
            if self._ols:
                soft = self._soft_labels.to("cpu", torch.float32, copy=True)
                acc, counts = (t.to("cpu", copy=True) for t in (self._accumulator, self._counts))
            else:  # stateless kinds carry empty matrices
                soft = torch.zeros((0, 0), dtype=torch.float32)
                acc = torch.zeros((0, 0), dtype=torch.float64)
                counts = torch.zeros(0, dtype=torch.int64)
            return StateSnapshot(self.epoch, soft, acc, counts, self.samples_this_epoch)

    def restore(self, state: StateSnapshot) -> None:
        """Replace the whole state. ``state`` must already be validated by :func:`check_state`."""
        check_state(self.spec, state)
        # On a device the new matrices sit beside the old ones until they replace them.
        device = self._budgets.device
        room = device.reserve(self.state_bytes, f"LoadState of session {self.name!r}", wait=5.0) if device else None
        with room or contextlib.nullcontext():
            self._replace(state)

    def _replace(self, state: StateSnapshot) -> None:
        correct = int(state.counts.sum()) if self._ols else 0
        matrices = stored = None
        if self._ols:  # copied before the lock: the input does not change
            soft = state.soft_labels.to(self.device, self._soft_dtype, copy=True)
            acc = state.accumulator.to(self.device, torch.float64, copy=True)
            matrices = soft, acc, state.counts.to(self.device, torch.int64, copy=True)
            # S as the session will hold it, in the store's float32: the input itself unless it is rounded.
            rounded = self._soft_dtype != torch.float32
            stored = (soft if rounded else state.soft_labels).to("cpu", torch.float32)
        with self._lock:
            self._check_live()
            new = Statistics(
                state.epoch,
                state.accumulator.to("cpu", torch.float64) if self._ols else None,
                state.counts.to("cpu", torch.int64) if self._ols else None,
                state.samples_this_epoch,
                correct,
                0,
                {},
                time.time(),
                self.changes + 1,
            )
            if self.on_replace is not None:  # durable before it is acknowledged, or nothing changes
                self.on_replace(self, new, stored)
                self.saved_changes, self.snapshot_at = new.changes, new.taken_at
            self._release_waiters(
                AbortedError(
                    f"the state of session {self.name!r} was replaced while ranks waited in next_epoch; call it again"
                )
            )
            self._last_finished = None
            self._generation += 1
            if matrices is not None:
                self._soft_labels, self._accumulator, self._counts = matrices
            self.epoch = state.epoch
            self.samples_this_epoch = state.samples_this_epoch
            self.correct_this_epoch = correct
            self.updated_at = time.time()
            self.samples_lost = 0
            self.lost.clear()
            self._applied.clear()
            self.changes = new.changes


def lost_in_crash(stored: StoredSession, progress: list[Progress]) -> tuple[int, dict[bytes, int], int]:
    """(samples_lost, lost batches by request digest, the last change number in the log) of a stored session.

    The snapshot's own figures, plus the batches the progress log recorded after it
    (see lossd_server.progress): a record written twice counts once, and a batch
    re-applied and lost again is lost once.
    """
    statistics = stored.statistics
    samples_lost = statistics.samples_lost if statistics is not None else 0
    lost = {bytes.fromhex(digest): n for digest, n in statistics.lost.items()} if statistics is not None else {}
    covered = statistics.changes if statistics is not None else 0
    records = {record.changes: record for record in progress if record.epoch == stored.epoch}
    for record in records.values():
        if record.changes <= covered:
            continue
        if record.digest == NO_DIGEST:  # no id: it cannot be resent, so it is lost for good
            samples_lost += record.samples
        elif record.digest not in lost:
            lost[record.digest] = record.samples
            samples_lost += record.samples
    return samples_lost, lost, max(records, default=0)


def view_of_stored(
    stored: StoredSession, progress: list[Progress], soft_dtype: torch.dtype = torch.float32
) -> SessionView:
    """What GetSession reports of a session out of memory, from its summary alone: no matrix is allocated."""
    statistics = stored.statistics
    return SessionView(
        name=stored.name,
        spec=stored.spec,
        epoch=stored.epoch,
        samples_this_epoch=statistics.samples if statistics is not None else 0,
        correct_this_epoch=statistics.correct if statistics is not None else 0,
        created_at=stored.created_at,
        updated_at=stored.updated_at,
        state_bytes=state_bytes(stored.spec, soft_dtype),
        ranks_finished=(),
        samples_lost=lost_in_crash(stored, progress)[0],
        snapshot_at=statistics.taken_at if statistics is not None else 0.0,
    )


def check_state(spec: SessionSpec, state: StateSnapshot) -> None:
    """InvalidArgumentError naming the field of a state that does not fit the spec."""
    c = spec.n_classes if spec.kind == "online_label_smoothing" else 0
    if not 0 <= state.epoch <= MAX_EPOCH:
        raise InvalidArgumentError(f"state.epoch: expected >= 0 and at most {MAX_EPOCH} but got {state.epoch}")
    if not 0 <= state.samples_this_epoch <= MAX_COUNT:
        raise InvalidArgumentError(
            f"state.samples_this_epoch: expected >= 0 and at most {MAX_COUNT} but got {state.samples_this_epoch}"
        )
    for field, tensor, shape in (
        ("supervise", state.soft_labels, (c, c)),
        ("accumulator", state.accumulator, (c, c)),
        ("counts", state.counts, (c,)),
    ):
        if tuple(tensor.shape) != shape:
            raise InvalidArgumentError(f"state.{field}: expected shape {list(shape)} but got {list(tensor.shape)}")
    for field, tensor in (("supervise", state.soft_labels), ("accumulator", state.accumulator)):
        if not tensor.is_floating_point():
            raise InvalidArgumentError(f"state.{field}: expected a floating point tensor but got {tensor.dtype}")
        if not finite_in_float32(tensor):
            raise InvalidArgumentError(
                f"state.{field}: contains NaN, infinity or a value beyond float32's range (S is float32)"
            )
    if state.accumulator.numel():
        low, high = torch.aminmax(state.accumulator)
        if float(low) < 0 or float(high) > MAX_COUNT:
            raise InvalidArgumentError(
                f"state.accumulator: entries are sums of probabilities, expected 0 <= entry <= {MAX_COUNT} "
                f"but got {float(low) if float(low) < 0 else float(high):.6g}"
            )
    if state.counts.is_floating_point() or state.counts.dtype == torch.bool:
        raise InvalidArgumentError(f"state.counts: expected int64 or int32 but got {state.counts.dtype}")
    if state.counts.numel():
        low, high = torch.aminmax(state.counts)
        if int(low) < 0:
            raise InvalidArgumentError("state.counts: negative count")
        total = sum(state.counts.tolist())  # in Python ints: an int64 sum could wrap around
        if int(high) > MAX_COUNT or total > MAX_COUNT:
            raise InvalidArgumentError(f"state.counts: expected a sum of at most {MAX_COUNT} but got {total}")
        if total > state.samples_this_epoch:
            raise InvalidArgumentError(
                f"state.counts: they sum to {total}, more than samples_this_epoch={state.samples_this_epoch}; "
                "each counted sample is one of the epoch's samples"
            )


# Each row sums counts[j] softmax vectors, so it sums to counts[j] up to float32 rounding of the probabilities.
_ROW_SUM_TOLERANCE = 1e-3


def check_upload(spec: SessionSpec, upload: Upload) -> None:
    """InvalidArgumentError naming the field of uploaded statistics that cannot be what a client accumulated."""
    c = spec.n_classes
    classes, rows, counts = upload.classes, upload.rows, upload.counts
    if classes.dtype != torch.int64 or classes.dim() != 1:
        raise InvalidArgumentError(
            f"classes: expected a [K] int64 tensor but got {list(classes.shape)} {classes.dtype}"
        )
    k = classes.shape[0]
    if rows.dtype != torch.float64 or tuple(rows.shape) != (k, c):
        raise InvalidArgumentError(f"rows: expected shape [{k}, {c}] float64 but got {list(rows.shape)} {rows.dtype}")
    if counts.dtype != torch.int64 or tuple(counts.shape) != (k,):
        raise InvalidArgumentError(f"counts: expected shape [{k}] int64 but got {list(counts.shape)} {counts.dtype}")
    if k and not bool(((classes >= 0) & (classes < c)).all()):
        bad = int(classes[(classes < 0) | (classes >= c)][0])
        raise InvalidArgumentError(f"classes: {bad} is outside [0, {c})")
    if k and not bool(torch.isfinite(rows).all()):
        raise InvalidArgumentError("rows: contains NaN or infinity")
    if k and bool((rows < 0).any()):
        raise InvalidArgumentError("rows: negative entry; rows are sums of probabilities")
    if k and bool((counts < 0).any()):
        raise InvalidArgumentError("counts: negative count")
    if k:
        sums = rows.sum(dim=1)
        off = (sums - counts.to(torch.float64)).abs() > _ROW_SUM_TOLERANCE * counts.clamp(min=1).to(torch.float64)
        if bool(off.any()):
            j = int(off.nonzero()[0, 0])
            raise InvalidArgumentError(
                f"rows: row {j} (class {int(classes[j])}) sums to {float(sums[j]):.6g} but counts[{j}] is "
                f"{int(counts[j])}; each row must be the sum of counts[j] probability vectors"
            )
    if not 0 <= upload.samples <= MAX_COUNT:
        raise InvalidArgumentError(f"samples: expected >= 0 and at most {MAX_COUNT} but got {upload.samples}")
    total = sum(counts.tolist()) if k else 0  # in Python ints: an int64 sum could wrap around
    if upload.correct < 0:
        raise InvalidArgumentError(f"correct: expected >= 0 but got {upload.correct}")
    if upload.correct != total:
        raise InvalidArgumentError(f"correct: expected sum(counts) = {total} but got {upload.correct}")
    if upload.correct > upload.samples:
        raise InvalidArgumentError(f"correct: {upload.correct} exceeds samples ({upload.samples})")
