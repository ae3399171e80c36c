"""What a fused loss kernel computes, and the contract every backend (numba on the CPU, Triton on CUDA) keeps.

A fused kernel reads the logits twice per row, the way an online softmax does, and
writes the loss, the gradient and what the OLS statistics need. The formulas are
:func:`lossd.functional.loss_terms`' own: with ``q_ic = w_c t_ic`` and
``t_ic = table_scale * table[y_i, c] + base + spike * [c == y_i]``::

    mass_i = sum_c q_ic
    loss_i = mass_i * log(sum_c exp(z_ic - m_i)) - sum_c q_ic (z_ic - m_i)      m_i = max_c z_ic
    grad_ic = row_scale_i * (mass_i * p_ic - q_ic)

``row_scale`` is the reduction's factor per row: 1 for ``sum`` and ``none``, ``1 / N``
for an unweighted ``mean`` without ignored rows, ``1 / sum_{valid} w_{y_i}`` otherwise
(0 when that sum is 0, where the loss is NaN as torch's is), and 0 for ignored rows.
``correct_i`` is "valid and the first maximum of row i is at its label", as
``argmax(dim=1) == labels``.

The statistics are p's correct rows in float64 (``p`` rounded to the compute dtype first,
as the eager path's ``probs.to(float64)``), rebuilt from ``row_max`` and ``inv_sum`` so that
no [N, C] softmax is ever stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class FusedRows:
    """One fused pass over a batch."""

    loss: torch.Tensor  # 0-dim for mean and sum, [N] for none; compute dtype
    grad: torch.Tensor | None  # [N, C] compute dtype; None unless asked for
    correct: torch.Tensor  # [N] bool
    row_max: torch.Tensor  # [N] compute dtype: max_c z_ic
    inv_sum: torch.Tensor  # [N] compute dtype: 1 / sum_c exp(z_ic - m_i)
    # Known without another op where the kernel counted them (the CPU's); None: count on demand.
    finite: bool | None = None  # every row's loss is finite
    n_correct: int | None = None
    accumulated: bool = False  # the statistics went into ``accumulate`` in this call


class Backend(Protocol):
    """A fused kernel for one kind of device. Every tensor is on that device and contiguous."""

    name: str

    def loss_rows(
        self,
        logits: torch.Tensor,  # [N, C] float16, bfloat16, float32 or float64
        labels: torch.Tensor,  # [N] int64 in [0, C) (ignored rows already replaced)
        valid: torch.Tensor | None,  # [N] bool, None: every row counts
        spike: float,
        base: float,
        table: torch.Tensor | None,  # [C, C] float32, class-major
        table_scale: float,
        weight: torch.Tensor | None,  # [C] in the compute dtype
        reduction: str,
        need_grad: bool,
        *,
        accumulate: tuple[torch.Tensor, torch.Tensor] | None = None,
        overwrite_logits: bool = False,
    ) -> FusedRows:
        """``accumulate=(accumulator, counts)`` also adds the statistics (as :meth:`add_statistics`) in
        the same call, but only when the loss is finite (a batch that is recomputed eagerly or refused
        must not have counted); ``FusedRows.accumulated`` says whether it did. ``overwrite_logits`` lets
        the gradient take the logits' memory where the dtypes match (the logits are then gone: no
        statistics call may follow but ``accumulate``).

        Rows holding NaN or an infinity need not match the eager math: their loss is not finite,
        and callers run the eager math whenever the loss is not finite."""
        ...

    def correct_probs(self, logits: torch.Tensor, rows: FusedRows, index: torch.Tensor) -> torch.Tensor:
        """[K, C] float64: the softmax of the rows ``index`` (the correct ones)."""
        ...

    def add_statistics(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        rows: FusedRows,
        accumulator: torch.Tensor,  # [C, C] float64, class-major, added to in place
        counts: torch.Tensor,  # [C] int64, added to in place
    ) -> None:
        """``accumulator[y_i] += p_i`` and ``counts[y_i] += 1`` for every correct row i."""
        ...
