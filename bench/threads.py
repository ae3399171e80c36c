"""The fused kernel at 1 and 2 torch threads against torch's LS CE at the same count, CPU, one process.

    python -m bench.threads [--shapes 256x1000,1024x1000] [--threads 1,2] [--repeats 100]
                            [--math-kernel auto|fused|eager] [--json FILE]

(also ``python -m bench --threads-report``, after the main run). ``server_math`` (loss + gradient +
``add_statistics``, the numba kernel under ``--math-kernel auto``) and ``torch_ls`` run in this
process; before each timed step it calls ``torch.set_num_threads(n)``, and the numba kernel sizes its
parallel region from ``torch.get_num_threads()``, so one knob sets both. Every (path, thread count)
pair of a shape is timed round-robin in one interleaved run, in an order rotated from round to
round, after the warm-up rounds; the figures are medians, the ratios ratios of medians at the same
thread count. At 2 threads on a 2-core machine each step has every core to itself (this process
runs nothing else meanwhile). About 10 s with the defaults.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from bench import machine
from bench.paths import PATHS, Context, Step
from lossd._kernels import MATH_KERNELS, MathKernel

THREADS_REPORT_SHAPES = "256x1000,1024x1000"
THREADS_REPORT_COUNTS = "1,2"
THREADS_REPORT_PATHS = ("server_math", "torch_ls")
DESCRIPTION = "server_math vs torch_ls at the same torch thread count, interleaved, CPU, this process"


def _counts(text: str) -> list[int]:
    try:
        counts = [int(item) for item in text.split(",") if item.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"thread counts are integers, got {text!r}") from error
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"thread counts are >= 1, got {text!r}")
    return counts


def run(
    *,
    shapes: Sequence[tuple[int, int]] | None = None,
    counts: Sequence[int] | None = None,
    repeats: int = 100,
    warmup: int = 10,
    math_kernel: MathKernel = "auto",
) -> list[dict[str, Any]]:
    """One row per (shape, thread count): both paths' medians and server_math / torch_ls.

    Leaves torch's thread count where it found it."""
    from bench.harness import parse_shapes  # here: the harness imports this module

    shapes = list(shapes) if shapes is not None else parse_shapes(THREADS_REPORT_SHAPES)
    counts = list(counts) if counts is not None else _counts(THREADS_REPORT_COUNTS)
    ctx = Context(device=torch.device("cpu"), target=None, math_kernel=math_kernel)
    before = torch.get_num_threads()
    rows: list[dict[str, Any]] = []
    try:
        for n, c in shapes:
            steps: dict[tuple[str, int], Step] = {}
            for name in THREADS_REPORT_PATHS:
                made = PATHS[name].make(ctx, n, c)
                for count in counts:
                    steps[(name, count)] = made  # the same tensors at every count: only the threads differ
            order = list(steps)
            times: dict[tuple[str, int], list[float]] = {key: [] for key in order}
            for round_ in range(warmup + repeats):
                shift = round_ % len(order)
                for key in order[shift:] + order[:shift]:
                    torch.set_num_threads(key[1])
                    start = time.perf_counter()
                    steps[key].run()
                    elapsed = time.perf_counter() - start
                    if round_ >= warmup:
                        times[key].append(elapsed * 1e3)
            note = steps[("server_math", counts[0])].note
            for count in counts:
                math_ms = statistics.median(times[("server_math", count)])
                torch_ms = statistics.median(times[("torch_ls", count)])
                rows.append(
                    {
                        "shape": f"{n}x{c}",
                        "n": n,
                        "c": c,
                        "threads": count,
                        "server_math_ms": math_ms,
                        "torch_ls_ms": torch_ms,
                        "ratio": math_ms / torch_ms,
                        "samples": repeats,
                        **({"note": note()} if note else {}),
                    }
                )
    finally:
        torch.set_num_threads(before)
    return rows


def format_report(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'shape':>10} {'threads':>7} {'server_math ms':>14} {'torch_ls ms':>11} {'ratio':>6} {'x 1 thread':>10}"]
    one = {row["shape"]: row for row in rows if row["threads"] == 1}
    for row in rows:
        base = one.get(row["shape"])
        speedup = "-" if base is None else f"{base['server_math_ms'] / row['server_math_ms']:.2f}"
        lines.append(
            f"{row['shape']:>10} {row['threads']:>7} {row['server_math_ms']:14.3f} {row['torch_ls_ms']:11.3f} "
            f"{row['ratio']:6.2f} {speedup:>10}"
        )
    notes = sorted({row["note"] for row in rows if row.get("note")})
    lines += [f"  ({note})" for note in notes]
    lines.append("  ratio: server_math / torch_ls at the same thread count; x 1 thread: server_math's speed-up")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from bench.harness import _tune_malloc_as_the_client, parse_shapes  # the harness's allocator and shapes

    parser = argparse.ArgumentParser(prog="python -m bench.threads", description=DESCRIPTION)
    parser.add_argument("--shapes", type=parse_shapes, default=None, help=f"NxC,... (default {THREADS_REPORT_SHAPES})")
    parser.add_argument("--threads", type=_counts, default=None, help=f"counts (default {THREADS_REPORT_COUNTS})")
    parser.add_argument("--repeats", type=int, default=100, help="timed rounds per shape (default 100)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed rounds per shape (default 10)")
    parser.add_argument("--math-kernel", choices=MATH_KERNELS, default="auto", help="server_math's kernel=")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    tuned = _tune_malloc_as_the_client()
    info = machine.describe("cpu")
    print(machine.header(info))
    print(f"{args.repeats} interleaved rounds per shape after {args.warmup} warm-up rounds; malloc: {tuned}")
    rows = run(
        shapes=args.shapes, counts=args.threads, repeats=args.repeats, warmup=args.warmup, math_kernel=args.math_kernel
    )
    print(format_report(rows))
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"machine": info, "math_kernel": args.math_kernel, "results": rows}, file, indent=2)
            file.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
