"""The fused loss kernel on CUDA, in Triton (on the CPU through Triton's interpreter, for tests).

One program per row, two passes over its column blocks, as an online softmax: the first
keeps the running maximum (and the first column attaining it, for argmax), the rescaled
sum of ``exp(z - m)`` and the target's ``mass`` and ``dot`` terms; the second writes the
gradient. The OLS statistics are a kernel of their own, run on the correct rows once the
batch's loss is known finite. The formulas and the contract are in :mod:`lossd._fused`;
:mod:`lossd._numba_kernels` is the CPU twin.

The logits are read in their own dtype and widened in registers (no [N, C] float32 copy of
half-precision logits); the compute dtype is float32, float64 for float64 logits.
"""

from __future__ import annotations

import contextlib
import struct
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from lossd._fused import REDUCTIONS, FusedRows

try:
    import triton  # type: ignore[import-untyped,unused-ignore]
    import triton.language as tl  # type: ignore[import-untyped,unused-ignore]

    _IMPORT_FAILURE: str | None = None
except Exception as error:  # absent, or a broken install: this module still imports, available() says why
    triton = tl = None
    _IMPORT_FAILURE = (
        "triton is not installed" if isinstance(error, ImportError) else f"import triton: {type(error).__name__}"
    )

# The scalar parameters travel as the bits of a float64 and are bitcast in the kernel: Triton passes a
# Python float as float32 (and its interpreter as a Python float), which would round float64's math.
_SCALARS = ("spike_bits", "base_bits", "table_scale_bits", "scale_bits")


def _jit(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    """``triton.jit`` where triton imports; the plain function otherwise (never launched then)."""

    def wrap(fn: Callable[..., Any]) -> Any:
        return fn if triton is None else triton.jit(fn, **options)

    return wrap


@_jit()
def _scalar(bits, DT: tl.constexpr):  # type: ignore[no-untyped-def]
    return bits.to(tl.int64).to(tl.float64, bitcast=True).to(DT)


@_jit()
def _probs_block(x_row, offs, inside, m, inv, DT: tl.constexpr):  # type: ignore[no-untyped-def]
    """``p = exp(z - m) * inv_sum`` of one block, rounded in the compute dtype (the eager ``probs``)."""
    z = tl.load(x_row + offs, mask=inside, other=float("-inf")).to(DT)
    return tl.exp(z - m) * inv


@_jit(do_not_specialize=_SCALARS)
def _loss_rows_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    labels_ptr,
    valid_ptr,
    weight_ptr,
    table_ptr,
    scale_ptr,
    grad_ptr,
    loss_ptr,
    correct_ptr,
    row_max_ptr,
    inv_sum_ptr,
    n_cols,
    spike_bits,
    base_bits,
    table_scale_bits,
    scale_bits,
    DT: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_VALID: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BASE: tl.constexpr,
    HAS_TABLE: tl.constexpr,
    SCALE_IN_MEMORY: tl.constexpr,
    NEED_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row * n_cols can pass 2^31
    cols = tl.arange(0, BLOCK)
    x_row = x_ptr + row * n_cols
    label = tl.load(labels_ptr + row).to(tl.int64)
    spike = _scalar(spike_bits, DT)
    base = _scalar(base_bits, DT)
    table_scale = _scalar(table_scale_bits, DT)
    # The weighted or masked mean's 1 / sum of weights is computed on the device (no sync), so it is read there.
    scale = tl.load(scale_ptr).to(DT) if SCALE_IN_MEMORY else _scalar(scale_bits, DT)
    if HAS_VALID:
        is_valid = tl.load(valid_ptr + row) != 0
        row_scale = tl.where(is_valid, scale, 0.0)
    else:
        is_valid = True
        row_scale = scale
    row_spike = spike * tl.load(weight_ptr + label).to(DT) if HAS_WEIGHT else spike
    t_row = table_ptr + label * n_cols if HAS_TABLE else table_ptr  # the soft target of the row's label
    # Read before pass 2 may overwrite the row with its gradient (overwrite_logits).
    z_label = tl.load(x_row + label).to(DT)

    # Pass 1. The running max starts at the first logit, not -inf, so that rescaling never forms inf - inf.
    m = tl.load(x_row).to(DT)
    first = tl.full([], 0, tl.int32)  # the first column attaining m: argmax's tie rule
    zero = tl.full([], 0, DT)
    total = zero  # sum exp(z - m)
    poison = zero  # sum z * 0: NaN for any NaN or infinity in the row (tl.max may skip a NaN)
    dot = zero  # sum q_c (z_c - m) over the off-label target q_c = w_c (table_scale t_c + base)
    mass = zero  # sum q_c
    for start in range(0, n_cols, BLOCK):
        offs = start + cols
        inside = offs < n_cols
        z = tl.load(x_row + offs, mask=inside, other=float("-inf")).to(DT)
        block_max = tl.max(z, axis=0)
        block_first = tl.min(tl.where(z == block_max, offs, n_cols), axis=0)
        first = tl.where(block_max > m, block_first, first)  # strictly greater: an earlier tie keeps its column
        new_m = tl.maximum(m, block_max)
        total = total * tl.exp(m - new_m) + tl.sum(tl.exp(z - new_m), axis=0)
        poison += tl.sum(tl.where(inside, z * 0.0, 0.0), axis=0)
        if HAS_BASE or HAS_TABLE:
            q = _off_target(t_row, weight_ptr, offs, inside, base, table_scale, DT, HAS_WEIGHT, HAS_BASE, HAS_TABLE)
            # Every term of dot is <= 0 (q >= 0, z <= max), the shift's correction too: no cancellation.
            dot += tl.sum(q * tl.where(inside, z - new_m, 0.0), axis=0) - mass * (new_m - m)
            mass += tl.sum(q, axis=0)
        m = new_m
    dot += row_spike * (z_label - m)
    mass += row_spike
    inv = 1.0 / total
    loss = mass * tl.log(total) - dot
    if HAS_VALID:
        loss = tl.where(is_valid, loss, 0.0)
    correct = is_valid & (first == label)
    tl.store(loss_ptr + row, loss + poison)
    tl.store(correct_ptr + row, correct)
    tl.store(row_max_ptr + row, m)
    tl.store(inv_sum_ptr + row, inv)

    # Pass 2: grad = row_scale (mass p - q), with q's label spike folded in per column (no read-modify-write).
    if NEED_GRAD:
        tl.debug_barrier()  # every thread has read the row's z_label before any overwrites it
        factor = mass * inv * row_scale
        spike_factor = row_spike * row_scale
        g_row = grad_ptr + row * n_cols
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            inside = offs < n_cols
            e = tl.exp(tl.load(x_row + offs, mask=inside, other=float("-inf")).to(DT) - m)
            g = factor * e - tl.where(offs == label, spike_factor, 0.0)
            if HAS_BASE or HAS_TABLE:
                g -= row_scale * _off_target(
                    t_row, weight_ptr, offs, inside, base, table_scale, DT, HAS_WEIGHT, HAS_BASE, HAS_TABLE
                )
            tl.store(g_row + offs, g, mask=inside)


@_jit()
def _off_target(  # type: ignore[no-untyped-def]
    t_row,
    weight_ptr,
    offs,
    inside,
    base,
    table_scale,
    DT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BASE: tl.constexpr,
    HAS_TABLE: tl.constexpr,
):
    """``q_c = w_c (table_scale * table[y, c] + base)`` of one block, 0 outside the row (the label's spike apart)."""
    if HAS_TABLE:
        q = table_scale * tl.load(t_row + offs, mask=inside, other=0.0).to(DT)
        if HAS_BASE:
            q += base
    else:
        q = tl.full(offs.shape, 0, DT) + base
    if HAS_WEIGHT:
        q *= tl.load(weight_ptr + offs, mask=inside, other=0.0).to(DT)
    return tl.where(inside, q, 0.0)


@_jit()
def _statistics_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    labels_ptr,
    correct_ptr,
    row_max_ptr,
    inv_sum_ptr,
    acc_ptr,
    counts_ptr,
    n_cols,
    DT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if tl.load(correct_ptr + row) != 0:
        label = tl.load(labels_ptr + row).to(tl.int64)
        tl.atomic_add(counts_ptr + label, 1)
        m = tl.load(row_max_ptr + row)
        inv = tl.load(inv_sum_ptr + row)
        x_row = x_ptr + row * n_cols
        acc_row = acc_ptr + label * n_cols
        for start in range(0, n_cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inside = offs < n_cols
            # Rows sharing a label add to one accumulator row: atomics.
            tl.atomic_add(acc_row + offs, _probs_block(x_row, offs, inside, m, inv, DT).to(tl.float64), mask=inside)


@_jit()
def _correct_probs_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    index_ptr,
    row_max_ptr,
    inv_sum_ptr,
    out_ptr,
    n_cols,
    DT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    row = tl.load(index_ptr + k).to(tl.int64)
    x_row = x_ptr + row * n_cols
    m = tl.load(row_max_ptr + row)
    inv = tl.load(inv_sum_ptr + row)
    for start in range(0, n_cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < n_cols
        p = _probs_block(x_row, offs, inside, m, inv, DT)
        tl.store(out_ptr + k * n_cols + offs, p.to(tl.float64), mask=inside)


# Kernels defined under TRITON_INTERPRET=1 (read by Triton when it decorates them) run on the CPU, in numpy.
_INTERPRETED = type(_loss_rows_kernel).__name__ == "InterpretedFunction"


@contextlib.contextmanager
def _launching(interpreted: bool) -> Iterator[None]:
    """The interpreter runs each op in numpy, which warns where a GPU is silent (inf - inf or an all-NaN
    max in a non-finite row, -inf * 0 in a masked lane): those values are the kernel's own business.
    (catch_warnings is process-wide; only the interpreter, a test tool, takes this path.)"""
    if not interpreted:
        yield
        return
    import numpy as np

    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _bits(value: float) -> int:
    bits: int = struct.unpack("<q", struct.pack("<d", value))[0]
    return bits


def _tl_dtype(dtype: torch.dtype) -> Any:
    return tl.float64 if dtype == torch.float64 else tl.float32


class TritonBackend:
    """:class:`lossd._fused.Backend` on CUDA (or on the CPU under TRITON_INTERPRET=1).

    ``max_block``: the widest column block (a power of two); tests narrow it so that rows span
    several blocks at small C."""

    name = "triton"

    def __init__(self, max_block: int = 2048) -> None:
        self.max_block = max_block

    def _launch(self, kernel: Any, n_programs: int, n_cols: int, *args: Any, **constants: Any) -> None:
        block = min(self.max_block, triton.next_power_of_2(n_cols))
        # About 8 elements per thread and per array: at 2048 x 8 warps the loss kernel takes ~60 registers
        # (no spills, sm_90), so several rows run per SM to keep the loads in flight.
        warps = max(1, min(8, block // 256))
        with _launching(_INTERPRETED):
            # fp fusion (FMA) stated, not defaulted: Triton 3.9 warns where it is left to its changing default.
            kernel[(n_programs,)](*args, BLOCK=block, num_warps=warps, enable_fp_fusion=True, **constants)

    def loss_rows(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        valid: torch.Tensor | None,
        spike: float,
        base: float,
        table: torch.Tensor | None,
        table_scale: float,
        weight: torch.Tensor | None,
        reduction: str,
        need_grad: bool,
        *,
        accumulate: tuple[torch.Tensor, torch.Tensor] | None = None,
        overwrite_logits: bool = False,
    ) -> FusedRows:
        if reduction not in REDUCTIONS:
            raise ValueError(f"Expected reduction to be 'mean', 'sum' or 'none' but got {reduction!r}")
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        x = logits.contiguous()  # widened in the kernel, block by block
        n, n_classes = x.shape
        device = x.device
        labels = labels.contiguous()
        weight = None if weight is None else weight.to(dtype).contiguous()
        table = None if table is None else table.contiguous()
        # The logits' memory takes the gradient where the dtypes match and it is the caller's own tensor, but
        # not with accumulate: the statistics read the logits after the loss pass (once the loss is finite).
        in_place = overwrite_logits and accumulate is None and need_grad and x.dtype == dtype and x is logits
        grad = None if not need_grad else x if in_place else torch.empty((n, n_classes), dtype=dtype, device=device)
        losses = torch.empty(n, dtype=dtype, device=device)
        correct = torch.empty(n, dtype=torch.bool, device=device)
        row_max = torch.empty(n, dtype=dtype, device=device)
        inv_sum = torch.empty(n, dtype=dtype, device=device)

        # The mean's factor, as _numba_kernels.row_scale: 1 / N, or 1 / (the valid rows' target weights).
        scale: torch.Tensor | None = None
        scale_value = 1.0
        denominator: torch.Tensor | float = 1.0
        if reduction == "mean":
            if weight is None and valid is None:
                denominator = float(n)
                scale_value = 1.0 / n if n else 0.0
            else:
                row_weight = weight.index_select(0, labels) if weight is not None else None
                mask = valid.to(dtype) if valid is not None else None
                if row_weight is None:
                    assert mask is not None
                    denominator = mask.sum()
                else:
                    denominator = (row_weight * mask).sum() if mask is not None else row_weight.sum()
                scale = torch.where(denominator > 0, 1.0 / denominator, torch.zeros_like(denominator)).reshape(1)

        if n and n_classes:
            self._launch(
                _loss_rows_kernel, n, n_classes,
                x, labels, valid, weight, table, scale, grad, losses, correct, row_max, inv_sum, n_classes,
                _bits(spike), _bits(base), _bits(table_scale), _bits(scale_value),
                DT=_tl_dtype(dtype), HAS_VALID=valid is not None, HAS_WEIGHT=weight is not None,
                HAS_BASE=base != 0.0, HAS_TABLE=table is not None, SCALE_IN_MEMORY=scale is not None,
                NEED_GRAD=need_grad,
            )  # fmt: skip
        if reduction == "none":
            loss = losses
        elif reduction == "sum":
            loss = losses.sum()
        else:
            loss = losses.sum() / denominator  # 0 / 0 = NaN over no weight, as torch (the caller reruns eager)
        # The caller reads both right away (finite decides the eager rerun, n_correct goes into the
        # response), and accumulate needs finite here; on CUDA each is a device sync, so one transfer brings both.
        finite, n_correct = torch.stack((torch.isfinite(loss).all().to(torch.int64), correct.sum())).tolist()
        # Only an accepted batch counts: one with a non-finite loss is recomputed eagerly or refused. The
        # statistics kernel reads just the correct rows again (the others return at once).
        accumulated = accumulate is not None and bool(finite)
        rows = FusedRows(loss, grad, correct, row_max, inv_sum, bool(finite), int(n_correct), accumulated)
        if accumulate is not None and accumulated and n_correct:
            self.add_statistics(x, labels, rows, *accumulate)
        return rows

    def correct_probs(self, logits: torch.Tensor, rows: FusedRows, index: torch.Tensor) -> torch.Tensor:
        x = logits.contiguous()
        n_classes = x.shape[1]
        out = torch.empty((index.shape[0], n_classes), dtype=torch.float64, device=x.device)
        if index.numel() and n_classes:
            self._launch(
                _correct_probs_kernel, index.shape[0], n_classes,
                x, index.contiguous(), rows.row_max, rows.inv_sum, out, n_classes, DT=_tl_dtype(rows.row_max.dtype),
            )  # fmt: skip
        return out

    def add_statistics(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        rows: FusedRows,
        accumulator: torch.Tensor,
        counts: torch.Tensor,
    ) -> None:
        x = logits.contiguous()
        n, n_classes = x.shape
        if n and n_classes:
            self._launch(
                _statistics_kernel, n, n_classes,
                x, labels.contiguous(), rows.correct, rows.row_max, rows.inv_sum, accumulator, counts, n_classes,
                DT=_tl_dtype(rows.row_max.dtype),
            )  # fmt: skip


BACKEND = TritonBackend()

_lock = threading.Lock()
_checked = False
_failure: str | None = None


def available() -> str | None:
    """None when the kernels run on this machine's target (CUDA, or the CPU under TRITON_INTERPRET=1),
    else why not, in one line. Checked once (the first call compiles or loads the kernels)."""
    global _checked, _failure
    with _lock:
        if not _checked:
            try:
                _failure = _check()
            except Exception as error:  # a compiler or driver failure: the eager math runs instead
                _failure = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
            _checked = True
        return _failure


def _check() -> str | None:
    if _IMPORT_FAILURE is not None:
        return _IMPORT_FAILURE
    if _INTERPRETED:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        return "no CUDA device (TRITON_INTERPRET=1 runs the kernels on the CPU, for tests)"
    # A warm-up of each kernel on a 2x3 batch (OLS, weights, a mask, the statistics), checked against the
    # formulas, so that a toolchain that compiles but computes wrongly is caught here and not in training.
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 1.0, 0.0]], device=device)
    labels = torch.tensor([2, 1], device=device)
    valid = torch.tensor([True, True], device=device)
    weight = torch.ones(3, device=device)
    table = torch.full((3, 3), 1.0 / 3.0, device=device)
    acc = torch.zeros(3, 3, dtype=torch.float64, device=device)
    counts = torch.zeros(3, dtype=torch.int64, device=device)
    rows = BACKEND.loss_rows(
        logits, labels, valid, 0.5, 0.0, table, 0.5, weight, "mean", True, accumulate=(acc, counts)
    )
    BACKEND.add_statistics(logits, labels, rows, acc, counts)
    probs = BACKEND.correct_probs(logits, rows, torch.tensor([0], device=device))
    expected_p = torch.softmax(logits.double(), dim=1)
    target = 0.5 * torch.nn.functional.one_hot(labels, 3).double() + 0.5 / 3.0
    expected_loss = -(target * expected_p.log()).sum(dim=1).mean()
    assert rows.grad is not None
    checks = (
        abs(float(rows.loss) - float(expected_loss)) < 1e-5,
        torch.allclose(rows.grad.double(), (expected_p - target) / 2, atol=1e-6),
        rows.correct.tolist() == [True, False],
        torch.allclose(probs, expected_p[:1], atol=1e-6),
        torch.allclose(acc[2], 2 * expected_p[0], atol=1e-6) and counts.tolist() == [0, 0, 2],
    )
    if not all(checks):
        return f"the warm-up computed wrong numbers on {device.type} (checks: {checks})"
    return None
