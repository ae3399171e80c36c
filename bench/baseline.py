"""The local baseline: the reference Online Label Smoothing module's own algorithm, with autograd.

This follows ``OnlineLabelSmoothing`` of https://github.com/ankandrew/online-label-smoothing-pt
(``ols/online_label_smooth.py``; Zhang et al., 2021, https://arxiv.org/abs/2011.12562) step for
step, so that ratios against it measure lossd against what users run today and are not flattered
by a slower stand-in:

- ``supervise``, ``update`` (both C x C) and ``idx_count`` (C) are float32 buffers; column k of
  ``supervise`` is the soft label of class k;
- the loss is ``alpha * hard + (1 - alpha) * soft`` with ``hard = nn.CrossEntropyLoss()(z, y)`` and
  ``soft = mean_i sum_c -supervise[c, y_i] * log_softmax(z_i)_c``, the soft term computed first,
  from its own ``log_softmax``; autograd does the backward;
- in training mode :meth:`ReferenceOLS.step` takes ``exp`` of that ``log_softmax`` and, for each
  row whose argmax equals its label, adds the row's probabilities to column ``argmax`` of
  ``update`` (``update.index_add_(1, ...)``, the reference's orientation) and 1 to
  ``idx_count[argmax]``, in float32;
- :meth:`ReferenceOLS.next_epoch` divides ``update`` column-wise by ``idx_count`` (0 counted as 1,
  so a class with no correct prediction gets a zero column), makes it ``supervise`` and starts a
  fresh zero ``update``.

The signature is the reference's, ``(alpha, n_classes, smoothing=0.1)``; move it with ``.to()``.
"""

from __future__ import annotations

import torch
from torch import nn


class ReferenceOLS(nn.Module):
    """The reference ``OnlineLabelSmoothing`` module (ankandrew/online-label-smoothing-pt)."""

    supervise: torch.Tensor
    update: torch.Tensor
    idx_count: torch.Tensor

    def __init__(self, alpha: float, n_classes: int, smoothing: float = 0.1) -> None:
        super().__init__()
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.a = alpha
        self.n_classes = n_classes
        # Plain label smoothing for the first epoch: 1 - eps on the diagonal, eps / (C - 1) elsewhere.
        supervise = torch.full((n_classes, n_classes), smoothing / (n_classes - 1))
        supervise.fill_diagonal_(1 - smoothing)
        self.register_buffer("supervise", supervise)
        self.register_buffer("update", torch.zeros_like(supervise))  # next epoch's columns, summed
        self.register_buffer("idx_count", torch.zeros(n_classes))  # correct predictions per column
        self.hard_loss = nn.CrossEntropyLoss()

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        soft = self.soft_loss(logits, labels)
        hard = self.hard_loss(logits, labels)
        loss: torch.Tensor = self.a * hard + (1 - self.a) * soft
        return loss

    def soft_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The soft term against the current ``supervise``; in training mode also :meth:`step`."""
        log_probs = logits.log_softmax(dim=-1)
        if self.training:
            with torch.no_grad():
                self.step(log_probs.exp(), labels)
        true_dist = torch.index_select(self.supervise, 1, labels).swapaxes(-1, -2)  # [N, C]: column y_i
        return torch.mean(torch.sum(-true_dist * log_probs, dim=-1))

    def step(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        """Add the probabilities of the correctly predicted rows to their class's column of ``update``."""
        predicted = probs.argmax(dim=-1)
        correct = torch.eq(predicted, labels)
        classes = predicted[correct]
        self.update.index_add_(1, classes, probs[correct].swapaxes(-1, -2))
        self.idx_count.index_add_(0, classes, torch.ones_like(classes, dtype=torch.float32))

    def next_epoch(self) -> None:
        """End of epoch: ``supervise`` becomes the column means of ``update``; the statistics restart."""
        self.idx_count[torch.eq(self.idx_count, 0)] = 1  # no zero denominators
        self.update /= self.idx_count
        self.idx_count.zero_()
        self.supervise = self.update
        self.update = self.update.clone().zero_()
