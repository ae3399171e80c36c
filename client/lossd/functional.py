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

import functools
from dataclasses import dataclass
from typing import Literal

import torch

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
    probs: torch.Tensor  # [N, C] softmax, compute dtype
    valid: torch.Tensor  # [N] bool: label != ignore_index
    correct: torch.Tensor  # [N] bool: valid and argmax(p) == label

    # Cached: each is a device sync on CUDA, and both the statistics and the response read them.
    @functools.cached_property
    def n_used(self) -> int:
        return int(self.valid.sum())

    @functools.cached_property
    def n_correct(self) -> int:
        return int(self.correct.sum())


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
    unless they must be: ``t_ic = dense_ic + base + spike * [c == y_i]``."""

    spike: float
    base: float = 0.0
    dense: torch.Tensor | None = None  # [N, C]


def smoothed_targets(n_classes: int, smoothing: float, convention: Convention) -> Targets:
    on, off = smoothing_values(n_classes, smoothing, convention)
    return Targets(spike=on - off, base=off)


def ols_targets(labels: torch.Tensor, soft_labels: torch.Tensor, alpha: float, dtype: torch.dtype) -> Targets:
    """OLS: ``alpha * onehot(y) + (1 - alpha) * S[:, y]`` with class-major ``soft_labels``."""
    return Targets(spike=alpha, dense=soft_labels.index_select(0, labels).to(dtype) * (1.0 - alpha))


def safe_labels(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels with ignored entries replaced by 0, mask of the rows not ignored)."""
    valid = labels != ignore_index
    return torch.where(valid, labels, torch.zeros_like(labels)), valid


def target_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor,
    targets: Targets,
    *,
    weight: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    need_grad: bool = True,
) -> LossOutput:
    """Loss and gradient of ``sum_c w_c t_ic (-log p_ic)`` in one pass over the logits.

    ``labels`` are the safe labels (in [0, C)); ``valid`` masks the rows that
    count. Ignored rows get zero loss and zero gradient. ``mean`` divides by
    the summed target-class weights of the valid rows, as torch does; when
    that sum is zero the loss is NaN (as in torch) and the gradient is zero.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"Expected reduction to be 'mean', 'sum' or 'none' but got {reduction!r}")
    dtype = compute_dtype(logits.dtype)
    log_probs = torch.log_softmax(logits.to(dtype), dim=1)
    probs = log_probs.exp()
    mask = valid.to(dtype)
    n_classes = logits.shape[1]
    w = weight.to(dtype) if weight is not None else None

    # q_ic = w_c t_ic = spike w_y [c == y] + base w_c + w_c dense_ic, term by term.
    target_weight = w.index_select(0, labels) if w is not None else torch.ones_like(mask)  # w_{y_i}
    spike = targets.spike * target_weight
    weighted_dense = None if targets.dense is None else (targets.dense * w if w is not None else targets.dense)
    per_sample = spike * log_probs.gather(1, labels.unsqueeze(1)).squeeze(1)
    mass = spike.clone()  # sum_c q_ic
    if targets.base:
        per_sample += targets.base * (log_probs @ w if w is not None else log_probs.sum(dim=1))
        mass += targets.base * (w.sum() if w is not None else n_classes)
    if weighted_dense is not None:
        per_sample += torch.linalg.vecdot(weighted_dense, log_probs)
        mass += weighted_dense.sum(dim=1)
    per_sample = -per_sample * mask

    row_scale = mask
    if reduction == "none":
        loss = per_sample
    elif reduction == "sum":
        loss = per_sample.sum()
    else:
        denominator = (target_weight * mask).sum()
        loss = per_sample.sum() / denominator
        row_scale = mask * torch.where(denominator > 0, 1.0 / denominator, torch.zeros_like(denominator))

    grad: torch.Tensor | None = None
    if need_grad:
        # (sum_c q_c) p - q, with each row scaled for the reduction and ignored rows zeroed.
        column = row_scale.unsqueeze(1)
        grad = probs * (mass * row_scale).unsqueeze(1)
        if targets.base:
            grad -= targets.base * (column * w if w is not None else column)
        if weighted_dense is not None:
            grad.addcmul_(weighted_dense, column, value=-1.0)
        grad.scatter_add_(1, labels.unsqueeze(1), (-spike * row_scale).unsqueeze(1))

    correct = valid & (probs.argmax(dim=1) == labels)
    return LossOutput(loss=loss, grad=grad, probs=probs, valid=valid, correct=correct)


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
) -> LossOutput:
    """Cross-entropy with label smoothing. ``uniform`` with any ``smoothing`` equals
    ``F.cross_entropy(logits, labels, weight=, ignore_index=, reduction=, label_smoothing=)``."""
    labels_safe, valid = safe_labels(labels, ignore_index)
    targets = smoothed_targets(logits.shape[1], smoothing, convention)
    return target_cross_entropy(
        logits, labels_safe, valid, targets, weight=weight, reduction=reduction, need_grad=need_grad
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
) -> LossOutput:
    """``alpha * CE(z, y) + (1 - alpha) * sum_c -S[c, y] log p_c`` with class-major ``soft_labels``."""
    labels_safe, valid = safe_labels(labels, ignore_index)
    targets = ols_targets(labels_safe, soft_labels, alpha, compute_dtype(logits.dtype))
    return target_cross_entropy(
        logits, labels_safe, valid, targets, weight=weight, reduction=reduction, need_grad=need_grad
    )


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
    return labels.index_select(0, index), output.probs.index_select(0, index).to(torch.float64)


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
