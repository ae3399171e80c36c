"""Epoch-cached OLS: S fetched once per epoch, loss and gradient computed locally, statistics uploaded.

``OnlineLabelSmoothing(..., cached=True)`` keeps an :class:`EpochCache`. Each
forward computes with :func:`lossd.functional.online_label_smoothing`, the
function the server runs, on the epoch's S; each training forward adds the
rows the server would add (:func:`lossd.functional.add_statistics`) to a local
float64 accumulator. Every ``upload_every`` training steps or ``upload_seconds``
seconds (checked at each training step) the accumulated rows become one upload
with its own request id, sent by a background thread through ``AddStatistics``
and retried on UNAVAILABLE under that id, so the server applies it once.
:meth:`EpochCache.flush` (called by ``next_epoch`` before the rank arrives at
the barrier) sends what is left and waits until every upload is applied.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass

import torch

from lossd import _codec
from lossd import functional as F
from lossd._client import Client
from lossd._exceptions import (
    FailedPreconditionError,
    InvalidArgumentError,
    LossdError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
)
from lossd._spec import SessionSpec

# Statuses the server gives before changing anything, for which a resend would be refused again.
_NEVER_APPLIED = (
    InvalidArgumentError,
    FailedPreconditionError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)
log = logging.getLogger("lossd")


@dataclass(frozen=True)
class Upload:
    """One AddStatistics request: built once, so every resend carries the same id and bytes."""

    epoch: int
    request_id: str
    classes: torch.Tensor  # [K] int64, CPU
    rows: torch.Tensor  # [K, C] float64, CPU, class-major
    counts: torch.Tensor  # [K] int64, CPU
    samples: int
    correct: int


def check_labels(labels: torch.Tensor, spec: SessionSpec) -> None:
    """The server's label check (lossd_server.batch), so a bad label fails here as it would there."""
    if labels.numel() == 0:
        return
    if labels.device.type == "cpu":  # numpy's min and max cost a fraction of torch's per-op overhead
        values = labels.numpy()
        low, high = int(values.min()), int(values.max())
    else:
        low, high = (int(v) for v in torch.aminmax(labels))
    if low >= 0 and high < spec.n_classes:
        return
    in_range = ((labels >= 0) & (labels < spec.n_classes)) | (labels == spec.ignore_index)
    if not bool(in_range.all()):
        bad = int(labels[~in_range][0])
        raise InvalidArgumentError(
            f"labels: {bad} is outside [0, {spec.n_classes}) and is not ignore_index ({spec.ignore_index})"
        )


def local_gradient(grad: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """The gradient as the remote path hands it to backward: in ``dtype``, scaled by 2^exponent.

    Only float16 is scaled; it goes through the codec's own encoding so both paths round alike.
    """
    if dtype != torch.float16:
        return grad.to(dtype), 0
    message, exponent = _codec.encode_gradient(grad, dtype)
    return _codec.decode(message, "grad").to(grad.device), exponent


class EpochCache:
    """S of the module's epoch (per device), this epoch's local statistics, and the upload queue."""

    def __init__(
        self,
        client: Client,
        session: str,
        spec: SessionSpec,
        rank: int,
        *,
        upload_every: int | None,
        upload_seconds: float | None,
    ) -> None:
        self._client = client
        self._session = session
        self.spec = spec
        self._rank = rank
        self._upload_every = upload_every or None
        self._upload_seconds = upload_seconds or None
        # S: the epoch it belongs to and a class-major copy per device.
        self._epoch: int | None = None
        self._soft_labels: dict[torch.device, torch.Tensor] = {}
        self._weights: dict[torch.device, torch.Tensor] = {}
        # Statistics not yet cut into an upload (touched by the training thread only).
        self._stats_epoch: int | None = None
        self._accumulator: torch.Tensor | None = None  # [C, C] float64 on the logits' device
        self._counts: torch.Tensor | None = None  # [C] int64
        self._samples = 0
        self._correct = 0
        self._steps = 0
        self._cut_at = time.monotonic()
        # Uploads not yet acknowledged, oldest first; the sender thread works on the head.
        self._lock = threading.Condition()
        self._queue: deque[Upload] = deque()
        self._sender: threading.Thread | None = None
        self._error: LossdError | None = None

    # S ------------------------------------------------------------------------------

    def soft_labels(self, epoch: int, device: torch.device) -> torch.Tensor:
        """Class-major S of ``epoch`` on ``device``, fetched from the server once per epoch."""
        if self._epoch != epoch:
            fetched, supervise = self._client.get_soft_labels(self._session)
            if fetched != epoch:
                raise FailedPreconditionError(
                    f"session {self._session!r} is at epoch {fetched}, but this module is at epoch {epoch} "
                    "(another module or rank finished it); its cached soft labels would be of the wrong epoch"
                )
            self._soft_labels = {torch.device("cpu"): supervise.T.contiguous()}
            self._epoch = epoch
        soft = self._soft_labels.get(device)
        if soft is None:
            soft = self._soft_labels[torch.device("cpu")].to(device)
            self._soft_labels[device] = soft
        return soft

    def weight(self, device: torch.device) -> torch.Tensor | None:
        """The class weights as the server holds them: float64."""
        weights = self.spec.weight_tensor
        if weights is None:
            return None
        weight = self._weights.get(device)
        if weight is None:
            weight = self._weights[device] = weights.to(device, copy=True)
        return weight

    def invalidate(self) -> None:
        """Forget S (the state was replaced): the next forward fetches it again."""
        self._epoch = None
        self._soft_labels = {}

    # Statistics ---------------------------------------------------------------------------

    def statistics_buffers(self, epoch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(accumulator, counts) that a training batch of ``epoch`` on ``device`` adds to: handed to the
        fused kernel, which adds the batch's statistics in the same call as its loss."""
        self.raise_error()
        if self._stats_epoch != epoch:
            self.cut()
            self._stats_epoch = epoch
        if self._accumulator is None or self._counts is None or self._accumulator.device != device:
            self.cut()
            c = self.spec.n_classes
            self._accumulator = torch.zeros((c, c), dtype=torch.float64, device=device)
            self._counts = torch.zeros(c, dtype=torch.int64, device=device)
        return self._accumulator, self._counts

    def record(self, output: F.LossOutput, labels: torch.Tensor, epoch: int) -> None:
        """Count a training batch, as Session.compute counts it on the server: its statistics, unless the
        fused kernel already added them to :meth:`statistics_buffers`, and its samples."""
        if not output.statistics_added:  # else statistics_buffers ran for this epoch and device just before
            accumulator, counts = self.statistics_buffers(epoch, labels.device)
            if output.n_correct:
                F.add_statistics(output, labels, accumulator, counts)
        if not self._steps:
            self._cut_at = time.monotonic()  # upload_seconds counts from the oldest statistics not cut
        self._samples += output.n_used
        self._correct += output.n_correct
        self._steps += 1
        if (self._upload_every is not None and self._steps >= self._upload_every) or (
            self._upload_seconds is not None and time.monotonic() - self._cut_at >= self._upload_seconds
        ):
            self.cut()

    def cut(self) -> None:
        """Turn the local statistics into one queued upload (sent in the background)."""
        self._steps, self._cut_at = 0, time.monotonic()
        if self._stats_epoch is None or not self._samples:
            return  # nothing counted: rows are only added with samples
        classes = torch.zeros(0, dtype=torch.int64)
        rows = torch.zeros((0, self.spec.n_classes), dtype=torch.float64)
        counts = torch.zeros(0, dtype=torch.int64)
        if self._accumulator is not None and self._counts is not None:
            touched = self._counts.nonzero().squeeze(1)
            if touched.numel():
                classes = touched.to("cpu")
                rows = self._accumulator.index_select(0, touched).to("cpu")
                counts = self._counts.index_select(0, touched).to("cpu")
                self._accumulator.index_fill_(0, touched, 0.0)
                self._counts.index_fill_(0, touched, 0)
        upload = Upload(self._stats_epoch, uuid.uuid4().hex, classes, rows, counts, self._samples, self._correct)
        self._samples = self._correct = 0
        with self._lock:
            self._queue.append(upload)
            self._start_sender()

    def _start_sender(self) -> None:
        """Called under the lock: a sender runs while uploads are queued and no error stopped it."""
        if self._sender is None and self._queue and self._error is None:
            self._sender = threading.Thread(target=self._send_queued, name="lossd-statistics", daemon=True)
            self._sender.start()

    def _send_queued(self) -> None:
        while True:
            with self._lock:
                if not self._queue or self._error is not None:
                    self._sender = None
                    self._lock.notify_all()
                    return
                upload = self._queue[0]
            try:
                self._client.add_statistics(
                    self._session,
                    epoch=upload.epoch,
                    classes=upload.classes,
                    rows=upload.rows,
                    counts=upload.counts,
                    samples=upload.samples,
                    correct=upload.correct,
                    rank=self._rank,
                    request_id=upload.request_id,
                )
            except LossdError as error:
                with self._lock:
                    if isinstance(error, _NEVER_APPLIED):
                        self._queue.popleft()  # refused before anything changed: a resend cannot apply either
                    # Anything else (a deadline, a cancel, an internal error) may or may not have been
                    # applied: keep it, so it is resent under its id and the replay log applies it once.
                    log.warning("lossd: uploading statistics to session %r failed: %s", self._session, error)
                    self._error = error
                    continue
            except Exception as error:  # a closed client, for one: stop, and report it
                with self._lock:
                    self._error = LossdError(f"uploading statistics failed: {error!r}")
                    continue
            with self._lock:
                self._queue.popleft()

    def raise_error(self) -> None:
        """Raise (once) the error that stopped the background uploads; the upload it hit is resent later
        under its id, unless the server refused it outright (invalid, wrong epoch, unknown session, denied)."""
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def flush(self, timeout: float | None = None) -> None:
        """Upload everything recorded so far and wait until the server has applied it all."""
        self.cut()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            error, self._error = self._error, None
            if error is None:
                self._start_sender()
                while self._queue and self._error is None:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise UnavailableError(
                            f"{len(self._queue)} statistics uploads to session {self._session!r} "
                            f"still pending after {timeout:g} s"
                        )
                    self._lock.wait(remaining)
                error, self._error = self._error, None
        if error is not None:
            raise error

    @property
    def pending(self) -> int:
        """Uploads queued and not yet acknowledged."""
        with self._lock:
            return len(self._queue)
