"""numba kernels of :mod:`lossd._fused_cpu` (imported only once numba's threading layer is chosen).

Module-level functions, so that numba's on-disk cache (``cache=True``) can keep them: a
function defined inside another one is compiled anew in every process. ``error_model="numpy"``:
a division by zero gives inf or NaN, as torch's does, where Python's model would raise.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic, overload

FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
MEAN, SUM, NONE = 0, 1, 2  # lossd._fused.REDUCTIONS' order


def _bitcast(source: Any, target: Any) -> Any:
    """An intrinsic returning the ``target`` float whose bits are the ``source`` integer (numba has no scalar
    bitcast of its own). The fixed signature casts a wider integer argument down first."""

    @intrinsic
    def cast(typingctx: Any, value: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.bitcast(args[0], context.get_value_type(target))

        return target(source), codegen

    return cast


_int32_as_float32 = _bitcast(types.int32, types.float32)
_int64_as_float64 = _bitcast(types.int64, types.float64)


@njit(fastmath=FASTMATH, error_model="numpy", inline="always", cache=True)
def expf_at_most_zero(shifted: Any) -> Any:
    """``exp(shifted)`` for float32 ``shifted <= 0``, vectorisable: numba's ``np.exp`` is a scalar libm call
    per element (about 5x slower) since the LLVM it ships has no vector math library. Cephes' expf:
    ``2^k * exp(r)`` with ``k = round(s / ln 2)``, ``r`` from a two-part ln 2 (exact products), a degree-7
    polynomial for ``exp(r)`` on [-ln2/2, ln2/2] (about 1 ulp), and ``2^k`` bitcast from its exponent bits;
    below exp(-87.3) (under float32's smallest normal) it gives 0. Inlined into each loop that uses it,
    so that every pass over a row computes its exponentials and its sums together."""
    low = np.float32(-87.3)
    s = shifted if shifted > low else low
    k = np.floor(s * np.float32(1.44269504088896341) + np.float32(0.5))
    r = s - k * np.float32(0.693359375) - k * np.float32(-2.12194440e-4)
    poly = np.float32(1.9875691500e-4)
    poly = poly * r + np.float32(1.3981999507e-3)
    poly = poly * r + np.float32(8.3334519073e-3)
    poly = poly * r + np.float32(4.1665795894e-2)
    poly = poly * r + np.float32(1.6666665459e-1)
    poly = poly * r + np.float32(5.0000001201e-1)
    scale = _int32_as_float32((np.int32(k) + np.int32(127)) << np.int32(23))
    return (poly * r * r + r + np.float32(1)) * scale if shifted >= low else np.float32(0)


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def exp_shifted_f32(xi: Any, m: Any, e: Any) -> Any:
    """``e = exp(xi - m)`` (float32) and ``sum(e)``, in one pass."""
    total = np.float32(0)
    for c in range(xi.shape[0]):
        value = expf_at_most_zero(xi[c] - m)
        e[c] = value
        total += value
    return total


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def exp_shifted_poison_f32(xi: Any, m: Any, e: Any) -> tuple[Any, Any]:
    """As :func:`exp_shifted_f32`, with ``sum((xi - m) * 0)``: NaN for a NaN or an infinity in the row."""
    total = np.float32(0)
    poison = np.float32(0)
    for c in range(xi.shape[0]):
        shifted = xi[c] - m
        value = expf_at_most_zero(shifted)
        e[c] = value
        total += value
        poison += shifted * np.float32(0)
    return total, poison


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def exp_shifted_sum_f32(xi: Any, m: Any, e: Any) -> tuple[Any, Any]:
    """As :func:`exp_shifted_f32`, with ``sum(xi - m)`` (label smoothing's uniform term)."""
    total = np.float32(0)
    shifted_sum = np.float32(0)
    for c in range(xi.shape[0]):
        shifted = xi[c] - m
        value = expf_at_most_zero(shifted)
        e[c] = value
        total += value
        shifted_sum += shifted
    return total, shifted_sum


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def exp_shifted_dot_f32(xi: Any, m: Any, e: Any, q: Any) -> tuple[Any, Any, Any]:
    """As :func:`exp_shifted_f32`, with ``sum(q * (xi - m))`` and ``sum(q)`` (OLS's soft-label row ``q``)."""
    total = np.float32(0)
    dot = np.float32(0)
    mass = np.float32(0)
    for c in range(xi.shape[0]):
        shifted = xi[c] - m
        value = expf_at_most_zero(shifted)
        e[c] = value
        total += value
        t = q[c]
        dot += t * shifted
        mass += t
    return total, dot, mass


def row_maximum(xi: Any) -> Any:
    """``max(xi)`` for a contiguous float32 or float64 row, as an integer maximum: a float's bits, with the
    magnitude bits flipped when negative, order as the floats do, and LLVM vectorises an integer maximum
    (numba's float ``max``, with its NaN rules, is one dependent compare per element: 7x slower at
    C = 1000). A NaN is not propagated here: the caller's poison makes such a row's loss NaN all the same.
    Compiled per dtype (:func:`_row_maximum_of`), so a float32 row keeps a float32 maximum."""
    raise NotImplementedError("row_maximum runs compiled, inside the kernels")


@overload(row_maximum, jit_options={"fastmath": FASTMATH, "error_model": "numpy"})
def _row_maximum_of(xi: Any) -> Any:
    # numba widens integer arithmetic to int64; the order-preserving key survives it (sign-extended bits
    # flip alike), and the maximum's low bits are the float's own.
    bits_type: Any
    if xi.dtype == types.float64:
        bits_type, shift, to_float = np.int64, 63, _int64_as_float64
    else:
        bits_type, shift, to_float = np.int32, 31, _int32_as_float32
    magnitude = np.int64(np.iinfo(bits_type).max)
    lowest = np.int64(np.iinfo(bits_type).min)

    def impl(xi: Any) -> Any:
        bits = xi.view(bits_type)
        m = lowest
        for c in range(bits.shape[0]):
            b = np.int64(bits[c])
            key = b ^ ((b >> shift) & magnitude)
            m = key if key > m else m
        return to_float(bits_type(m ^ ((m >> shift) & magnitude)))

    return impl


@njit(fastmath=FASTMATH, error_model="numpy", inline="always", cache=True)
def row(
    x: Any,
    i: int,
    label: int,
    is_valid: bool,
    weight: Any,
    sum_weight: Any,
    table: Any,
    params: Any,
    scale: Any,
    need_grad: bool,
    grad: Any,
    losses: Any,
    correct: Any,
    row_max: Any,
    inv_sum: Any,
    scratch: Any,
) -> None:
    """Row ``i``. ``scratch``: the exponentials when no gradient row holds them, the calling chunk's,
    allocated once for its rows."""
    n_classes = x.shape[1]
    spike, base, table_scale = params[0], params[1], params[2]
    zero = params[3]  # 0 in the compute dtype
    has_weight = weight.shape[0] > 0
    has_table = table.shape[1] > 0
    trow = table[label if has_table else 0]  # no table: a [1, 0] placeholder
    xi = x[i]
    m = row_maximum(xi)
    # e = exp(z - m) goes into the gradient row (or scratch) so that exp runs once per logit.
    e = grad[i] if need_grad else scratch
    # dot = sum_c q_c (z_c - m), mass = sum_c q_c, term by term (spike, base, table).
    w_label = weight[label] if has_weight else zero + 1
    row_spike = spike * w_label
    dot = row_spike * (xi[label] - m)
    mass = row_spike
    # A NaN or an infinity anywhere in the row must make its loss NaN (the caller then runs the eager math).
    # The base and table sums run over every (z_c - m), which is NaN or infinite for such a row (0 * inf is
    # NaN too), so dot carries it; plain cross-entropy has no such sum and takes a sum of (z_c - m) * 0.
    poison = zero
    if x.itemsize == 4 and not has_weight and not (base != 0 and has_table):
        # float32 without weights (the common cases): the sums ride along in the exp pass.
        if has_table:
            total, table_dot, table_mass = exp_shifted_dot_f32(xi, m, e, trow)
            dot += table_scale * table_dot
            mass += table_scale * table_mass
        elif base != 0:
            total, shifted_sum = exp_shifted_sum_f32(xi, m, e)
            dot += base * shifted_sum
            mass += base * sum_weight
        else:
            total, poison = exp_shifted_poison_f32(xi, m, e)
    else:
        if x.itemsize == 4:
            total = exp_shifted_f32(xi, m, e)
        else:
            total = zero
            for c in range(n_classes):
                e[c] = np.exp(xi[c] - m)
                total += e[c]
        if base != 0:
            shifted_sum = zero
            if has_weight:
                for c in range(n_classes):
                    shifted_sum += weight[c] * (xi[c] - m)
            else:
                for c in range(n_classes):
                    shifted_sum += xi[c] - m
            dot += base * shifted_sum
            mass += base * sum_weight
        if has_table:
            table_dot = zero
            table_mass = zero
            if has_weight:
                for c in range(n_classes):
                    t = weight[c] * trow[c]
                    table_dot += t * (xi[c] - m)
                    table_mass += t
            else:
                for c in range(n_classes):
                    t = zero + trow[c]
                    table_dot += t * (xi[c] - m)
                    table_mass += t
            dot += table_scale * table_dot
            mass += table_scale * table_mass
        if base == 0 and not has_table:
            for c in range(n_classes):
                poison += xi[c] * zero
    if base != 0 or has_table:
        poison = dot * zero
    inv = 1 / total
    row_max[i] = m
    inv_sum[i] = inv
    losses[i] = (mass * np.log(total) - dot + poison) if is_valid else zero + poison
    hit = is_valid and xi[label] == m
    if hit:  # argmax's rule: the label counts only if no maximum comes before it
        for c in range(label):
            if xi[c] == m:
                hit = False
                break
    correct[i] = hit
    if need_grad:
        rs = scale if is_valid else zero
        g = grad[i]
        factor = mass * inv * rs
        if has_table:
            t_factor = table_scale * rs
            base_factor = base * rs
            if has_weight:
                for c in range(n_classes):
                    g[c] = factor * g[c] - weight[c] * (t_factor * trow[c] + base_factor)
            else:
                for c in range(n_classes):
                    g[c] = factor * g[c] - (t_factor * trow[c] + base_factor)
        elif base != 0:
            base_factor = base * rs
            if has_weight:
                for c in range(n_classes):
                    g[c] = factor * g[c] - weight[c] * base_factor
            else:
                for c in range(n_classes):
                    g[c] = factor * g[c] - base_factor
        else:
            for c in range(n_classes):
                g[c] = factor * g[c]
        g[label] -= row_spike * rs


@njit(error_model="numpy", cache=True)
def row_scale(labels: Any, valid: Any, weight: Any, reduction: int, zero: Any) -> tuple[Any, Any]:
    """(the reduction's factor for valid rows, the mean's denominator)."""
    n = labels.shape[0]
    if reduction != MEAN:
        return zero + 1, zero + 1
    if weight.shape[0] == 0 and valid.shape[0] == 0:
        denominator = zero + n
    else:
        denominator = zero
        for i in range(n):
            if valid.shape[0] == 0 or valid[i]:
                denominator += weight[labels[i]] if weight.shape[0] > 0 else 1
    return (1 / denominator if denominator > 0 else zero), denominator


@njit(fastmath=FASTMATH, error_model="numpy", parallel=True, cache=True)
def loss_rows(
    x: Any,
    labels: Any,
    valid: Any,
    weight: Any,
    table: Any,
    params: Any,
    reduction: int,
    need_grad: bool,
    grad: Any,
    losses: Any,
    correct: Any,
    row_max: Any,
    inv_sum: Any,
    chunks: int,
) -> Any:
    """Every row's loss, gradient (``need_grad``), correct flag, maximum and 1 / sum of exponentials, in
    ``chunks`` chunks of rows run in parallel (a few per thread, for balance), each allocating its scratch
    once. Returns (the reduced loss, whether it is finite, the number of correct rows)."""
    zero = params[3]
    scale, denominator = row_scale(labels, valid, weight, reduction, zero)
    sum_weight = zero + x.shape[1]
    if weight.shape[0] > 0:
        sum_weight = zero
        for c in range(weight.shape[0]):
            sum_weight += weight[c]
    has_valid = valid.shape[0] > 0
    n, n_classes = x.shape
    chunks = max(1, min(n, chunks))
    for chunk in prange(chunks):
        scratch = np.empty(0 if need_grad else n_classes, dtype=x.dtype)
        for i in range(chunk * n // chunks, (chunk + 1) * n // chunks):
            row(
                x, i, labels[i], valid[i] if has_valid else True, weight, sum_weight, table, params,
                scale, need_grad, grad, losses, correct, row_max, inv_sum, scratch,
            )  # fmt: skip
    # (the reduced loss, every row's loss finite, the correct rows): the caller's checks need no more ops.
    total = zero
    n_correct = 0
    for i in range(x.shape[0]):
        total += losses[i]
        n_correct += 1 if correct[i] else 0
    if reduction == NONE:
        return zero, np.isfinite(total), n_correct
    # The reduced loss itself: a mean over no weight is 0/0 (NaN, as torch's) though every row is finite.
    reduced = total / denominator if reduction == MEAN else total
    return reduced, np.isfinite(reduced), n_correct


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def probs_into(xi: Any, m: Any, inv: Any, e: Any) -> None:
    """``e = softmax row`` rounded in the compute dtype, as ``probs`` of the eager math."""
    if xi.itemsize == 4:
        exp_shifted_f32(xi, m, e)
    else:
        for c in range(xi.shape[0]):
            e[c] = np.exp(xi[c] - m)
    for c in range(xi.shape[0]):
        e[c] *= inv


@njit(fastmath=FASTMATH, error_model="numpy", parallel=True, cache=True)
def add_statistics(
    x: Any, labels: Any, correct: Any, row_max: Any, inv_sum: Any, accumulator: Any, counts: Any
) -> None:
    """``accumulator[y_i] += p_i`` and ``counts[y_i] += 1`` for the correct rows. Parallel over column
    blocks: each thread owns whole columns of the accumulator, so rows sharing a label never race."""
    n, n_classes = x.shape
    block = 512
    for start in prange((n_classes + block - 1) // block):
        low = start * block
        high = min(low + block, n_classes)
        e = np.empty(high - low, dtype=x.dtype)
        for i in range(n):
            if correct[i]:
                if start == 0:
                    counts[labels[i]] += 1
                probs_into(x[i, low:high], row_max[i], inv_sum[i], e)
                target = accumulator[labels[i]]
                for c in range(low, high):
                    target[c] += np.float64(e[c - low])


@njit(fastmath=FASTMATH, error_model="numpy", parallel=True, cache=True)
def correct_probs(x: Any, index: Any, row_max: Any, inv_sum: Any, out: Any) -> None:
    for k in prange(index.shape[0]):
        i = index[k]
        e = np.empty(x.shape[1], dtype=x.dtype)
        probs_into(x[i], row_max[i], inv_sum[i], e)
        for c in range(x.shape[1]):
            out[k, c] = np.float64(e[c])
