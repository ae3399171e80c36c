"""What a fused kernel keeps per row for the statistics: the row maximum and 1 / sum of exponentials,
against torch on rows that test a maximum's edges (all negative, signed zeros, subnormals, huge
magnitudes, the maximum first or last), in float32 and float64."""

from __future__ import annotations

import pytest
import torch

from lossd import _kernels
from lossd import functional as F
from tests._kernels import Kernel


def _edge_rows(dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    generator = torch.Generator().manual_seed(21)
    rows = [
        -torch.rand(37, generator=generator, dtype=torch.float64) * 50 - 1,  # all negative
        torch.tensor([-0.0, 0.0, -0.0] + [-1.0] * 34, dtype=torch.float64),  # signed zeros at the top
        torch.tensor([-0.0] * 37, dtype=torch.float64),
        torch.full((37,), -3.0, dtype=torch.float64),  # every entry the maximum
        torch.tensor([info.tiny / 4, -info.tiny / 4] + [-2.0] * 35, dtype=torch.float64),  # subnormals
        torch.tensor([info.max / 4, -info.max / 4] + [0.0] * 35, dtype=torch.float64),  # huge magnitudes
        torch.cat(
            [torch.tensor([9.5], dtype=torch.float64), -torch.rand(36, generator=generator, dtype=torch.float64)]
        ),
        torch.cat(
            [-torch.rand(36, generator=generator, dtype=torch.float64), torch.tensor([9.5], dtype=torch.float64)]
        ),
        torch.randn(37, generator=generator, dtype=torch.float64) * 1e3,
    ]
    return torch.stack(rows).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_row_maximum_and_inverse_sum_match_torch(kernel: Kernel, dtype: torch.dtype) -> None:
    backend = _kernels.resolve(kernel, torch.device("cpu"))
    if backend is None:
        pytest.skip("the eager math keeps no per-row answer")
    logits = _edge_rows(dtype)
    labels = logits.argmax(dim=1)
    rows = backend.loss_rows(logits, labels, None, 1.0, 0.0, None, 1.0, None, "none", True)
    expected_max = logits.amax(dim=1)
    assert torch.equal(rows.row_max, expected_max)  # signed zeros compare equal; the value is exact
    expected_inv = 1.0 / (logits.double() - expected_max.double().unsqueeze(1)).exp().sum(dim=1)
    torch.testing.assert_close(rows.inv_sum.double(), expected_inv, rtol=8 * torch.finfo(dtype).eps, atol=0)
    assert torch.equal(rows.correct, torch.ones(len(labels), dtype=torch.bool))  # argmax's label is correct
    out = F.smoothed_cross_entropy(logits, labels, kernel=kernel, reduction="none")
    assert bool(out.loss.isfinite().all())
