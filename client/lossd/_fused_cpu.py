"""The fused loss kernel on the CPU: numba, parallel over rows, cached on disk, no C++ compiler needed.

Each row is read from memory once: its maximum (with the non-finite check), then,
from the L1-resident row, ``exp(z - m)`` into the gradient row with the sums that
give the loss, then the gradient in place. The formulas and the contract are in
:mod:`lossd._fused`.

``fastmath`` is limited to flags that keep NaN and infinity semantics ("nnan" and
"ninf" are off), so a row holding either still comes out with a non-finite loss,
which sends the batch to the eager math; reassociation lets the reductions vectorise.
Half-precision logits are widened to float32 by torch first (numba has no bfloat16).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import numpy as np
import torch

from lossd._fused import REDUCTIONS, FusedRows

log = logging.getLogger("lossd")

# Below this many logits a parallel region costs more than it saves.
_PARALLEL_MIN_ELEMENTS = 1 << 16

_lock = threading.Lock()
_kernels: dict[str, Any] | None = None
_failure: str | None = None
_parallel_lock: threading.Lock | None = None  # set when the threading layer is not thread-safe
_threads = threading.local()  # the numba thread count last set from each thread


def _load() -> dict[str, Any]:
    """The kernels, compiled on first use (``cache=True``: compiled once per machine, then loaded)."""
    # A thread-safe layer (OpenMP or TBB) lets several server threads run parallel kernels at once.
    os.environ.setdefault("NUMBA_THREADING_LAYER", "threadsafe")
    import numba

    from lossd import _numba_kernels

    return {
        "loss_rows": _numba_kernels.loss_rows,
        "add_statistics": _numba_kernels.add_statistics,
        "correct_probs": _numba_kernels.correct_probs,
        "numba": numba,
    }


def available() -> str | None:
    """None when the kernel loads (compiling or loading it from numba's cache), else why not."""
    global _kernels, _failure, _parallel_lock
    if _kernels is not None:  # loaded: every step asks, so no lock on this path
        return None
    with _lock:
        if _kernels is None and _failure is None:
            try:
                kernels = _load()
                _warm_up(kernels)
                _kernels = kernels
                if kernels["numba"].threading_layer() == "workqueue":
                    _parallel_lock = threading.Lock()  # numba's own pool must not run two regions at once
            except Exception as error:  # numba missing or unusable: the eager math runs instead
                _failure = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        return _failure


def _warm_up(kernels: dict[str, Any]) -> None:
    """Compile (or load) the signatures a server uses, float32 and float64, so no step waits for them."""
    for dtype in (np.float32, np.float64):
        x = np.zeros((2, 3), dtype=dtype)
        labels = np.zeros(2, dtype=np.int64)
        rows = np.ones(2, dtype=dtype)
        kernels["loss_rows"](
            x, labels, np.ones(2, dtype=np.bool_), np.ones(3, dtype=dtype), np.eye(3, dtype=np.float32),
            np.array([1, 0, 0, 0], dtype=dtype), 0, True, np.empty((2, 3), dtype=dtype), np.empty(2, dtype=dtype),
            np.empty(2, dtype=np.bool_), np.empty(2, dtype=dtype), np.empty(2, dtype=dtype), 1,
        )  # fmt: skip
        kernels["add_statistics"](
            x, labels, np.ones(2, dtype=np.bool_), rows, rows, np.zeros((3, 3), dtype=np.float64),
            np.zeros(3, dtype=np.int64),
        )  # fmt: skip
        kernels["correct_probs"](x, labels, rows, rows, np.empty((2, 3), dtype=np.float64))


def _numpy(tensor: torch.Tensor | None, dtype: Any, shape: tuple[int, ...]) -> Any:
    return np.zeros(shape, dtype=dtype) if tensor is None else tensor.numpy()


def _empty_placeholders(dtype: Any) -> tuple[Any, Any, Any]:
    """(no valid mask, no weights, no table): empty arrays of the kernel's types, made once."""
    return np.zeros(0, dtype=np.bool_), np.zeros(0, dtype=dtype), np.zeros((1, 0), dtype=np.float32)


_PLACEHOLDERS = {np.float32: _empty_placeholders(np.float32), np.float64: _empty_placeholders(np.float64)}


def _float32_numpy(table: torch.Tensor) -> Any:
    if table.dtype == torch.float32 and table.is_contiguous():
        return table.numpy()
    return table.to(torch.float32).contiguous().numpy()


def _tensor(array: Any) -> torch.Tensor:
    """``array`` as a tensor sharing its memory; an empty one made by torch (from_numpy gives it 0 strides,
    which the transports' byte views refuse)."""
    return torch.from_numpy(array) if array.size else torch.empty(array.shape, dtype=torch.from_numpy(array).dtype)


class NumbaBackend:
    """:class:`lossd._fused.Backend` on the CPU."""

    name = "numba"

    def _kernels(self, elements: int) -> dict[str, Any]:
        """The kernels, their parallel regions sized to torch's thread count (one knob for both)."""
        failure = available()
        if failure is not None or _kernels is None:
            raise RuntimeError(f"the numba kernel is unavailable: {failure}")
        numba = _kernels["numba"]
        threads = 1 if elements < _PARALLEL_MIN_ELEMENTS else torch.get_num_threads()
        threads = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))
        if getattr(_threads, "count", None) != threads:  # numba's count is per calling thread; setting it costs
            numba.set_num_threads(threads)
            _threads.count = threads
        return _kernels

    def loss_rows(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        valid: torch.Tensor | None,
        spike: float,
        base: float,
        table: torch.Tensor | None,
        table_scale: float,
        weight: torch.Tensor | None,
        reduction: str,
        need_grad: bool,
        *,
        accumulate: tuple[torch.Tensor, torch.Tensor] | None = None,
        overwrite_logits: bool = False,
    ) -> FusedRows:
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        # Each conversion is skipped where it would be a no-op: this runs at every step.
        x = (logits if logits.dtype == dtype and logits.is_contiguous() else logits.to(dtype).contiguous()).numpy()
        labels_np = labels.numpy()
        n, n_classes = x.shape
        kernels = self._kernels(n * n_classes)
        np_dtype = x.dtype
        no_valid, no_weight, no_table = _PLACEHOLDERS[np_dtype.type]
        # Outputs as numpy arrays wrapped once (fewer conversions: this runs at every step). overwrite_logits
        # is not taken up: the kernel keeps exp(z - m) in the gradient row while it still reads the logits'
        # row, and on the CPU a fresh [N, C] buffer costs little next to the math.
        grad = np.empty((n, n_classes) if need_grad else (0, 0), dtype=np_dtype)
        losses = np.empty(n, dtype=np_dtype)  # its own: handed out as the loss of reduction 'none'
        per_row = np.empty((2, n), dtype=np_dtype)  # row maxima, 1 / sums of exponentials
        correct = np.empty(n, dtype=np.bool_)
        total, finite, n_correct = self._call(
            kernels["loss_rows"], x, labels_np,
            no_valid if valid is None else valid.numpy(),
            no_weight if weight is None else weight.to(dtype).contiguous().numpy(),
            no_table if table is None else _float32_numpy(table),
            np.array([spike, base, table_scale, 0.0], dtype=np_dtype), REDUCTIONS.index(reduction), need_grad,
            grad, losses, correct, per_row[0], per_row[1],
            4 * _threads.count,  # a few chunks of rows per thread, for balance
        )  # fmt: skip
        # Only an accepted batch counts: one with a non-finite loss is recomputed eagerly or refused.
        accumulated = accumulate is not None and bool(finite)
        if accumulated and n_correct:
            assert accumulate is not None
            self._call(kernels["add_statistics"], x, labels_np, correct, per_row[0], per_row[1],
                       accumulate[0].numpy(), accumulate[1].numpy())  # fmt: skip
        rows = _tensor(per_row)
        loss = _tensor(losses) if reduction == "none" else torch.from_numpy(np.array(total, dtype=np_dtype))
        grad_or_none = _tensor(grad) if need_grad else None
        return FusedRows(
            loss, grad_or_none, _tensor(correct), rows[0], rows[1], bool(finite), int(n_correct), accumulated
        )

    def correct_probs(self, logits: torch.Tensor, rows: FusedRows, index: torch.Tensor) -> torch.Tensor:
        x = logits.to(rows.row_max.dtype).contiguous()
        out = torch.empty((index.shape[0], x.shape[1]), dtype=torch.float64)
        if index.numel():
            kernels = self._kernels(index.shape[0] * x.shape[1])
            self._call(kernels["correct_probs"], x.numpy(), index.numpy(), rows.row_max.numpy(),
                       rows.inv_sum.numpy(), out.numpy())  # fmt: skip
        return out

    def add_statistics(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        rows: FusedRows,
        accumulator: torch.Tensor,
        counts: torch.Tensor,
    ) -> None:
        x = logits.to(rows.row_max.dtype).contiguous()
        kernels = self._kernels(x.numel())
        self._call(kernels["add_statistics"], x.numpy(), labels.numpy(), rows.correct.numpy(), rows.row_max.numpy(),
                   rows.inv_sum.numpy(), accumulator.numpy(), counts.numpy())  # fmt: skip

    @staticmethod
    def _call(kernel: Any, *args: Any) -> Any:
        if _parallel_lock is None:
            return kernel(*args)
        with _parallel_lock:
            return kernel(*args)


BACKEND = NumbaBackend()
