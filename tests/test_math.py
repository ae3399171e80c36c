"""The loss math, against torch, in pure functions and through a real server.

* ``lossd.functional`` in float64 must equal ``torch.nn.functional.cross_entropy``
  (value and autograd gradient) to float64 rounding.
* The off-target convention is checked against a re-derivation written here,
  against torch's uniform smoothing with ``eps * C / (C - 1)``, and against the
  ``nn.KLDivLoss`` scale.
* Every loss kind, reduction, ignore_index, weight and wire dtype through the
  server, against torch autograd in float64 on the same (wire-rounded) inputs,
  with tolerances derived from float32 compute plus the rounding of the wire dtype.
* Edges: all rows ignored, empty batches, int32 labels, unary vs stream.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as TF

import lossd
from lossd import functional as F
from lossd._spec import LossKind
from tests._kernels import Kernel


@pytest.fixture()
def client(kernel_client: lossd.Client) -> lossd.Client:
    """Every server test here runs once per math kernel (the server's default, fused, and eager)."""
    return kernel_client


C = 7
N = 16
EPS64 = torch.finfo(torch.float64).eps  # 2**-52
EPS32 = torch.finfo(torch.float32).eps  # 2**-23

# Pure float64 comparisons: both sides do a handful of float64 ops over <= C terms per
# row and <= N rows, so they agree to a few dozen ulps; 1e-12 relative (~4500 ulps)
# still catches any real formula difference, which shows up at >= 1e-3.
RTOL64 = 1e-12


def _seed(*parts: object) -> int:
    """A stable seed per case (Python's hash() is salted per process)."""
    return zlib.crc32(repr(parts).encode())


def _assert_close64(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Relative to the tensor's scale, so near-zero gradient entries do not need elementwise relative accuracy;
    NaN where the reference has NaN (the scale is then that of its finite entries)."""
    assert actual.dtype == expected.dtype == torch.float64
    assert actual.shape == expected.shape
    scale = float(expected.abs().nan_to_num().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=RTOL64, atol=RTOL64 * max(scale, 1e-300), equal_nan=True)


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------

IGNORE_CASES = {
    # id: (ignore_index, rows whose label is set to ignore_index; None: label 2 simply occurs)
    "no-ignored": (-100, ()),
    "ignore-100": (-100, (1, 4, 9, 13)),
    "ignore-class2": (2, None),
}


def make_batch(
    seed: int, ignore: str, dtype: torch.dtype = torch.float64, n: int = N, c: int = C
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(logits [n, c] in ``dtype``, int64 labels [n], ignore_index). About half the rows predicted correctly."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=generator)
    labels[[i for i in (0, 5, 11) if i < n]] = 2  # class 2 always occurs, so ignore_index=2 really drops rows
    logits = torch.randn(n, c, generator=generator, dtype=torch.float64) * 2.0
    logits[torch.arange(n), labels] += 3.0 * (torch.rand(n, generator=generator) < 0.5)
    ignore_index, rows = IGNORE_CASES[ignore]
    if rows:
        labels[list(rows)] = ignore_index
    return logits.to(dtype), labels, ignore_index


def make_weight(seed: int, use: bool, c: int = C) -> torch.Tensor | None:
    if not use:
        return None
    return torch.rand(c, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64) + 0.25


def torch_loss_and_grad(
    logits64: torch.Tensor,
    labels: torch.Tensor,
    *,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: F.Reduction,
    label_smoothing: float,
    grad_output: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    z = logits64.clone().requires_grad_(True)
    loss = TF.cross_entropy(
        z, labels, weight=weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
    )
    (grad,) = torch.autograd.grad(loss, z, grad_output if grad_output is not None else torch.ones_like(loss))
    return loss.detach(), grad


# ---------------------------------------------------------------------------
# 1. lossd.functional in float64 == torch.nn.functional.cross_entropy
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3], ids=lambda e: f"eps{e}")
@pytest.mark.parametrize("use_weight", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("ignore", list(IGNORE_CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_functional_uniform_matches_torch_cross_entropy(
    reduction: F.Reduction, ignore: str, use_weight: bool, eps: float, kernel: Kernel
) -> None:
    seed = _seed("functional", reduction, ignore, use_weight, eps)
    logits, labels, ignore_index = make_batch(seed, ignore)
    weight = make_weight(seed, use_weight)
    grad_output = None
    if reduction == "none":
        grad_output = torch.randn(N, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)

    expected_loss, expected_grad = torch_loss_and_grad(
        logits,
        labels,
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=eps,
        grad_output=grad_output,
    )
    out = F.smoothed_cross_entropy(
        logits,
        labels,
        smoothing=eps,
        convention="uniform",
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        kernel=kernel,
    )
    assert out.grad is not None
    # Server grad rows are d loss_i / d z_i; with a grad_output the chain rule scales row i by it.
    grad = out.grad * grad_output[:, None] if grad_output is not None else out.grad

    _assert_close64(out.loss, expected_loss)
    _assert_close64(grad, expected_grad)
    valid = labels != ignore_index
    assert out.n_used == int(valid.sum())
    assert out.n_correct == int((valid & (logits.argmax(1) == labels)).sum())
    if ignore != "no-ignored":  # ignored rows really are dropped: zero gradient, zero per-sample loss
        assert bool((grad[~valid] == 0).all())
        assert 0 < out.n_used < N


# ---------------------------------------------------------------------------
# 2. The off-target convention
# ---------------------------------------------------------------------------


def off_target_rederived(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> float:
    """mean_i sum_c -t_ic log p_ic with t = 1-eps on the target, eps/(C-1) elsewhere; written with plain loops."""
    n, c = logits.shape
    total = 0.0
    for i in range(n):
        row = [float(v) for v in logits[i]]
        top = max(row)
        log_norm = top + math.log(sum(math.exp(v - top) for v in row))
        for k in range(c):
            t = 1.0 - eps if k == int(labels[i]) else eps / (c - 1)
            total += -t * (row[k] - log_norm)
    return total / n


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3], ids=lambda e: f"eps{e}")
def test_off_target_matches_rederivation(eps: float, kernel: Kernel) -> None:
    logits, labels, _ = make_batch(_seed("off-target", eps), "no-ignored")
    out = F.smoothed_cross_entropy(logits, labels, smoothing=eps, convention="off_target", kernel=kernel)
    expected = off_target_rederived(logits, labels, eps)
    assert abs(float(out.loss) - expected) <= RTOL64 * abs(expected)
    on, off = F.smoothing_values(C, eps, "off_target")
    assert (on, off) == (1.0 - eps, eps / (C - 1))
    if eps > 0:  # and the convention matters: uniform gives another number
        uniform = F.smoothed_cross_entropy(logits, labels, smoothing=eps, convention="uniform", kernel=kernel)
        assert abs(float(uniform.loss) - expected) > 1e-3 * abs(expected)


@pytest.mark.parametrize("eps", [0.1, 0.3], ids=lambda e: f"eps{e}")
@pytest.mark.parametrize("use_weight", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("ignore", list(IGNORE_CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_off_target_equals_torch_uniform_with_rescaled_eps(
    reduction: F.Reduction, ignore: str, use_weight: bool, eps: float, kernel: Kernel
) -> None:
    """off_target(eps) puts eps/(C-1) off target; torch's uniform eps' puts eps'/C there, so eps' = eps*C/(C-1)
    (and then the on-target mass 1 - eps' + eps'/C = 1 - eps matches too)."""
    seed = _seed("identity", reduction, ignore, use_weight, eps)
    logits, labels, ignore_index = make_batch(seed, ignore)
    weight = make_weight(seed, use_weight)
    expected_loss, expected_grad = torch_loss_and_grad(
        logits, labels, weight=weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=eps * C / (C - 1)
    )
    out = F.smoothed_cross_entropy(
        logits,
        labels,
        smoothing=eps,
        convention="off_target",
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        kernel=kernel,
    )
    assert out.grad is not None
    _assert_close64(out.loss, expected_loss)
    _assert_close64(out.grad, expected_grad)


@pytest.mark.parametrize("eps", [0.1, 0.3], ids=lambda e: f"eps{e}")
def test_kl_div_scale_of_off_target(eps: float, kernel: Kernel) -> None:
    """nn.KLDivLoss()(log_softmax, t): 'mean' divides the sum over N*C elements, so it is (CE - H(t)) / C;
    'batchmean' divides by N and is CE - H(t), with CE and H averaged over the batch."""
    logits, labels, _ = make_batch(_seed("kl", eps), "no-ignored")
    t = torch.full((N, C), eps / (C - 1), dtype=torch.float64)
    t[torch.arange(N), labels] = 1.0 - eps
    log_probs = logits.log_softmax(dim=1)
    ce = float(F.smoothed_cross_entropy(logits, labels, smoothing=eps, convention="off_target", kernel=kernel).loss)
    entropy = float(-(t * t.log()).sum(dim=1).mean())
    with pytest.warns(UserWarning, match="batchmean"):  # torch warns that 'mean' is not the KL divergence
        kl_mean = float(torch.nn.KLDivLoss()(log_probs, t))
    kl_batchmean = float(torch.nn.KLDivLoss(reduction="batchmean")(log_probs, t))
    assert abs(kl_mean - (ce - entropy) / C) <= RTOL64 * abs(kl_mean)
    assert abs(kl_batchmean - (ce - entropy)) <= RTOL64 * abs(kl_batchmean)
    assert abs(kl_batchmean - C * kl_mean) <= RTOL64 * abs(kl_batchmean)
    assert kl_mean > 0


# ---------------------------------------------------------------------------
# 3. Through the server
# ---------------------------------------------------------------------------

EPS = 0.1
ALPHA = 0.3


@dataclass(frozen=True)
class Kind:
    kind: LossKind
    smoothing: float
    convention: F.Convention | None
    alpha: float | None

    def spec(self, reduction: F.Reduction, ignore_index: int, weight: torch.Tensor | None) -> lossd.SessionSpec:
        return lossd.SessionSpec(
            kind=self.kind,
            n_classes=C,
            smoothing=self.smoothing,
            convention=self.convention,
            alpha=self.alpha,
            reduction=reduction,
            ignore_index=ignore_index,
            weight=tuple(weight.tolist()) if weight is not None else None,
        )

    def targets(self, safe_labels: torch.Tensor) -> torch.Tensor:
        """[N, C] float64 soft targets, re-derived here (used for the error bounds)."""
        onehot = TF.one_hot(safe_labels, C).to(torch.float64)
        if self.kind == "cross_entropy":
            return onehot
        if self.convention == "uniform":
            return onehot * (1 - self.smoothing) + self.smoothing / C
        off_target = onehot * (1 - self.smoothing) + (1 - onehot) * self.smoothing / (C - 1)
        if self.kind == "label_smoothing":
            return off_target
        assert self.alpha is not None  # OLS at epoch 0: soft labels are the off-target smoothed one-hot
        return self.alpha * onehot + (1 - self.alpha) * off_target

    def torch_reference(
        self,
        logits64: torch.Tensor,
        labels: torch.Tensor,
        weight: torch.Tensor | None,
        ignore_index: int,
        reduction: F.Reduction,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """torch autograd in float64; for 'none' the grad rows are d loss_i / d z_i (grad_output of ones)."""

        def ce(label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
            return torch_loss_and_grad(
                logits64,
                labels,
                weight=weight,
                ignore_index=ignore_index,
                reduction=reduction,
                label_smoothing=label_smoothing,
            )

        if self.kind == "cross_entropy":
            return ce(0.0)
        off_target_eps = self.smoothing * C / (C - 1)  # proven equal in test_off_target_equals_torch_uniform...
        if self.kind == "label_smoothing":
            return ce(self.smoothing if self.convention == "uniform" else off_target_eps)
        assert self.alpha is not None
        (hard, hard_grad), (soft, soft_grad) = ce(0.0), ce(off_target_eps)
        return self.alpha * hard + (1 - self.alpha) * soft, self.alpha * hard_grad + (1 - self.alpha) * soft_grad


KINDS = {
    "ce": Kind("cross_entropy", 0.0, None, None),
    "ls-uniform": Kind("label_smoothing", EPS, "uniform", None),
    "ls-offtarget": Kind("label_smoothing", EPS, "off_target", None),
    "ols": Kind("online_label_smoothing", EPS, None, ALPHA),  # convention defaults to off_target
}
WIRE_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "f64": torch.float64}


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at |x| (float64 result), subnormals included."""
    info = torch.finfo(dtype)
    magnitude = x.abs().to(torch.float64).clamp(min=info.tiny)
    return torch.exp2(torch.floor(torch.log2(magnitude))) * info.eps


def error_bounds(
    kind: Kind,
    logits64: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: F.Reduction,
    wire: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(bound on |loss - reference|, bound on |grad32 - reference| per element) for the server's compute.

    The server computes in u = float32 (float64 for float64 logits) from logits that are exact in it.
    With q_ic = w_c t_ic (0 on ignored rows), s_i = sum_c q_ic and f = 1/sum_valid w_{y_i} for 'mean':
      loss = f sum_i sum_c q_ic (-log p_ic); every term is >= 0 and -log p_ic = (max z - z_c) + log sum exp(.)
      is a sum of non-negative pieces, so each carries an error <= a few u * (|log p_ic| + 1); summing
      C classes and N rows adds (C + N) u relative (the standard (n - 1) u bound for n terms).
      grad_ic = f (p_ic s_i - q_ic): p_ic = exp(log p_ic) has relative error <= u (|log p_ic| + a few),
      s_i is a C-term sum, f and the subtraction round once each.
    Constants: 16 u covers the few single roundings (targets and weights rounded to u, f, exp, the
    subtraction). For OLS the soft labels are stored as float32 even for float64 logits, so its targets
    carry float32 rounding: 2 EPS32 relative (the stored value and (1 - alpha) * it).
    """
    u = EPS64 if wire == torch.float64 else EPS32
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    q = kind.targets(safe) * (weight if weight is not None else torch.ones(C, dtype=torch.float64))
    q = q * valid[:, None]
    log_p = logits64.log_softmax(dim=1)
    p = log_p.exp()
    s = q.sum(dim=1, keepdim=True)
    if reduction == "mean":
        denominator = (weight[safe] if weight is not None else torch.ones(len(labels), dtype=torch.float64))[
            valid
        ].sum()
        f = 1.0 / float(denominator) if denominator > 0 else 0.0
    else:
        f = 1.0
    storage = 2 * EPS32 if (kind.kind == "online_label_smoothing" and wire == torch.float64) else 0.0
    terms = q * (log_p.abs() + 1)  # per-element magnitude of the loss terms, with their error scale
    grad_scale = f * (p * s + q)
    grad_bound = ((C + 16) * u + (log_p.abs() * u) + storage) * grad_scale
    row_bound = ((C + 16) * u + storage) * terms.sum(dim=1)
    if reduction == "none":
        return row_bound, grad_bound
    return (N + C + 16) * u * f * terms.sum() + storage * f * terms.sum(), grad_bound


def server_case(
    client: lossd.Client,
    name: str,
    kind: Kind,
    reduction: F.Reduction,
    ignore: str,
    use_weight: bool,
    wire: torch.dtype,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None, lossd.LossResult]:
    logits, labels, ignore_index = make_batch(seed, ignore, dtype=wire)
    weight = make_weight(seed, use_weight)
    client.create_session(name, kind.spec(reduction, ignore_index, weight))
    result = client.compute_loss(name, logits, labels, training=True, need_grad=True)
    return logits, labels, ignore_index, weight, result


@pytest.mark.parametrize("wire", list(WIRE_DTYPES.values()), ids=list(WIRE_DTYPES))
@pytest.mark.parametrize("use_weight", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("ignore", list(IGNORE_CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind_id", list(KINDS))
def test_server_matches_torch_float64(
    client: lossd.Client,
    session_name: str,
    kind_id: str,
    reduction: F.Reduction,
    ignore: str,
    use_weight: bool,
    wire: torch.dtype,
) -> None:
    kind = KINDS[kind_id]
    seed = _seed("server", kind_id, reduction, ignore, use_weight, str(wire))
    logits, labels, ignore_index, weight, result = server_case(
        client, session_name, kind, reduction, ignore, use_weight, wire, seed
    )
    logits64 = logits.to(torch.float64)  # the reference sees exactly what the server decoded
    expected_loss, expected_grad = kind.torch_reference(logits64, labels, weight, ignore_index, reduction)
    loss_bound, grad_bound = error_bounds(kind, logits64, labels, weight, ignore_index, reduction, wire)

    # Loss: float32 compute error, plus half an ulp if the server rounded it to its own (returned) dtype.
    loss = result.loss.to(torch.float64)
    assert loss.shape == expected_loss.shape
    loss_error = (loss - expected_loss).abs()
    assert bool((loss_error <= loss_bound + ulp(expected_loss, result.loss.dtype) / 2).all()), (
        f"loss {loss.tolist()} vs {expected_loss.tolist()}: error {loss_error.max().item():.3e}"
    )

    # Grad: the server rounds its compute-dtype grad g' (|g' - g| <= bound) to the wire dtype, the reference
    # rounds the exact g; two roundings to nearest of values that far apart differ by <= 1 ulp + bound.
    assert result.grad is not None and result.grad.dtype == wire and result.grad.shape == logits.shape
    grad = result.grad.to(torch.float64)
    rounded = expected_grad.to(wire).to(torch.float64)
    allowed = ulp(torch.maximum(rounded.abs(), grad.abs()), wire) + grad_bound
    grad_error = (grad - rounded).abs()
    assert bool((grad_error <= allowed).all()), (
        f"grad error {grad_error.max().item():.3e} exceeds bound at {(grad_error > allowed).nonzero().tolist()[:5]}"
    )
    # The bound is not vacuous: it is a small fraction of the gradient's scale.
    assert float(allowed.max()) < 0.02 * float(expected_grad.abs().max())

    valid = labels != ignore_index
    assert result.n_used == int(valid.sum())
    assert result.n_correct == int((valid & (logits64.argmax(dim=1) == labels)).sum())
    assert 0 < result.n_correct < result.n_used


# ---------------------------------------------------------------------------
# 4. Edges: every row ignored, empty batch
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("use_weight", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind_id", list(KINDS))
def test_all_rows_ignored(
    client: lossd.Client, session_name: str, kind_id: str, reduction: F.Reduction, use_weight: bool
) -> None:
    kind = KINDS[kind_id]
    seed = _seed("all-ignored", kind_id, reduction, use_weight)
    logits, _, _ = make_batch(seed, "no-ignored", dtype=torch.float32, n=5)
    labels = torch.full((5,), -100)
    weight = make_weight(seed, use_weight)
    client.create_session(session_name, kind.spec(reduction, -100, weight))
    result = client.compute_loss(session_name, logits, labels, training=True, need_grad=True)

    expected_loss, expected_grad = kind.torch_reference(logits.to(torch.float64), labels, weight, -100, reduction)
    if reduction == "mean":
        assert bool(expected_loss.isnan()) and bool(result.loss.isnan())  # 0 / 0, as torch
    else:
        assert bool((expected_loss == 0).all()) and torch.equal(result.loss.to(torch.float64), expected_loss)
    assert bool((expected_grad == 0).all())  # torch's gradient is zero, not NaN
    assert result.grad is not None and result.grad.dtype == torch.float32
    assert torch.equal(result.grad, torch.zeros(5, C))
    assert (result.n_used, result.n_correct) == (0, 0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind_id", list(KINDS))
def test_empty_batch(client: lossd.Client, session_name: str, kind_id: str, reduction: F.Reduction) -> None:
    kind = KINDS[kind_id]
    logits = torch.zeros(0, C, dtype=torch.float32)
    labels = torch.zeros(0, dtype=torch.int64)
    client.create_session(session_name, kind.spec(reduction, -100, None))
    result = client.compute_loss(session_name, logits, labels, training=True, need_grad=True)

    expected_loss, expected_grad = kind.torch_reference(logits.to(torch.float64), labels, None, -100, reduction)
    assert result.loss.shape == expected_loss.shape
    if reduction == "mean":
        assert bool(expected_loss.isnan()) and bool(result.loss.isnan())
    elif reduction == "sum":
        assert float(expected_loss) == 0.0 and float(result.loss) == 0.0
    else:
        assert expected_loss.shape == (0,)
    assert result.grad is not None and result.grad.shape == expected_grad.shape == (0, C)
    assert (result.n_used, result.n_correct) == (0, 0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_functional_edges_match_torch(reduction: F.Reduction, kernel: Kernel) -> None:
    """The same edges in the pure functions, float64."""
    logits, _, _ = make_batch(_seed("edges", reduction), "no-ignored", n=4)
    for z, y in ((logits, torch.full((4,), -100)), (logits[:0], torch.zeros(0, dtype=torch.int64))):
        expected_loss, expected_grad = torch_loss_and_grad(
            z, y, weight=None, ignore_index=-100, reduction=reduction, label_smoothing=0.1
        )
        out = F.smoothed_cross_entropy(z, y, smoothing=0.1, reduction=reduction, kernel=kernel)
        assert out.grad is not None
        assert torch.equal(out.grad, expected_grad)  # zeros (or empty) on both sides
        assert out.loss.shape == expected_loss.shape
        assert torch.equal(out.loss.isnan(), expected_loss.isnan())
        assert torch.equal(out.loss.nan_to_num(), expected_loss.nan_to_num())
        assert out.n_used == 0


# ---------------------------------------------------------------------------
# 5. int32 labels; 6. unary and stream paths
# ---------------------------------------------------------------------------


def raw(tensor: torch.Tensor) -> bytes:
    return bytes(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def assert_same_result(a: lossd.LossResult, b: lossd.LossResult) -> None:
    assert a.loss.dtype == b.loss.dtype and a.loss.shape == b.loss.shape
    assert raw(a.loss) == raw(b.loss)
    assert a.grad is not None and b.grad is not None
    assert a.grad.dtype == b.grad.dtype and a.grad.shape == b.grad.shape
    assert raw(a.grad) == raw(b.grad)
    assert (a.n_used, a.n_correct) == (b.n_used, b.n_correct)


@pytest.mark.parametrize("wire", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("ignore", list(IGNORE_CASES))
@pytest.mark.parametrize("kind_id", list(KINDS))
def test_int32_labels_equal_int64(
    client: lossd.Client, session_name: str, kind_id: str, ignore: str, wire: torch.dtype
) -> None:
    kind = KINDS[kind_id]
    seed = _seed("int32", kind_id, ignore, str(wire))
    logits, labels, ignore_index = make_batch(seed, ignore, dtype=wire)
    client.create_session(session_name, kind.spec("none", ignore_index, make_weight(seed, True)))
    as_int64 = client.compute_loss(session_name, logits, labels, training=False)
    as_int32 = client.compute_loss(session_name, logits, labels.to(torch.int32), training=False)
    assert_same_result(as_int32, as_int64)
    assert as_int64.n_used == int((labels != ignore_index).sum())
    assert bool((as_int64.loss != 0).any())


@pytest.mark.parametrize("wire", list(WIRE_DTYPES.values()), ids=list(WIRE_DTYPES))
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("kind_id", list(KINDS))
def test_unary_and_stream_give_identical_bytes(
    client: lossd.Client, session_name: str, kind_id: str, reduction: F.Reduction, wire: torch.dtype
) -> None:
    kind = KINDS[kind_id]
    seed = _seed("paths", kind_id, reduction, str(wire))
    logits, labels, ignore_index = make_batch(seed, "ignore-100", dtype=wire)
    client.create_session(session_name, kind.spec(reduction, ignore_index, make_weight(seed, True)))
    streamed = client.compute_loss(session_name, logits, labels, training=True, stream=True)
    unary = client.compute_loss(session_name, logits, labels, training=True, stream=False)
    assert_same_result(unary, streamed)
    assert streamed.grad is not None and streamed.grad.dtype == wire
    assert bool((streamed.grad != 0).any())


# ---------------------------------------------------------------------------
# 7. The fast path's own pieces: the argmax substitute, shift invariance, no-mask rows
# ---------------------------------------------------------------------------


def test_correct_rows_equal_argmax_with_ties_nan_and_inf(kernel: Kernel) -> None:
    """Small integer logits tie at the top in most rows; NaN and infinite rows take argmax's own rules."""
    generator = torch.Generator().manual_seed(_seed("predicts"))
    ties = 0
    for trial in range(400):
        n, c = (int(v) for v in torch.randint(1, 12, (2,), generator=generator))
        logits = torch.randint(-2, 3, (n, c), generator=generator).to(torch.float32)
        logits[0, c - 1] = (float("nan"), float("inf"), float("-inf"), 2.0)[trial % 4]
        if trial % 5 == 0:
            logits[-1] = float("-inf")
        labels = torch.randint(0, c, (n,), generator=generator)
        expected = logits.argmax(dim=1) == labels
        out = F.smoothed_cross_entropy(logits, labels, smoothing=0.1, kernel=kernel)
        assert torch.equal(out.correct, expected), (logits, labels)
        at_max = logits.gather(1, labels.unsqueeze(1)).squeeze(1) == logits.amax(dim=1)
        ties += int((at_max != expected).sum())
    assert ties > 50  # the ties really exercised the argmax fallback


def _functional(
    kind: Kind, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, kernel: Kernel = "eager"
) -> F.LossOutput:
    """The pure function of ``kind`` with reduction 'none' (OLS at epoch 0, as the server starts it)."""
    if kind.alpha is None:
        return F.smoothed_cross_entropy(
            logits,
            labels,
            smoothing=kind.smoothing,
            convention=kind.convention or "uniform",
            ignore_index=ignore_index,
            reduction="none",
            kernel=kernel,
        )
    soft = F.initial_soft_labels(C, kind.smoothing, "label_smoothing", "off_target")
    return F.online_label_smoothing(
        logits, labels, soft, alpha=kind.alpha, ignore_index=ignore_index, reduction="none", kernel=kernel
    )


@pytest.mark.parametrize("kind_id", list(KINDS))
def test_float32_loss_is_as_accurate_with_a_large_logit_offset(kind_id: str, kernel: Kernel) -> None:
    """Softmax is shift-invariant; the float32 math must be too. Loss terms are formed from
    (max - z) and log-sum-exp, never from z itself, so an offset of 1000 adds no error: the result
    stays within the float32 bound of section 3, computed on the offset inputs."""
    kind = KINDS[kind_id]
    logits, labels, ignore_index = make_batch(_seed("offset", kind_id), "no-ignored")
    offset = (logits + 1000.0).to(torch.float32)  # exact in float32 from here on
    reference = offset.to(torch.float64)
    expected_loss, expected_grad = kind.torch_reference(reference, labels, None, ignore_index, "none")
    loss_bound, grad_bound = error_bounds(kind, reference, labels, None, ignore_index, "none", torch.float32)
    out = _functional(kind, offset, labels, ignore_index, kernel)
    assert out.grad is not None
    assert bool(((out.loss.double() - expected_loss).abs() <= loss_bound).all())
    assert bool(((out.grad.double() - expected_grad).abs() <= grad_bound).all())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("use_weight", [False, True], ids=["noweight", "weight"])
def test_rows_without_a_mask_equal_rows_masked_as_valid(
    reduction: F.Reduction, use_weight: bool, kernel: Kernel
) -> None:
    """safe_labels gives no mask when nothing is ignored; that path must equal the masked one."""
    logits, labels, _ = make_batch(_seed("nomask", reduction, use_weight), "no-ignored")
    weight = make_weight(_seed("nomask"), use_weight)
    safe, valid = F.safe_labels(labels, -100)
    assert valid is None and safe is labels
    soft = torch.softmax(torch.randn(C, C, generator=torch.Generator().manual_seed(3), dtype=torch.float64), 1)
    targets = F.ols_targets(soft.float(), 0.4)
    fast = F.target_cross_entropy(logits, labels, None, targets, weight=weight, reduction=reduction, kernel=kernel)
    masked = F.target_cross_entropy(
        logits, labels, torch.ones(N, dtype=torch.bool), targets, weight=weight, reduction=reduction, kernel=kernel
    )
    assert fast.grad is not None and masked.grad is not None
    _assert_close64(fast.loss, masked.loss)
    _assert_close64(fast.grad, masked.grad)
    assert torch.equal(fast.correct, masked.correct)
    assert fast.n_used == masked.n_used == N
