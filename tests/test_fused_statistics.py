"""``accumulate=``: a fused kernel adds a batch's OLS statistics in the same call as its loss, exactly what
``correct_rows`` + ``index_add_`` add, and only for a batch whose every loss is finite, so a batch that
is recomputed eagerly (a mean over no weight) or refused (NaN logits) is never counted twice or at all."""

from __future__ import annotations

import pytest
import torch

from lossd import functional as F
from tests._kernels import Kernel

C = 9
N = 40


def _batch(seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (N,), generator=generator)
    logits = torch.randn(N, C, generator=generator, dtype=torch.float64)
    logits[torch.arange(N), labels] += 2.0 * (torch.rand(N, generator=generator) < 0.7)  # most rows correct
    return logits.to(dtype), labels


def _expected(logits: torch.Tensor, labels: torch.Tensor, soft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager math's statistics, the definition."""
    output = F.online_label_smoothing(logits, labels, soft, alpha=0.4, kernel="eager")
    rows, probs = F.correct_rows(output, labels)
    accumulator = torch.zeros((C, C), dtype=torch.float64).index_add_(0, rows, probs)
    return accumulator, torch.zeros(C, dtype=torch.int64).index_add_(0, rows, torch.ones_like(rows))


def _buffers() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros((C, C), dtype=torch.float64), torch.zeros(C, dtype=torch.int64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_accumulate_adds_what_correct_rows_and_index_add_add(kernel: Kernel, dtype: torch.dtype) -> None:
    soft = torch.softmax(torch.randn(C, C, generator=torch.Generator().manual_seed(5)), dim=1)
    accumulator, counts = _buffers()
    expected_acc, expected_counts = torch.zeros_like(accumulator), torch.zeros_like(counts)
    for seed in range(3):  # three batches into the same buffers
        logits, labels = _batch(seed, dtype)
        output = F.online_label_smoothing(
            logits, labels, soft, alpha=0.4, kernel=kernel, accumulate=(accumulator, counts)
        )
        assert output.statistics_added == (kernel != "eager")
        if not output.statistics_added:
            F.add_statistics(output, labels, accumulator, counts)
        acc, cnt = _expected(logits, labels, soft)
        expected_acc += acc
        expected_counts += cnt
    assert int(expected_counts.sum()) > N  # most rows really were correct
    assert torch.equal(counts, expected_counts)
    # p is rounded to the compute dtype by both; the fused exp and the sums' order differ by a few ulps.
    bound = 8 * torch.finfo(dtype).eps * expected_counts.to(torch.float64).unsqueeze(1)
    assert bool(((accumulator - expected_acc).abs() <= bound).all())


def test_a_batch_with_nan_logits_adds_nothing(kernel: Kernel) -> None:
    soft = F.initial_soft_labels(C, 0.1)
    logits, labels = _batch(7)
    logits[3, 2] = float("nan")
    logits[5, 0] = float("inf")
    accumulator, counts = _buffers()
    output = F.online_label_smoothing(logits, labels, soft, alpha=0.4, kernel=kernel, accumulate=(accumulator, counts))
    assert not output.finite and not output.statistics_added
    assert not bool(accumulator.any()) and not bool(counts.any())


def test_a_mean_over_no_weight_is_recomputed_eagerly_and_counted_once(kernel: Kernel) -> None:
    """Every label's class weighs 0: the mean is 0/0 = NaN (as torch's), so the fused answer is replaced by
    the eager one; the statistics (which do not depend on the weights) are then the caller's to add, once."""
    soft = F.initial_soft_labels(C, 0.1)
    logits, labels = _batch(8)
    weight = torch.ones(C, dtype=torch.float64)
    weight[labels.unique()] = 0.0
    accumulator, counts = _buffers()
    output = F.online_label_smoothing(
        logits, labels, soft, alpha=0.4, weight=weight, kernel=kernel, accumulate=(accumulator, counts)
    )
    assert bool(output.loss.isnan()) and not output.statistics_added and output.fused is None
    assert not bool(accumulator.any()) and not bool(counts.any())
    F.add_statistics(output, labels, accumulator, counts)
    expected_acc, expected_counts = _expected(logits, labels, soft)
    assert torch.equal(counts, expected_counts) and int(counts.sum()) > 0
    assert torch.equal(accumulator, expected_acc)  # the eager output's own probabilities
