"""The server's loss math on a CUDA device, eager and fused (Triton), against torch's LS CE, Liger's
cross-entropy (where ``liger_kernel`` imports) and the HBM floor.

    python bench/gpu_math.py [--repeats 50] [--json FILE]      (or python -m bench.gpu_math)

Without a CUDA device it says so and exits 0 (skip-clean). Per shape (256x1000 and 1024x1000
float32, 1024x32000 bfloat16), each timed with CUDA events, median of ``--repeats`` after 5 warm-up
calls:

- ``ols-eager`` / ``ols-fused``: what the server computes per OLS training request,
  ``online_label_smoothing(..., kernel="eager" | "fused")`` + ``add_statistics`` + the gradient's
  cast to the logits' dtype (the wire's; a no-op for float32);
- ``ls-eager`` / ``ls-fused``: the label-smoothing session's math (``smoothed_cross_entropy``) + the
  cast, the like-for-like of the next two;
- ``torch-ls``: ``F.cross_entropy(z, y, label_smoothing=0.1)`` forward + backward;
- ``liger``: ``liger_kernel.transformers.LigerCrossEntropyLoss(label_smoothing=0.1)`` forward +
  backward (it writes the gradient over its input in the forward, so it gets logits of its own).

The HBM floor is reading the logits once and writing the gradient once in the logits' dtype, at the
device-to-device copy bandwidth measured here (``copy_`` of a 1 GiB tensor: its bytes read + written
per second). ``x floor`` is ms / floor ms; the target (issue 5's 7, issue 14's GPU line) is OLS math
(fused) / floor <= 2 at 1024x32000 bfloat16, printed for every shape. For OLS the ``ols floor``
column adds what OLS must also move (S's rows of the labels read, N x C float32, and the correct
rows' accumulator rows read and written, K x C float64 each way), for reading the ratio.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as torch_F

from lossd import functional as F
from lossd._kernels import MathKernel

SHAPES = ((256, 1000, torch.float32), (1024, 1000, torch.float32), (1024, 32000, torch.bfloat16))
SMOOTHING = 0.1
ALPHA = 0.5
TARGET_RATIO = 2.0
COPY_BYTES = 1 << 30


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()  # type: ignore[no-untyped-call]
        fn()
        end.record()  # type: ignore[no-untyped-call]
        torch.cuda.synchronize()
        times.append(float(start.elapsed_time(end)))  # type: ignore[no-untyped-call]
    return sorted(times)[len(times) // 2]


def copy_bandwidth(repeats: int) -> float:
    """Bytes read + written per second by a device-to-device ``copy_`` of a large tensor."""
    source = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    ms = _median_ms(lambda: target.copy_(source), repeats)
    return 2 * COPY_BYTES / (ms / 1e3)


def _batch(n: int, c: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """As bench.paths.batch, on the device: the label's logit raised by 3, so some rows are correct."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    labels = torch.randint(0, c, (n,), device="cuda", generator=generator)
    logits = torch.randn(n, c, device="cuda", generator=generator)
    logits[torch.arange(n, device="cuda"), labels] += 3.0
    return logits.to(dtype), labels


def _liger() -> tuple[type[torch.nn.Module] | None, str]:
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss  # type: ignore[import-not-found,unused-ignore]
    except Exception as error:  # not installed, or it does not load here
        return None, f"liger_kernel: {type(error).__name__}: {error}"[:160]
    import liger_kernel  # type: ignore[import-not-found,unused-ignore]

    return LigerCrossEntropyLoss, f"liger_kernel {getattr(liger_kernel, '__version__', '?')}"


def _paths(n: int, c: int, dtype: torch.dtype, liger: type[torch.nn.Module] | None) -> dict[str, Callable[[], None]]:
    logits, labels = _batch(n, c, dtype)
    soft = F.initial_soft_labels(c, SMOOTHING, device=logits.device)
    accumulator = torch.zeros(c, c, dtype=torch.float64, device=logits.device)
    counts = torch.zeros(c, dtype=torch.int64, device=logits.device)

    def ols(kernel: MathKernel) -> Callable[[], None]:
        def run() -> None:
            out = F.online_label_smoothing(logits, labels, soft, alpha=ALPHA, kernel=kernel)
            assert out.grad is not None
            out.grad.to(dtype)
            F.add_statistics(out, labels, accumulator, counts)

        return run

    def ls(kernel: MathKernel) -> Callable[[], None]:
        def run() -> None:
            out = F.smoothed_cross_entropy(logits, labels, smoothing=SMOOTHING, kernel=kernel)
            assert out.grad is not None
            out.grad.to(dtype)

        return run

    leaf = logits.clone().requires_grad_()

    def torch_ls() -> None:
        leaf.grad = None
        torch_F.cross_entropy(leaf, labels, label_smoothing=SMOOTHING).backward()  # type: ignore[no-untyped-call]

    paths = {
        "ols-eager": ols("eager"),
        "ols-fused": ols("fused"),
        "ls-eager": ls("eager"),
        "ls-fused": ls("fused"),
        "torch-ls": torch_ls,
    }
    if liger is not None:
        module = liger(label_smoothing=SMOOTHING)
        liger_leaf = logits.clone().requires_grad_()  # overwritten by its gradient at every call

        def liger_ce() -> None:
            liger_leaf.grad = None
            module(liger_leaf, labels).backward()

        paths["liger"] = liger_ce
    return paths


def _correct_rows(n: int, c: int, dtype: torch.dtype) -> int:
    logits, labels = _batch(n, c, dtype)
    return int((logits.argmax(dim=1) == labels).sum())


def time_shape(
    n: int, c: int, dtype: torch.dtype, bandwidth: float, repeats: int, liger: type[torch.nn.Module] | None
) -> list[dict[str, Any]]:
    element = torch.empty((), dtype=dtype).element_size()
    floor_ms = 2 * n * c * element / bandwidth * 1e3
    correct = _correct_rows(n, c, dtype)
    ols_floor_ms = floor_ms + (n * c * 4 + 2 * correct * c * 8) / bandwidth * 1e3
    rows = []
    for kind, fn in _paths(n, c, dtype, liger).items():
        row: dict[str, Any] = {"shape": f"{n}x{c}", "dtype": str(dtype).removeprefix("torch."), "kind": kind}
        row |= {"floor_ms": floor_ms, "correct_rows": correct}
        if kind.startswith("ols"):
            row["ols_floor_ms"] = ols_floor_ms
        try:
            ms = _median_ms(fn, repeats)
        except Exception as error:  # e.g. kernel="fused" where Triton does not load: the others still run
            row["unavailable"] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        else:
            row |= {"ms": ms, "x_floor": ms / floor_ms}
        rows.append(row)
        torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    header = f"{'shape':>11} {'dtype':>9} {'kind':>9} {'ms':>9} {'floor ms':>9} {'x floor':>8} {'ols floor ms':>12}"
    lines = [header]
    previous = None
    for row in rows:
        if previous is not None and row["shape"] != previous:
            lines.append("")
        previous = row["shape"]
        ols_floor = f"{row['ols_floor_ms']:12.3f}" if "ols_floor_ms" in row else f"{'':12}"
        if "unavailable" in row:
            lines.append(f"{row['shape']:>11} {row['dtype']:>9} {row['kind']:>9} {'n/a':>9}  ({row['unavailable']})")
            continue
        lines.append(
            f"{row['shape']:>11} {row['dtype']:>9} {row['kind']:>9} {row['ms']:9.3f} {row['floor_ms']:9.3f} "
            f"{row['x_floor']:8.2f} {ols_floor}"
        )
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OLS math (fused) / HBM floor <= 2, at every shape (the target's own shape is 1024x32000 bfloat16)."""
    checks = []
    for row in rows:
        if row["kind"] != "ols-fused":
            continue
        value = row.get("x_floor")
        checks.append(
            {
                "target": "OLS math (fused) / HBM floor",
                "shape": row["shape"],
                "dtype": row["dtype"],
                "value": value,
                "bound": TARGET_RATIO,
                "met": None if value is None else value <= TARGET_RATIO,
            }
        )
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_math.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per kind and shape (default 50)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"no CUDA device (torch {torch.__version__}, CUDA {torch.version.cuda}): skipped")
        return 0
    bandwidth = copy_bandwidth(args.repeats)
    liger, liger_note = _liger()
    name = torch.cuda.get_device_name()
    print(f"{name}  torch {torch.__version__} CUDA {torch.version.cuda}  {liger_note}")
    print(f"device-to-device copy ({COPY_BYTES >> 20} MiB): {bandwidth / 1e12:.2f} TB/s (read + write)")
    rows: list[dict[str, Any]] = []
    for n, c, dtype in SHAPES:
        rows += time_shape(n, c, dtype, bandwidth, args.repeats, liger)
    print(format_rows(rows))
    checks = targets(rows)
    print("\ntarget: OLS math (fused) / HBM floor <= 2x (its shape: 1024x32000 bfloat16)")
    for check in checks:
        verdict = "not measured" if check["met"] is None else ("met" if check["met"] else "NOT met")
        value = "-" if check["value"] is None else f"{check['value']:.2f}x"
        print(f"  {check['shape']:>11} {check['dtype']:>9}  {value:>7}  {verdict}")
    if args.json:
        document = {
            "device": name,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "liger": liger_note,
            "copy_bandwidth_bytes_per_s": bandwidth,
            "results": rows,
            "targets": checks,
        }
        with open(args.json, "w") as file:
            json.dump(document, file, indent=2)
            file.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
