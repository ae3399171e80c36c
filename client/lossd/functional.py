"""Cross-entropy, label smoothing and Online Label Smoothing as pure functions.

Every loss here has the form ``loss_i = sum_c w_c * t_ic * (-log p_ic)`` with
``p = softmax(z)``, a per-sample target distribution ``t`` and optional class
weights ``w``, so one closed-form pass gives both the loss and its gradient::

    d loss_i / d z_i = (sum_c q_ic) * p_i - q_i,    q_ic = w_c * t_ic

With ``w_c * t_ic`` as the weighted target, this is exactly torch's
``F.cross_entropy(..., weight=, label_smoothing=)``, including its weighted
mean (divided by the summed target-class weights of the rows not ignored).

The server runs these functions; tests and the client's local paths reuse
them, so the math exists once. OLS soft labels are kept class-major here:
row ``k`` of ``soft_labels`` is the soft label of class ``k`` (the reference
module's ``supervise`` is its transpose).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch

from lossd import _kernels
from lossd._fused import Backend, FusedRows
from lossd._kernels import MathKernel

Reduction = Literal["mean", "sum", "none"]
Convention = Literal["uniform", "off_target"]
OlsInit = Literal["label_smoothing", "uniform", "zeros"]
EmptyClassPolicy = Literal["keep", "uniform", "zero"]

DEFAULT_IGNORE_INDEX = -100


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for every wire dtype, float64 only for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class LossOutput:
    """What one forward pass yields: everything the server returns and the statistics need."""

    loss: torch.Tensor  # scalar, or [N] for reduction "none"
    grad: torch.Tensor | None  # [N, C] in the compute dtype
    probs: torch.Tensor | None  # [N, C] softmax, compute dtype; None from a fused kernel, which keeps none
    valid: torch.Tensor | None  # [N] bool: label != ignore_index; None: every row counts
    correct: torch.Tensor  # [N] bool: valid and argmax(logits) == label (first maximum on ties)
    # From a fused kernel: (the kernel, the logits it read, its per-row answer), for the statistics.
    fused: tuple[Backend, torch.Tensor, FusedRows] | None = None

    def _memo(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()``, once per output, kept in the instance's __dict__ (each figure below is a device sync
        on CUDA, read by both the statistics and the response); functools.cached_property would take a lock
        per read before Python 3.12, and these are read at every step."""
        known = self.__dict__.get(key)
        if known is None:
            known = self.__dict__[key] = compute()
        return known

    @property
    def n_used(self) -> int:
        count: int = self._memo(
            "_n_used", lambda: self.correct.shape[0] if self.valid is None else int(self.valid.sum())
        )
        return count

    @property
    def n_correct(self) -> int:
        if self.fused is not None and self.fused[2].n_correct is not None:
            return self.fused[2].n_correct
        count: int = self._memo("_n_correct", lambda: int(self.correct.sum()))
        return count

    @property
    def statistics_added(self) -> bool:
        """Whether the fused kernel already added this batch's statistics to the ``accumulate`` it was given."""
        return self.fused is not None and self.fused[2].accumulated

    @property
    def finite(self) -> bool:
        """Whether every loss term is finite (a fused kernel may have counted it already)."""
        if self.fused is not None and self.fused[2].finite is not None:
            return self.fused[2].finite
        result: bool = self._memo("_finite", lambda: bool(torch.isfinite(self.loss).all()))
        return result


def smoothing_values(n_classes: int, smoothing: float, convention: Convention) -> tuple[float, float]:
    """(on-target, off-target) probabilities of a smoothed one-hot label."""
    if convention == "uniform":
        off = smoothing / n_classes
        return 1.0 - smoothing + off, off
    if convention == "off_target":
        return 1.0 - smoothing, smoothing / (n_classes - 1)
    raise ValueError(f"Expected convention to be 'uniform' or 'off_target' but got {convention!r}")


@dataclass(frozen=True)
class Targets:
    """Per-sample target distributions in factored form, so they are never built densely
    unless they must be: ``t_ic = table_scale * table[y_i, c] + base + spike * [c == y_i]``.

    ``table`` is OLS's class-major soft labels; the loss gathers its rows by label itself (so a
    fused kernel reads them in its loops), and ``table_scale`` (``1 - alpha``) folds into
    per-row scalars instead of costing a pass over [N, C].
    """

    spike: float
    base: float = 0.0
    table: torch.Tensor | None = None  # [C, C], row k: the soft target of class k
    table_scale: float = 1.0


def smoothed_targets(n_classes: int, smoothing: float, convention: Convention) -> Targets:
    on, off = smoothing_values(n_classes, smoothing, convention)
    return Targets(spike=on - off, base=off)


def ols_targets(soft_labels: torch.Tensor, alpha: float) -> Targets:
    """OLS: ``alpha * onehot(y) + (1 - alpha) * S[:, y]`` with class-major ``soft_labels``."""
    return Targets(spike=alpha, table=soft_labels, table_scale=1.0 - alpha)


def safe_labels(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(labels with ignored entries replaced by 0, mask of the rows not ignored). The mask is None
    when no row is ignored, the common case, which then skips every masking op."""
    # On a GPU the check would be a device sync before any kernel is queued; masking costs little there.
    # On the CPU numpy asks it for a fraction of torch's per-op cost (this runs at every step).
    if labels.device.type == "cpu" and not labels.requires_grad and not (labels.numpy() == ignore_index).any():
        return labels, None
    valid = labels != ignore_index
    return torch.where(valid, labels, torch.zeros_like(labels)), valid


@overload
def _column(value: torch.Tensor) -> torch.Tensor: ...
@overload
def _column(value: float) -> float: ...
@overload
def _column(value: torch.Tensor | float) -> torch.Tensor | float: ...
def _column(value: torch.Tensor | float) -> torch.Tensor | float:
    """A per-row tensor as an [N, 1] column that broadcasts over classes; a scalar (or 0-dim) as itself."""
    return value.unsqueeze(1) if isinstance(value, torch.Tensor) and value.dim() == 1 else value


def target_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor | None,
    targets: Targets,
    *,
    weight: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    need_grad: bool = True,
    kernel: MathKernel | Backend = "eager",
    accumulate: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LossOutput:
    """Loss and gradient of ``sum_c w_c t_ic (-log p_ic)`` in one pass over the logits.

    ``labels`` are the safe labels (in [0, C)); ``valid`` masks the rows that
    count (None: all of them). Ignored rows get zero loss and zero gradient.
    ``mean`` divides by the summed target-class weights of the valid rows, as
    torch does; when that sum is zero the loss is NaN (as in torch) and the
    gradient is zero.

    ``kernel`` picks the code (:mod:`lossd._kernels`): ``eager``, these torch ops, the
    definition; ``fused``, one kernel for the device (numba on the CPU, Triton on CUDA)
    with the same formulas, equal to rounding, or an error where it cannot load;
    ``auto``, the fused kernel where it loads and the eager ops otherwise. A batch
    whose fused loss is not finite (NaN or infinite logits, a mean over no weight) is
    computed again eagerly, so such rows come out exactly as the eager math has them.

    ``accumulate=(accumulator, counts)`` lets a fused kernel add the statistics (as
    :func:`add_statistics`) in the same call when every loss is finite;
    :attr:`LossOutput.statistics_added` says whether it did (the eager math never does).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"Expected reduction to be 'mean', 'sum' or 'none' but got {reduction!r}")
    backend = _kernels.resolve(kernel, logits.device)
    if backend is not None:
        rows = backend.loss_rows(
            logits, labels, valid, targets.spike, targets.base, targets.table, targets.table_scale,
            weight, reduction, need_grad, accumulate=accumulate,
        )  # fmt: skip
        output = LossOutput(rows.loss, rows.grad, None, valid, rows.correct, (backend, logits, rows))
        if output.finite:
            return output
    args = (logits, labels, valid, targets.spike, targets.base, targets.table, targets.table_scale, weight)
    loss, grad, probs, at_max, several = loss_terms(*args, reduction=reduction, need_grad=need_grad)
    correct = break_ties(logits, labels, at_max, several)
    if valid is not None:
        correct &= valid
    return LossOutput(loss=loss, grad=grad, probs=probs, valid=valid, correct=correct)


def loss_terms(
    logits: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor | None,
    spike: float | torch.Tensor,
    base: float | torch.Tensor,
    table: torch.Tensor | None,
    table_scale: float | torch.Tensor,
    weight: torch.Tensor | None,
    *,
    reduction: Reduction,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The eager body of :func:`target_cross_entropy`, free of data-dependent control flow: (loss, grad,
    probs, label at the row maximum, rows whose argmax needs a tie-break or None). The scalars may be
    0-dim tensors; a ``base`` of exactly 0.0 skips its term.
    On the CPU the cost is the op count as much as the bytes, so per-row factors stay Python
    scalars where they are constant (no weights, no ignored rows).
    """
    dtype = compute_dtype(logits.dtype)
    x = logits.to(dtype)
    n_rows, n_classes = x.shape
    # -log p_ic = log_norm_i - shifted_ic: a sum of two non-negative terms, each exact to a few ulps,
    # from one exp pass (softmax) where log_softmax + exp would take two. At the row's maximum
    # shifted is exactly 0 and softmax gives exactly 1 / sum_c exp(shifted_ic), so log_norm needs
    # no second pass either.
    row_max = x.amax(dim=1, keepdim=True)
    shifted = x - row_max
    probs = torch.softmax(x, dim=1)
    log_norm = probs.amax(dim=1).log_().neg_()
    shifted_at_label = shifted.gather(1, labels.unsqueeze(1)).squeeze(1)
    mask = None if valid is None else valid.to(dtype)
    w = weight.to(dtype) if weight is not None else None

    # q_ic = w_c t_ic = spike w_y [c == y] + base w_c + table_scale w_c table[y_i, c], term by term:
    # dot sums q_ic shifted_ic over c, mass sums q_ic.
    target_weight = w.index_select(0, labels) if w is not None else None  # w_{y_i}
    row_spike: torch.Tensor | float = spike if target_weight is None else spike * target_weight
    dot = shifted_at_label * row_spike
    mass: torch.Tensor | float = row_spike
    if not isinstance(base, float) or base:
        dot = dot + base * (shifted @ w if w is not None else shifted.sum(dim=1))
        mass = mass + base * (w.sum() if w is not None else n_classes)
    dense = None
    if table is not None:
        dense = table.index_select(0, labels).to(dtype)
        if w is not None:
            dense = dense * w
        dot = dot + table_scale * torch.linalg.vecdot(dense, shifted)
        mass = mass + table_scale * dense.sum(dim=1)
    per_sample = mass * log_norm - dot
    if mask is not None:
        per_sample = per_sample * mask

    # The factor each valid row's gradient is scaled by for the reduction (ignored rows: 0).
    row_scale: torch.Tensor | float = 1.0 if mask is None else mask
    if reduction == "none":
        loss = per_sample
    elif reduction == "sum":
        loss = per_sample.sum()
    elif mask is None and target_weight is None:
        loss = per_sample.sum() / n_rows if n_rows else per_sample.sum() / 0.0  # NaN for an empty batch, as torch
        row_scale = 1.0 / n_rows if n_rows else 0.0
    else:
        row_weight = target_weight if target_weight is not None else torch.ones_like(log_norm)
        denominator = (row_weight * mask).sum() if mask is not None else row_weight.sum()
        loss = per_sample.sum() / denominator
        reciprocal = torch.where(denominator > 0, 1.0 / denominator, torch.zeros_like(denominator))
        row_scale = reciprocal if mask is None else mask * reciprocal

    grad: torch.Tensor | None = None
    if need_grad:
        # (sum_c q_c) p - q, with each row scaled for the reduction and ignored rows zeroed.
        grad = probs * _column(mass * row_scale)
        if not isinstance(base, float) or base:
            grad -= base * (_column(row_scale) * w if w is not None else _column(row_scale))
        if dense is not None:
            dense_factor = row_scale * table_scale
            if isinstance(dense_factor, torch.Tensor):
                grad.addcmul_(dense, _column(dense_factor), value=-1.0)
            else:
                grad.add_(dense, alpha=-dense_factor)
        spike_grad = row_spike * row_scale
        if isinstance(spike_grad, torch.Tensor):
            spike_column = spike_grad.neg().to(dtype).expand(n_rows).unsqueeze(1)
        else:
            spike_column = torch.full((n_rows, 1), -spike_grad, dtype=dtype, device=x.device)
        grad.scatter_add_(1, labels.unsqueeze(1), spike_column)

    if x.device.type != "cpu":  # argmax is one fast kernel on a GPU, where a tie fallback would cost a sync
        return loss, grad, probs, x.argmax(dim=1) == labels, None
    # argmax's CPU pass is unvectorised (about 6x a vectorised one at 256x1000). At every maximum
    # shifted is 0 and elsewhere negative, so sign() sums to exactly 1 - C in a row with one
    # maximum, where the label is predicted iff its entry is 0. Rows with several maxima or a
    # non-finite maximum (NaN, inf) are left to break_ties.
    several = (shifted.sign().sum(dim=1) != 1 - n_classes) | ~row_max.squeeze(1).isfinite()
    return loss, grad, probs, shifted_at_label == 0, several


def break_ties(
    logits: torch.Tensor, labels: torch.Tensor, at_max: torch.Tensor, several: torch.Tensor | None
) -> torch.Tensor:
    """``logits.argmax(dim=1) == labels`` from :func:`loss_terms`' answer: argmax (first maximum,
    NaN as torch treats it) runs only on the rows flagged ``several``."""
    if several is not None and bool(several.any()):
        rows = several.nonzero().squeeze(1)
        at_max = at_max.clone()
        at_max[rows] = logits.index_select(0, rows).argmax(dim=1) == labels.index_select(0, rows)
    return at_max


def smoothed_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    smoothing: float = 0.0,
    convention: Convention = "uniform",
    weight: torch.Tensor | None = None,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    reduction: Reduction = "mean",
    need_grad: bool = True,
    kernel: MathKernel | Backend = "eager",
) -> LossOutput:
    """Cross-entropy with label smoothing. ``uniform`` with any ``smoothing`` equals
    ``F.cross_entropy(logits, labels, weight=, ignore_index=, reduction=, label_smoothing=)``."""
    labels_safe, valid = safe_labels(labels, ignore_index)
    targets = smoothed_targets(logits.shape[1], smoothing, convention)
    return target_cross_entropy(
        logits, labels_safe, valid, targets, weight=weight, reduction=reduction, need_grad=need_grad, kernel=kernel
    )


def online_label_smoothing(
    logits: torch.Tensor,
    labels: torch.Tensor,
    soft_labels: torch.Tensor,
    *,
    alpha: float,
    weight: torch.Tensor | None = None,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    reduction: Reduction = "mean",
    need_grad: bool = True,
    kernel: MathKernel | Backend = "eager",
    accumulate: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LossOutput:
    """``alpha * CE(z, y) + (1 - alpha) * sum_c -S[c, y] log p_c`` with class-major ``soft_labels``.
    ``accumulate``: as :func:`target_cross_entropy`'s."""
    labels_safe, valid = safe_labels(labels, ignore_index)
    targets = ols_targets(soft_labels, alpha)
    return target_cross_entropy(
        logits, labels_safe, valid, targets, weight=weight, reduction=reduction, need_grad=need_grad, kernel=kernel,
        accumulate=accumulate,
    )  # fmt: skip


def initial_soft_labels(
    n_classes: int,
    smoothing: float,
    init: OlsInit = "label_smoothing",
    convention: Convention = "off_target",
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Class-major [C, C] float32 soft labels at the start of training."""
    if init == "label_smoothing":
        on, off = smoothing_values(n_classes, smoothing, convention)
        rows = torch.full((n_classes, n_classes), off, dtype=torch.float32, device=device)
        rows.fill_diagonal_(on)
        return rows
    if init == "uniform":
        return torch.full((n_classes, n_classes), 1.0 / n_classes, dtype=torch.float32, device=device)
    if init == "zeros":
        return torch.zeros((n_classes, n_classes), dtype=torch.float32, device=device)
    raise ValueError(f"Expected init to be 'label_smoothing', 'uniform' or 'zeros' but got {init!r}")


def correct_rows(output: LossOutput, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, probabilities in float64) of the correctly predicted rows: what OLS accumulates.

    Every row counts, duplicate labels included, so callers must add them with
    ``index_add_`` rather than indexed assignment.
    """
    index = output.correct.nonzero().squeeze(1)
    if output.fused is not None:
        backend, logits, rows = output.fused
        return labels.index_select(0, index), backend.correct_probs(logits, rows, index)
    assert output.probs is not None
    return labels.index_select(0, index), output.probs.index_select(0, index).to(torch.float64)


def add_statistics(output: LossOutput, labels: torch.Tensor, accumulator: torch.Tensor, counts: torch.Tensor) -> None:
    """``accumulator[y] += p`` and ``counts[y] += 1`` for every correct row, in place: what
    :func:`correct_rows` and two ``index_add_`` do, in one kernel call after a fused kernel."""
    if output.fused is not None:
        backend, logits, rows = output.fused
        backend.add_statistics(logits, labels, rows, accumulator, counts)
        return
    rows_labels, probs = correct_rows(output, labels)
    accumulator.index_add_(0, rows_labels, probs)
    counts.index_add_(0, rows_labels, torch.ones_like(rows_labels))


def next_soft_labels(
    accumulator: torch.Tensor,
    counts: torch.Tensor,
    previous: torch.Tensor,
    empty_class: EmptyClassPolicy = "keep",
) -> torch.Tensor:
    """Soft labels of the next epoch: ``accumulator / max(counts, 1)`` row by row.

    A class with no correct prediction gets, by ``empty_class``: its previous
    soft label (``keep``), ``1/C`` (``uniform``) or zeros (``zero``, the
    reference module's behaviour).
    """
    averaged = (accumulator / counts.clamp(min=1).to(accumulator.dtype).unsqueeze(1)).to(torch.float32)
    empty = (counts == 0).unsqueeze(1)
    if empty_class == "zero":
        return averaged
    if empty_class == "keep":
        return torch.where(empty, previous.to(torch.float32), averaged)
    if empty_class == "uniform":
        return torch.where(empty, torch.full_like(averaged, 1.0 / averaged.shape[0]), averaged)
    raise ValueError(f"Expected empty_class to be 'keep', 'uniform' or 'zero' but got {empty_class!r}")
