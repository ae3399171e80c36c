"""The Triton fused kernel (:mod:`lossd._fused_triton`) against the eager math and torch.

Without a GPU the kernels run through Triton's CPU interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), which is slow, so the shapes are small: rows of 37 classes read by a
backend narrowed to blocks of 16, so every row spans three blocks with a ragged tail (the
online max, sum and first-maximum cross block boundaries). With a GPU the same tests run
compiled, and the ``cuda`` class adds a real shape.

Tolerances are those of tests/test_math.py: float64 within 1e-12 of the tensor's scale;
float32 compute within its ``error_bounds`` derivation, restated here for any N and C.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn.functional as TF

from lossd import _fused_triton
from lossd import functional as F
from lossd._fused import FusedRows
from tests.test_math import _assert_close64

REASON = _fused_triton.available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"triton: {REASON}")

# Compiled kernels take CUDA tensors; the interpreter, CPU ones.
DEVICE = torch.device("cpu" if _fused_triton._INTERPRETED else "cuda")
NARROW = _fused_triton.TritonBackend(max_block=16)
N, C = 12, 37
EPS64 = torch.finfo(torch.float64).eps
EPS32 = torch.finfo(torch.float32).eps
REDUCTIONS: list[F.Reduction] = ["mean", "sum", "none"]


def _seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def _generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*parts))


def _targets(kind: str, c: int = C) -> F.Targets:
    if kind == "ce":
        return F.Targets(spike=1.0)
    if kind == "ls-uniform":
        return F.smoothed_targets(c, 0.1, "uniform")
    if kind == "ls-offtarget":
        return F.smoothed_targets(c, 0.1, "off_target")
    # OLS with soft labels learnt so far (random rows, not the initial smoothing), stored as the server does.
    table = torch.softmax(torch.randn(c, c, generator=_generator("table", c)) * 2, dim=1)
    table = table.to(torch.bfloat16 if kind == "ols-bf16" else torch.float32)
    return F.ols_targets(table.to(DEVICE), 0.3)


KINDS = ["ce", "ls-uniform", "ls-offtarget", "ols-f32", "ols-bf16"]


def _batch(
    *parts: object,
    dtype: torch.dtype = torch.float64,
    n: int = N,
    c: int = C,
    ignored: bool = True,
    classes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(logits, safe labels, valid mask or None): about half the rows predicted, labels repeated (drawn from
    the first ``classes`` classes where given), a few ignored."""
    generator = _generator("batch", *parts)
    labels = torch.randint(0, classes or c, (n,), generator=generator)
    labels[: n // 3] = labels[n // 3 : 2 * (n // 3)]  # rows sharing a label (the statistics' atomics)
    logits = torch.randn(n, c, generator=generator, dtype=torch.float64) * 2.0
    logits[torch.arange(n), labels] += 6.0 * (torch.rand(n, generator=generator) < 0.6)
    raw = labels.clone()
    if ignored:
        raw[torch.randperm(n, generator=generator)[: n // 4]] = -100
    safe, valid = F.safe_labels(raw.to(DEVICE), -100)
    return logits.to(dtype).to(DEVICE), safe, valid


def _weight(use: bool, dtype: torch.dtype, *parts: object, c: int = C) -> torch.Tensor | None:
    """Class weights, made in float32 so that the float64 reference sees exactly the kernel's weights."""
    if not use:
        return None
    return (torch.rand(c, generator=_generator("weight", *parts)) + 0.25).to(dtype).to(DEVICE)


def _fused(
    backend: _fused_triton.TritonBackend,
    logits: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor | None,
    targets: F.Targets,
    weight: torch.Tensor | None,
    reduction: str,
    need_grad: bool = True,
    *,
    accumulate: tuple[torch.Tensor, torch.Tensor] | None = None,
    overwrite_logits: bool = False,
) -> FusedRows:
    return backend.loss_rows(
        logits, labels, valid, targets.spike, targets.base, targets.table, targets.table_scale,
        weight, reduction, need_grad, accumulate=accumulate, overwrite_logits=overwrite_logits,
    )  # fmt: skip


def _eager(
    logits: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor | None,
    targets: F.Targets,
    weight: torch.Tensor | None,
    reduction: F.Reduction,
) -> F.LossOutput:
    return F.target_cross_entropy(logits, labels, valid, targets, weight=weight, reduction=reduction, kernel="eager")


def _bounds(
    logits64: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor | None,
    targets: F.Targets,
    weight: torch.Tensor | None,
    reduction: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss bound, grad bound per element) of float32 compute against float64, tests/test_math.py's
    ``error_bounds`` for any N and C: with q the weighted target (0 on ignored rows), s its row sum and f
    the mean's factor, the loss terms q (|log p| + 1) carry (C + 16) u each row, (N + C + 16) u summed
    over the batch, and the gradient f (p s + q) carries ((C + 16) + |log p|) u."""
    n, c = logits64.shape
    u = EPS32
    onehot = TF.one_hot(labels, c).to(torch.float64)
    t = targets.spike * onehot + targets.base
    if targets.table is not None:
        t = t + targets.table_scale * targets.table.index_select(0, labels).to(torch.float64)
    q = t * (weight.to(torch.float64) if weight is not None else 1.0)
    if valid is not None:
        q = q * valid[:, None]
    f = 1.0
    if reduction == "mean":
        row_weight = weight.to(torch.float64)[labels] if weight is not None else torch.ones(n, dtype=torch.float64)
        denominator = float((row_weight * (valid if valid is not None else 1.0)).sum())
        f = 1.0 / denominator
    log_p = logits64.log_softmax(dim=1)
    terms = q * (log_p.abs() + 1)
    grad_bound = ((c + 16) * u + log_p.abs() * u) * f * (log_p.exp() * q.sum(dim=1, keepdim=True) + q)
    if reduction == "none":
        return (c + 16) * u * terms.sum(dim=1), grad_bound
    return (n + c + 16) * u * f * terms.sum(), grad_bound


def _assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> None:
    error = (actual.to(torch.float64) - expected).abs()
    assert bool((error <= bound).all()), f"error {float((error - bound).max()):.3e} over the bound"


# ---------------------------------------------------------------------------
# The math, float64: every loss kind, weights, ignored rows, reductions
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_float64_equals_eager_and_torch(kind: str, reduction: F.Reduction) -> None:
    """Class weights and ignored rows in every case (the plain case is the special one of both)."""
    logits, labels, valid = _batch("f64", kind, reduction)
    weight = _weight(True, torch.float64, kind)
    targets = _targets(kind)
    rows = _fused(NARROW, logits, labels, valid, targets, weight, reduction)
    expected = _eager(logits, labels, valid, targets, weight, reduction)
    assert rows.grad is not None and expected.grad is not None
    _assert_close64(rows.loss, expected.loss)
    _assert_close64(rows.grad, expected.grad)
    assert torch.equal(rows.correct, expected.correct)
    assert (rows.finite, rows.n_correct) == (True, int(expected.correct.sum()))
    assert valid is not None and not bool(valid.all())  # ignored rows: zero loss and zero gradient
    assert bool((rows.grad[~valid] == 0).all())
    if reduction == "none":
        assert bool((rows.loss[~valid] == 0).all())
    if kind in ("ce", "ls-uniform"):  # and the definition itself: torch's cross-entropy, its autograd gradient
        raw = torch.where(valid, labels, -100) if valid is not None else labels
        z = logits.clone().requires_grad_(True)
        smoothing = 0.1 if kind == "ls-uniform" else 0.0
        loss = TF.cross_entropy(z, raw, weight=weight, reduction=reduction, label_smoothing=smoothing)
        (grad,) = torch.autograd.grad(loss, z, torch.ones_like(loss))
        _assert_close64(rows.loss, loss.detach())
        _assert_close64(rows.grad, grad)


@pytest.mark.parametrize("kind", ["ce", "ols-bf16"])
@pytest.mark.parametrize(
    ("use_weight", "ignored"), [(False, False), (True, False), (False, True)], ids=["plain", "weight", "ignored"]
)
def test_mean_over_rows_weights_or_valid_rows(kind: str, use_weight: bool, ignored: bool) -> None:
    """The mean's other denominators: N (a factor known on the host), the target weights of all rows,
    the count of the valid ones."""
    logits, labels, valid = _batch("mean", kind, use_weight, ignored=ignored)
    weight = _weight(use_weight, torch.float64, kind)
    targets = _targets(kind)
    rows = _fused(NARROW, logits, labels, valid, targets, weight, "mean")
    expected = _eager(logits, labels, valid, targets, weight, "mean")
    assert rows.grad is not None and expected.grad is not None
    _assert_close64(rows.loss, expected.loss)
    _assert_close64(rows.grad, expected.grad)


# ---------------------------------------------------------------------------
# float16, bfloat16, float32 logits: float32 compute within the derived bounds
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "reduction"), [("ce", "none"), ("ls-offtarget", "none"), ("ols-bf16", "mean")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["f16", "bf16", "f32"])
def test_float32_compute_within_bounds(dtype: torch.dtype, kind: str, reduction: F.Reduction) -> None:
    logits, labels, valid = _batch("f32", str(dtype), kind, dtype=dtype)
    weight = _weight(True, torch.float32, kind)
    targets = _targets(kind)
    rows = _fused(NARROW, logits, labels, valid, targets, weight, reduction)
    assert rows.grad is not None
    assert rows.loss.dtype == rows.grad.dtype == rows.row_max.dtype == rows.inv_sum.dtype == torch.float32
    # The reference: the eager math in float64 on exactly the kernel's inputs (the logits as given, widened).
    logits64 = logits.to(torch.float64)
    weight64 = weight.to(torch.float64) if weight is not None else None
    expected = _eager(logits64, labels, valid, targets, weight64, reduction)
    assert expected.grad is not None
    loss_bound, grad_bound = _bounds(logits64, labels, valid, targets, weight, reduction)
    _assert_within(rows.loss, expected.loss, loss_bound)
    _assert_within(rows.grad, expected.grad, grad_bound)
    assert float(grad_bound.max()) < 1e-3 * float(expected.grad.abs().max())  # the bound is not vacuous
    assert torch.equal(rows.correct, expected.correct)


# ---------------------------------------------------------------------------
# argmax's tie rule, non-finite rows
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_correct_is_the_first_maximum(dtype: torch.dtype) -> None:
    """Small integer logits tie at the top in most rows, across block boundaries too."""
    generator = _generator("ties", str(dtype))
    n = 24
    logits = torch.randint(-3, 2, (n, C), generator=generator).to(dtype)
    labels = torch.randint(0, C, (n,), generator=generator)
    for k, i in enumerate(range(0, n, 3)):  # maxima in several blocks, the label at the first, second or third
        columns = torch.randperm(C, generator=generator)[:3].sort().values
        logits[i, columns] = 4
        labels[i] = columns[k % 3]
    logits, labels = logits.to(DEVICE), labels.to(DEVICE)
    valid = torch.arange(n, device=DEVICE) % 5 != 4
    rows = _fused(NARROW, logits, labels, valid, F.smoothed_targets(C, 0.1, "uniform"), None, "sum")
    expected = (logits.argmax(dim=1) == labels) & valid
    assert torch.equal(rows.correct, expected)
    at_max = logits.gather(1, labels[:, None]).squeeze(1) == logits.amax(dim=1)
    assert int((at_max & ~expected & valid).sum()) >= 4  # ties that the first-maximum rule really decided
    assert int(expected.sum()) >= 2


def test_rows_with_nan_or_infinity_have_a_non_finite_loss() -> None:
    logits, labels, valid = _batch("non-finite", ignored=False)
    logits = logits.to(torch.float32)
    poisoned = {
        1: (0, float("nan")),
        3: (16, float("nan")),  # the second block's first column
        5: (36, float("inf")),  # the ragged last block
        7: (int(labels[7]), float("-inf")),
        9: (20, float("-inf")),
    }
    for i, (column, value) in poisoned.items():
        logits[i, column] = value
    logits[11] = float("-inf")  # a row with no finite logit
    bad = torch.zeros(N, dtype=torch.bool, device=DEVICE)
    bad[[*poisoned, 11]] = True
    valid = torch.ones(N, dtype=torch.bool, device=DEVICE)
    valid[9] = False  # an ignored row still reports its non-finite logits, as the eager math's NaN * 0
    targets = _targets("ols-f32")
    rows = _fused(NARROW, logits, labels, valid, targets, None, "none")
    assert not bool(rows.loss[bad].isfinite().any())
    assert rows.finite is False
    clean64 = logits[~bad].to(torch.float64)
    expected = _eager(clean64, labels[~bad], None, targets, None, "none")
    assert rows.grad is not None and expected.grad is not None
    loss_bound, grad_bound = _bounds(clean64, labels[~bad], None, targets, None, "none")
    _assert_within(rows.loss[~bad], expected.loss, loss_bound)  # the other rows are untouched
    _assert_within(rows.grad[~bad], expected.grad, grad_bound)
    # Through the functional API the batch is computed again eagerly, so it is exactly the eager answer.
    for reduction in ("mean", "none"):
        out = F.target_cross_entropy(logits, labels, valid, targets, reduction=reduction, kernel=NARROW)
        expected = _eager(logits, labels, valid, targets, None, reduction)
        assert out.fused is None
        assert torch.equal(out.loss.isnan(), expected.loss.isnan())
        assert torch.equal(out.loss.nan_to_num(), expected.loss.nan_to_num())


def test_all_rows_ignored_and_empty_batches() -> None:
    logits, labels, _ = _batch("edges", n=4, ignored=False)
    weight = _weight(True, torch.float64, "edges")
    none_valid = torch.zeros(4, dtype=torch.bool, device=DEVICE)
    acc, counts = torch.ones(C, C, dtype=torch.float64, device=DEVICE), torch.ones(C, dtype=torch.int64, device=DEVICE)
    rows = _fused(NARROW, logits, labels, none_valid, _targets("ols-f32"), weight, "mean", accumulate=(acc, counts))
    assert bool(rows.loss.isnan()) and rows.finite is False  # 0 / 0, as torch: the caller reruns eagerly
    assert rows.grad is not None and bool((rows.grad == 0).all())
    assert rows.n_correct == 0
    assert not rows.accumulated and bool((acc == 1).all()) and bool((counts == 1).all())  # a refused batch adds nothing
    mean = _fused(NARROW, logits[:0], labels[:0], None, _targets("ce"), None, "mean")
    assert mean.grad is not None and mean.grad.shape == (0, C)
    assert mean.loss.shape == () and bool(mean.loss.isnan())
    assert float(_fused(NARROW, logits[:0], labels[:0], None, _targets("ce"), None, "sum").loss) == 0.0
    assert _fused(NARROW, logits[:0], labels[:0], None, _targets("ce"), None, "none").loss.shape == (0,)


# ---------------------------------------------------------------------------
# The statistics, the options
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
def test_statistics_equal_the_eager_ones(dtype: torch.dtype) -> None:
    """``accumulator[y] += p`` in float64 from p rounded to the compute dtype, rows sharing labels; the
    same from add_statistics, from loss_rows(accumulate=) with and without the gradient, and from
    correct_probs."""
    logits, labels, valid = _batch("statistics", str(dtype), dtype=dtype, n=16, classes=5)
    targets = _targets("ols-bf16")
    rows = _fused(NARROW, logits, labels, valid, targets, None, "mean")
    expected = _eager(logits, labels, valid, targets, None, "mean")
    assert torch.equal(rows.correct, expected.correct)
    assert expected.probs is not None
    n_correct = int(expected.correct.sum())
    assert n_correct >= 4 and len(set(labels[expected.correct].tolist())) < n_correct  # shared labels

    def statistics() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(C, C, dtype=torch.float64, device=DEVICE), torch.zeros(C, dtype=torch.int64, device=DEVICE)

    acc, counts = statistics()
    F.add_statistics(expected, labels, acc, counts)
    fused_acc, fused_counts = statistics()
    NARROW.add_statistics(logits, labels, rows, fused_acc, fused_counts)
    in_call_acc, in_call_counts = statistics()
    in_call = _fused(NARROW, logits, labels, valid, targets, None, "mean", accumulate=(in_call_acc, in_call_counts))
    no_grad_acc, no_grad_counts = statistics()
    no_grad = _fused(
        NARROW, logits, labels, valid, targets, None, "mean", False, accumulate=(no_grad_acc, no_grad_counts)
    )
    assert in_call.accumulated and no_grad.accumulated and not rows.accumulated
    index = expected.correct.nonzero().squeeze(1)
    probs = NARROW.correct_probs(logits, rows, index)

    assert torch.equal(fused_counts, counts) and torch.equal(in_call_counts, counts)
    assert torch.equal(no_grad_counts, counts)
    # The three kernel calls compute p alike; only the order of a label's float64 additions may differ.
    for other in (in_call_acc, no_grad_acc):
        torch.testing.assert_close(other, fused_acc, rtol=N * EPS64, atol=0)
    if dtype == torch.float64:
        _assert_close64(fused_acc, acc)
        _assert_close64(probs, expected.probs[index].to(torch.float64))
    else:  # p in float32 both ways: exp and the C-term sum in either order, and one product or quotient
        _assert_within(fused_acc, acc, (C + 16) * EPS32 * acc)
        eager_probs = expected.probs[index].to(torch.float64)
        _assert_within(probs, eager_probs, (C + 16) * EPS32 * eager_probs)
        assert bool((probs == probs.to(torch.float32).to(torch.float64)).all())  # rounded to float32 first


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
def test_overwrite_logits(dtype: torch.dtype) -> None:
    """The gradient takes the logits' memory where the dtypes match (float32, float64) and equals the
    gradient in a buffer of its own; with ``accumulate`` the logits stay (the statistics read them after
    the loss pass) and the statistics are those of the intact logits."""
    logits, labels, valid = _batch("overwrite", str(dtype), dtype=dtype)
    targets = _targets("ols-f32")
    weight = _weight(True, torch.float64 if dtype == torch.float64 else torch.float32, "overwrite")
    fresh = _fused(NARROW, logits, labels, valid, targets, weight, "mean")
    assert fresh.grad is not None
    acc = torch.zeros(C, C, dtype=torch.float64, device=DEVICE)
    counts = torch.zeros(C, dtype=torch.int64, device=DEVICE)
    NARROW.add_statistics(logits, labels, fresh, acc, counts)
    assert int(counts.sum()) > 0
    kept = logits.clone()

    in_acc, in_counts = torch.zeros_like(acc), torch.zeros_like(counts)
    rows = _fused(NARROW, logits, labels, valid, targets, weight, "mean", accumulate=(in_acc, in_counts),
                  overwrite_logits=True)  # fmt: skip
    assert rows.grad is not None and rows.accumulated
    assert rows.grad.data_ptr() != logits.data_ptr() and torch.equal(logits, kept)
    assert torch.equal(rows.grad, fresh.grad) and torch.equal(rows.loss, fresh.loss)
    assert torch.equal(in_counts, counts)
    torch.testing.assert_close(in_acc, acc, rtol=N * EPS64, atol=0)  # only the atomics' order may differ

    rows = _fused(NARROW, logits, labels, valid, targets, weight, "mean", overwrite_logits=True)
    assert rows.grad is not None
    assert torch.equal(rows.grad, fresh.grad) and torch.equal(rows.loss, fresh.loss)
    if dtype == torch.bfloat16:  # no float32 home in bfloat16 logits: a buffer of its own, the logits intact
        assert rows.grad.data_ptr() != logits.data_ptr() and torch.equal(logits, kept)
    else:
        assert rows.grad.data_ptr() == logits.data_ptr()


def test_without_grad_the_loss_is_the_same() -> None:
    logits, labels, valid = _batch("no-grad", dtype=torch.float32)
    targets = _targets("ls-uniform")
    with_grad = _fused(NARROW, logits, labels, valid, targets, None, "none")
    rows = _fused(NARROW, logits, labels, valid, targets, None, "none", False)
    assert rows.grad is None
    for name in ("loss", "correct", "row_max", "inv_sum"):
        assert torch.equal(getattr(rows, name), getattr(with_grad, name)), name


def test_the_default_backend_and_the_functional_api() -> None:
    """BACKEND (one block per row at this C) through target_cross_entropy, as the server calls it."""
    logits, labels, valid = _batch("default")
    targets = _targets("ols-f32")
    weight = _weight(True, torch.float64, "default")
    out = F.target_cross_entropy(logits, labels, valid, targets, weight=weight, kernel=_fused_triton.BACKEND)
    expected = _eager(logits, labels, valid, targets, weight, "mean")
    assert out.fused is not None and out.fused[0] is _fused_triton.BACKEND
    assert out.grad is not None and expected.grad is not None
    _assert_close64(out.loss, expected.loss)
    _assert_close64(out.grad, expected.grad)
    assert (out.n_correct, out.finite) == (int(expected.correct.sum()), True)
    rows_labels, probs = F.correct_rows(out, labels)
    expected_labels, expected_probs = F.correct_rows(expected, labels)
    assert torch.equal(rows_labels, expected_labels)
    _assert_close64(probs, expected_probs)


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def test_without_triton_the_module_imports_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("lossd_fused_triton_without_triton", _fused_triton.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.available() == "triton is not installed"
    assert module.available() == "triton is not installed"  # cached, still no exception
    assert module.BACKEND.name == "triton"


_COMPILE = r"""
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lossd import _fused_triton as T

assert not T._INTERPRETED
POINTERS = {"x_ptr": "X", "labels_ptr": "i64", "valid_ptr": "u1", "weight_ptr": "D", "table_ptr": "T",
            "scale_ptr": "D", "grad_ptr": "D", "loss_ptr": "D", "correct_ptr": "u1", "row_max_ptr": "D",
            "inv_sum_ptr": "D", "acc_ptr": "fp64", "counts_ptr": "i64", "index_ptr": "i64", "out_ptr": "fp64"}
OPTIONAL = {"valid_ptr": "HAS_VALID", "weight_ptr": "HAS_WEIGHT", "table_ptr": "HAS_TABLE",
            "scale_ptr": "SCALE_IN_MEMORY", "grad_ptr": "NEED_GRAD"}
FLAGS = ("HAS_VALID", "HAS_WEIGHT", "HAS_BASE", "HAS_TABLE", "SCALE_IN_MEMORY", "NEED_GRAD")


def compile(kernel, x, d, **flags):
    signature, constants = {}, {"DT": tl.float64 if d == "fp64" else tl.float32, "BLOCK": 2048, **flags}
    for name in kernel.arg_names:
        if name in constants or (name in OPTIONAL and not flags.get(OPTIONAL[name], True)):
            signature[name] = "constexpr"
            constants.setdefault(name, None)
        elif name in POINTERS:
            table = "bf16" if x == "bf16" else "fp32"  # S as stored: float32, or bfloat16 halving its reads
            signature[name] = "*" + POINTERS[name].replace("X", x).replace("D", d).replace("T", table)
        else:
            signature[name] = "i64" if name.endswith("_bits") else "i32"
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
    triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "enable_fp_fusion": True})


for x, d in (("bf16", "fp32"), ("fp64", "fp64")):
    compile(T._loss_rows_kernel, x, d, **dict.fromkeys(FLAGS, True))
    compile(T._loss_rows_kernel, x, d, **dict.fromkeys(FLAGS, False))
    compile(T._loss_rows_kernel, x, d, **(dict.fromkeys(FLAGS, False) | {"HAS_BASE": True, "NEED_GRAD": True}))
    compile(T._statistics_kernel, x, d)
    compile(T._correct_probs_kernel, x, d)
print("compiled")
"""


def test_the_kernels_compile_for_cuda() -> None:
    """Where CI has no GPU the interpreter runs the kernels' Python; this compiles them for sm_90 (to a
    cubin, with the ptxas that Triton ships), which catches what only the compiler checks."""
    if not _fused_triton._INTERPRETED:
        pytest.skip("compiled already: the other tests run on the GPU")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


# ---------------------------------------------------------------------------
# On a GPU, compiled, at the benchmark's shape
# ---------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or _fused_triton._INTERPRETED, reason="needs a CUDA device")
class TestOnCuda:
    def test_ols_bfloat16_at_1024x32000(self) -> None:
        n, c = 1024, 32000
        generator = torch.Generator(device="cuda").manual_seed(_seed("cuda"))
        labels = torch.randint(0, c, (n,), generator=generator, device="cuda")
        logits = (torch.randn(n, c, generator=generator, device="cuda") * 2).to(torch.bfloat16)
        logits[torch.arange(n, device="cuda")[::2], labels[::2]] = 12.0  # correct rows
        labels[::7] = labels[1::7][: labels[::7].shape[0]]  # shared labels
        raw = labels.clone()
        raw[::9] = -100
        safe, valid = F.safe_labels(raw, -100)
        assert valid is not None  # always a mask on CUDA
        weight = torch.rand(c, generator=generator, device="cuda") + 0.25
        table = torch.softmax(torch.randn(c, c, generator=generator, device="cuda"), dim=1).to(torch.bfloat16)
        targets = F.ols_targets(table, 0.3)
        rows = _fused(_fused_triton.BACKEND, logits, safe, valid, targets, weight, "mean")
        logits64 = logits.to(torch.float64)
        expected = _eager(logits64, safe, valid, targets, weight.to(torch.float64), "mean")
        assert rows.grad is not None and expected.grad is not None
        loss_bound, grad_bound = _bounds(logits64, safe, valid, targets, weight, "mean")
        _assert_within(rows.loss, expected.loss, loss_bound)
        _assert_within(rows.grad, expected.grad, grad_bound)
        assert torch.equal(rows.correct, (logits.argmax(dim=1) == safe) & valid)

        eager32 = _eager(logits, safe, valid, targets, weight, "mean")
        acc = torch.zeros(c, c, dtype=torch.float64, device="cuda")
        counts = torch.zeros(c, dtype=torch.int64, device="cuda")
        F.add_statistics(eager32, safe, acc, counts)
        fused_acc, fused_counts = torch.zeros_like(acc), torch.zeros_like(counts)
        _fused_triton.BACKEND.add_statistics(logits, safe, rows, fused_acc, fused_counts)
        assert torch.equal(fused_counts, counts)
        _assert_within(fused_acc, acc, (c + 16) * EPS32 * acc)

    def test_float64_at_256x4000(self) -> None:
        logits, labels, valid = _batch("cuda-f64", n=256, c=4000)
        weight = _weight(True, torch.float64, "cuda-f64", c=4000)
        targets = _targets("ols-f32", c=4000)
        rows = _fused(_fused_triton.BACKEND, logits, labels, valid, targets, weight, "sum")
        expected = _eager(logits, labels, valid, targets, weight, "sum")
        assert rows.grad is not None and expected.grad is not None
        _assert_close64(rows.loss, expected.loss)
        _assert_close64(rows.grad, expected.grad)
