"""The loss math through torch.compile (lossd._compiled): the same numbers as the eager code.

Compiling costs seconds per graph, so the cases share graphs: shapes are dynamic and alpha is
data, and every case here is float64 (as the eager references of tests/test_math.py), except
one server and one cached-module check in float32.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as TF

import lossd
from lossd import _compiled
from lossd import functional as F
from lossd_server.config import Settings
from lossd_server.embedded import EmbeddedServer
from tests.test_math import _assert_close64, _seed, make_batch, make_weight, torch_loss_and_grad

C = 7


# Each pair is a graph of its own (None-ness and the reduction are specialised), so a few, not all nine.
@pytest.mark.parametrize(("case", "reduction"), [("plain", "mean"), ("weight", "sum"), ("ignore", "none")])
def test_compiled_smoothed_cross_entropy_matches_torch(reduction: F.Reduction, case: str) -> None:
    logits, labels, ignore_index = make_batch(
        _seed("compiled", case), "ignore-100" if case == "ignore" else "no-ignored"
    )
    weight = make_weight(_seed("compiled-weight"), case == "weight")
    expected_loss, expected_grad = torch_loss_and_grad(
        logits, labels, weight=weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=0.1
    )
    out = F.smoothed_cross_entropy(
        logits, labels, smoothing=0.1, weight=weight, ignore_index=ignore_index, reduction=reduction, compiled=True
    )
    assert _compiled.compile_failure() is None
    assert out.grad is not None
    _assert_close64(out.loss, expected_loss)
    _assert_close64(out.grad, expected_grad)
    assert torch.equal(out.correct, (logits.argmax(dim=1) == labels) & (labels != ignore_index))


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(16, 7), (33, 50)])
def test_compiled_ols_equals_eager_for_any_alpha_and_shape(alpha: float, shape: tuple[int, int]) -> None:
    """One graph serves every alpha and batch shape (alpha is traced as data, shapes are dynamic)."""
    n, c = shape
    generator = torch.Generator().manual_seed(_seed("ols", alpha, shape))
    labels = torch.randint(0, c, (n,), generator=generator)
    logits = torch.randn(n, c, generator=generator, dtype=torch.float64) + 3.0 * TF.one_hot(labels, c)
    logits[0] = 1.0  # a row of ties: the argmax fallback still applies to the compiled answer
    soft = torch.softmax(torch.randn(c, c, generator=generator), dim=1)
    eager = F.online_label_smoothing(logits, labels, soft, alpha=alpha)
    compiled = F.online_label_smoothing(logits, labels, soft, alpha=alpha, compiled=True)
    assert compiled.grad is not None and eager.grad is not None
    _assert_close64(compiled.loss, eager.loss)
    _assert_close64(compiled.grad, eager.grad)
    assert torch.equal(compiled.correct, eager.correct)
    assert torch.equal(compiled.correct, logits.argmax(dim=1) == labels)


def test_a_failed_compile_falls_back_to_eager_once_and_says_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(function: Any, **kwargs: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("no C++ compiler found\nmore detail")

        return call

    monkeypatch.setattr(_compiled, "_compiled", {})
    monkeypatch.setattr(_compiled, "_failed", None)
    monkeypatch.setattr(torch, "compile", broken)
    logits, labels, _ = make_batch(_seed("fallback"), "no-ignored")
    with caplog.at_level(logging.WARNING, logger="lossd"):
        first = F.smoothed_cross_entropy(logits, labels, smoothing=0.1, compiled=True)
        second = F.smoothed_cross_entropy(logits, labels, smoothing=0.1, compiled=True)
    eager = F.smoothed_cross_entropy(logits, labels, smoothing=0.1)
    assert _compiled.compile_failure() == "RuntimeError: no C++ compiler found"
    assert [r.getMessage() for r in caplog.records].count(
        "lossd: compiled loss math unavailable, running it eagerly: RuntimeError: no C++ compiler found"
    ) == 1
    for out in (first, second):
        assert torch.equal(out.loss, eager.loss)
        assert out.grad is not None and eager.grad is not None and torch.equal(out.grad, eager.grad)


@pytest.fixture(scope="module")
def compiling_server() -> Iterator[EmbeddedServer]:
    settings = Settings(host="127.0.0.1", port=0, device="cpu", store="memory", grace_seconds=1, compile_math=True)
    with EmbeddedServer(settings) as running:
        yield running


def test_a_compile_math_server_and_a_compiled_cached_module_agree_with_eager(
    compiling_server: EmbeddedServer, server: EmbeddedServer
) -> None:
    """float32 on the wire: compiled and eager differ by float32 rounding only, as any two orders of summation."""
    generator = torch.Generator().manual_seed(_seed("compiled-modules"))
    labels = torch.randint(0, C, (24,), generator=generator)
    logits = torch.randn(24, C, generator=generator) + 2.0 * TF.one_hot(labels, C)
    results = []
    for target, options in (
        (server.target, {}),
        (compiling_server.target, {}),
        (server.target, {"cached": True, "compile_math": True}),
    ):
        with lossd.OnlineLabelSmoothing(0.5, C, target=target, **options) as module:
            leaf = logits.clone().requires_grad_()
            loss = module(leaf, labels)
            loss.backward()
            assert leaf.grad is not None
            results.append((loss.detach(), leaf.grad))
    (eager_loss, eager_grad), *others = results
    for loss, grad in others:
        torch.testing.assert_close(loss, eager_loss, rtol=4 * torch.finfo(torch.float32).eps, atol=0)
        scale = float(eager_grad.abs().max())
        torch.testing.assert_close(grad, eager_grad, rtol=0, atol=4 * torch.finfo(torch.float32).eps * scale)
        assert not torch.equal(grad, torch.zeros_like(grad))


def test_compile_math_needs_cached_mode() -> None:
    with pytest.raises(ValueError, match="compile_math"):
        lossd.OnlineLabelSmoothing(0.5, C, target="127.0.0.1:1", compile_math=True)
