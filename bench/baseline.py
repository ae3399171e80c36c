"""The local baseline: an Online Label Smoothing module written the usual way, with autograd.

It follows the reference ``OnlineLabelSmoothing`` module (Zhang et al., 2021) and the
math of the core issue: S is C x C, column k the soft label of class k, and

    loss = alpha * CE(z, y) + (1 - alpha) * mean_i sum_c -S[c, y_i] * log_softmax(z_i)_c

In training mode each sample whose argmax equals its label adds its softmax to column
y_i of a float64 accumulator and 1 to count[y_i]. The reference loops over the C
classes in Python to do that; this baseline uses one ``index_add_`` instead, which
is faster, so the ratios against it are conservative. The hard and soft terms are
computed as the reference does (``cross_entropy`` plus a separate ``log_softmax``),
and autograd does the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AutogradOLS(nn.Module):
    supervise: torch.Tensor
    update: torch.Tensor
    idx_count: torch.Tensor

    def __init__(self, alpha: float, n_classes: int, smoothing: float = 0.1, device: torch.device | None = None):
        super().__init__()
        self.a = alpha
        self.n_classes = n_classes
        supervise = torch.full((n_classes, n_classes), smoothing / (n_classes - 1), device=device)
        supervise.fill_diagonal_(1 - smoothing)
        self.register_buffer("supervise", supervise)
        self.register_buffer("update", torch.zeros(n_classes, n_classes, dtype=torch.float64, device=device))
        self.register_buffer("idx_count", torch.zeros(n_classes, dtype=torch.float64, device=device))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hard = F.cross_entropy(logits, labels)
        log_probs = logits.log_softmax(dim=-1)
        if self.training:
            with torch.no_grad():
                self.step(log_probs.exp(), labels)
        true_dist = self.supervise.index_select(1, labels).t()  # [N, C]: row i is column y_i of S
        soft = torch.mean(torch.sum(-true_dist * log_probs, dim=-1))
        return self.a * hard + (1 - self.a) * soft

    @torch.no_grad()
    def step(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        mask = probs.argmax(dim=-1) == labels
        correct_labels = labels[mask]
        self.update.index_add_(1, correct_labels, probs[mask].t().to(torch.float64))
        self.idx_count.index_add_(0, correct_labels, torch.ones_like(correct_labels, dtype=torch.float64))

    @torch.no_grad()
    def next_epoch(self) -> None:
        self.supervise = (self.update / self.idx_count.clamp(min=1)).to(torch.float32)
        self.update.zero_()
        self.idx_count.zero_()
