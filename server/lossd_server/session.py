"""One session: its spec and, for OLS, the soft labels and this epoch's statistics.

The math lives in ``lossd.functional``; this class only owns state and its lock,
so concurrent requests never lose or double-apply an update. Ranks that share the
session finish an epoch together: :meth:`Session.arrive` records each rank's
next_epoch, and the last arrival publishes S from everyone's statistics.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from lossd import functional as F
from lossd._exceptions import AbortedError, FailedPreconditionError, InvalidArgumentError, LossdError
from lossd._spec import SessionSpec
from lossd_server.batch import Batch
from lossd_server.replay import ReplayLimits, ReplayLog


def state_bytes(spec: SessionSpec) -> int:
    """Memory of the session's matrices: float32 soft labels, float64 accumulator, int64 counts."""
    if spec.kind != "online_label_smoothing":
        return 0
    c = spec.n_classes
    return c * c * (4 + 8) + c * 8


@dataclass(frozen=True)
class StateSnapshot:
    epoch: int
    soft_labels: torch.Tensor  # class-major [C, C] float32, CPU
    accumulator: torch.Tensor  # class-major [C, C] float64, CPU
    counts: torch.Tensor  # [C] int64, CPU
    samples_this_epoch: int


@dataclass(frozen=True)
class Result:
    output: F.LossOutput
    epoch: int


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


@dataclass(frozen=True)
class _Finished:
    epoch: int  # the epoch that was finished
    view: SessionView  # the answer every rank got


class Session:
    def __init__(self, name: str, spec: SessionSpec, device: torch.device, replay: ReplayLimits | None = None) -> None:
        self.name = name
        self.spec = spec
        self.device = device
        self.created_at = self.updated_at = time.time()
        self.epoch = 0
        self.samples_this_epoch = 0
        self.correct_this_epoch = 0
        self.replay: ReplayLog[object] = ReplayLog(replay or ReplayLimits())
        self._lock = threading.Lock()
        # The barrier of the current epoch: who has called next_epoch, and what they wait on.
        self._ranks_finished: set[int] = set()
        self._epoch_done: Future[SessionView] = Future()
        self._last_finished: _Finished | None = None
        # Bumped whenever the soft labels or the epoch change, so a computation started
        # outside the lock can tell whether it still applies.
        self._generation = 0
        self._weight = (
            torch.tensor(spec.weight, dtype=torch.float64, device=device) if spec.weight is not None else None
        )
        self._ols = spec.kind == "online_label_smoothing"
        c = spec.n_classes
        if self._ols:
            assert spec.init is not None and spec.convention in ("uniform", "off_target")
            self._soft_labels = F.initial_soft_labels(c, spec.smoothing, spec.init, spec.convention, device=device)
            self._accumulator = torch.zeros((c, c), dtype=torch.float64, device=device)
            self._counts = torch.zeros(c, dtype=torch.int64, device=device)

    @property
    def state_bytes(self) -> int:
        return state_bytes(self.spec)

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
        )

    def view(self) -> SessionView:
        with self._lock:
            return self._view()

    def _check_epoch(self, epoch: int | None, rank: int, training: bool) -> None:
        """Called under the lock: a request must be for the current epoch, from a rank still in it."""
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
            targets = F.ols_targets(safe, soft_labels, spec.alpha, F.compute_dtype(logits.dtype))
        else:
            assert spec.convention is not None
            targets = F.smoothed_targets(spec.n_classes, spec.smoothing, spec.convention)
        return F.target_cross_entropy(
            logits, safe, valid, targets, weight=self._weight, reduction=spec.reduction, need_grad=need_grad
        )

    def _soft_labels_or_none(self) -> torch.Tensor | None:
        return self._soft_labels if self._ols else None

    def compute(
        self, batch: Batch, *, training: bool, need_grad: bool, rank: int = 0, epoch: int | None = None
    ) -> Result:
        """Loss and gradient; in training mode, also this epoch's statistics, atomically.

        ``epoch``, when given, must be the session's epoch. The math runs outside the
        lock, on the (epoch, soft labels) pair current when it starts, so ranks sharing
        a session compute in parallel; only adding the statistics is serialised.
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
        rows, probs = F.correct_rows(output, labels) if self._ols else (None, None)
        with self._lock:
            self._check_epoch(epoch, rank, training)
            if generation != self._generation:
                # The epoch ended or the state was replaced meanwhile (an untagged request):
                # compute again against the state the statistics will be added to.
                output = self._forward(logits, labels, need_grad, self._soft_labels_or_none())
                rows, probs = F.correct_rows(output, labels) if self._ols else (None, None)
            if rows is not None and probs is not None:
                self._accumulator.index_add_(0, rows, probs)
                self._counts.index_add_(0, rows, torch.ones_like(rows))
            self.samples_this_epoch += output.n_used
            self.correct_this_epoch += output.n_correct
            self.updated_at = time.time()
            return Result(output, self.epoch)

    def arrive(self, rank: int, epoch: int | None) -> Future[SessionView]:
        """Record that ``rank`` finished ``epoch``; the future resolves when every rank has.

        The last arrival finishes the epoch before returning. A repeat for the epoch
        just finished gets the answer the first calls got, and advances nothing.
        """
        self.check_rank(rank)
        with self._lock:
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
            self._ranks_finished.add(rank)
            done = self._epoch_done
            if len(self._ranks_finished) == self.world_size:
                self._finish_epoch()
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
        if self._ols:
            assert self.spec.empty_class is not None
            self._soft_labels = F.next_soft_labels(
                self._accumulator, self._counts, self._soft_labels, self.spec.empty_class
            )
            self._accumulator.zero_()
            self._counts.zero_()
        self.epoch += 1
        self._generation += 1
        self.samples_this_epoch = 0
        self.correct_this_epoch = 0
        self.updated_at = time.time()

    def snapshot(self) -> StateSnapshot:
        with self._lock:
            if self._ols:
                soft, acc, counts = (
                    t.to("cpu", copy=True) for t in (self._soft_labels, self._accumulator, self._counts)
                )
            else:  # stateless kinds carry empty matrices
                soft = torch.zeros((0, 0), dtype=torch.float32)
                acc = torch.zeros((0, 0), dtype=torch.float64)
                counts = torch.zeros(0, dtype=torch.int64)
            return StateSnapshot(self.epoch, soft, acc, counts, self.samples_this_epoch)

    def restore(self, state: StateSnapshot) -> None:
        """Replace the whole state. ``state`` must already be validated by :func:`check_state`."""
        check_state(self.spec, state)
        with self._lock:
            self._release_waiters(
                AbortedError(
                    f"the state of session {self.name!r} was replaced while ranks waited in next_epoch; call it again"
                )
            )
            self._last_finished = None
            self._generation += 1
            if self._ols:
                self._soft_labels = state.soft_labels.to(self.device, torch.float32, copy=True)
                self._accumulator = state.accumulator.to(self.device, torch.float64, copy=True)
                self._counts = state.counts.to(self.device, torch.int64, copy=True)
            self.epoch = state.epoch
            self.samples_this_epoch = state.samples_this_epoch
            self.correct_this_epoch = int(state.counts.sum()) if self._ols else 0
            self.updated_at = time.time()


def check_state(spec: SessionSpec, state: StateSnapshot) -> None:
    """InvalidArgumentError naming the field of a state that does not fit the spec."""
    c = spec.n_classes if spec.kind == "online_label_smoothing" else 0
    if state.epoch < 0:
        raise InvalidArgumentError(f"state.epoch: expected >= 0 but got {state.epoch}")
    if state.samples_this_epoch < 0:
        raise InvalidArgumentError(f"state.samples_this_epoch: expected >= 0 but got {state.samples_this_epoch}")
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
        if not bool(torch.isfinite(tensor).all()):
            raise InvalidArgumentError(f"state.{field}: contains NaN or infinity")
    if state.counts.is_floating_point() or state.counts.dtype == torch.bool:
        raise InvalidArgumentError(f"state.counts: expected int64 or int32 but got {state.counts.dtype}")
    if bool((state.counts < 0).any()):
        raise InvalidArgumentError("state.counts: negative count")
