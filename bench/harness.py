"""One interleaved run over shapes x paths; prints the table, optionally writes JSON.

    python -m bench [--shapes 64x100,256x1000,1024x1000] [--repeats 60] [--paths a,b,...]
                    [--json FILE] [--quick] [--device cpu|cuda]

For each shape every path is set up, warmed up, then timed round-robin: each round
runs every path once, in an order rotated from round to round, so drift (thermal,
other tenants, the allocator) hits all paths alike. The figure is the median over
rounds. Ratios are to torch's ``F.cross_entropy(z, y, label_smoothing=0.1)``
forward+backward and to the autograd OLS module (bench/baseline.py), both float32,
same shape, same run. The remote paths talk to a ``lossd serve --store memory``
child process over TCP loopback.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bench import machine
from bench.paths import PATHS, REMOTE, Context, Step, Unavailable
from bench.server import ServerProcess

DEFAULT_SHAPES = "64x100,256x1000,1024x1000"
DEFAULT_PATHS = "torch_ls,autograd_ols,server_math,remote_f32,remote_bf16,remote_shm,cached"
QUICK_SHAPES = "16x10"


@dataclass(frozen=True)
class Target:
    """One of issue 5's targets, as a check on the table."""

    name: str
    path: str
    reference: str  # a path name
    kind: str  # "ratio": path / reference <= bound; "added_ms": path - reference <= bound
    bound: float
    shapes: tuple[tuple[int, int], ...] | None  # None: every shape with C >= 1000


TARGETS = (
    Target("1 server math", "server_math", "autograd_ols", "ratio", 0.5, ((256, 1000), (1024, 1000))),
    Target("2 remote float32 wire", "remote_f32", "autograd_ols", "ratio", 1.0, None),
    Target("2 remote bfloat16 wire", "remote_bf16", "autograd_ols", "ratio", 0.7, None),
    Target("3 shared memory vs OLS", "remote_shm", "autograd_ols", "ratio", 0.5, None),
    Target("3 shared memory vs torch LS", "remote_shm", "torch_ls", "ratio", 1.5, None),
    Target("4 epoch-cached vs torch LS", "cached", "torch_ls", "ratio", 1.2, None),
    Target("5 tiny shape, added ms (float32 wire)", "remote_f32", "autograd_ols", "added_ms", 0.25, ((64, 100),)),
    Target("5 tiny shape, added ms (bfloat16 wire)", "remote_bf16", "autograd_ols", "added_ms", 0.25, ((64, 100),)),
    Target("5 tiny shape, added ms (shared memory)", "remote_shm", "autograd_ols", "added_ms", 0.25, ((64, 100),)),
    Target("5 tiny shape, added ms (epoch-cached)", "cached", "autograd_ols", "added_ms", 0.25, ((64, 100),)),
)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        n, _, c = item.strip().lower().partition("x")
        if not n.isdigit() or not c.isdigit() or int(n) < 1 or int(c) < 2:
            raise argparse.ArgumentTypeError(f"a shape is NxC with N >= 1 and C >= 2, got {item!r}")
        shapes.append((int(n), int(c)))
    return shapes


def parse_paths(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PATHS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown path(s) {unknown}; known: {', '.join(PATHS)}")
    return names


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=parse_shapes, default=None, help=f"NxC,... (default {DEFAULT_SHAPES})")
    parser.add_argument("--paths", type=parse_paths, default=None, help=f"default: {DEFAULT_PATHS}")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per shape (default 60; quick 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds per shape (default 10; quick 2)")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: shapes {QUICK_SHAPES}, 5 rounds")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--device", default="cpu", help="where the local paths and the server compute (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in this process (default 1)")
    parser.add_argument("--server-threads", type=int, default=1, help="the server's --torch-threads (default 1)")
    parser.add_argument(
        "--server-budget", type=int, metavar="BYTES", help="the server's --matrix-memory-bytes (default: its default)"
    )
    parser.add_argument("--shm-kwargs", type=json.loads, help="OnlineLabelSmoothing kwargs for remote_shm (JSON)")
    parser.add_argument(
        "--stream-kwargs", type=json.loads, help="OnlineLabelSmoothing kwargs for remote_f32/bf16 (JSON)"
    )
    parser.add_argument("--cached-kwargs", type=json.loads, help="OnlineLabelSmoothing kwargs for cached (JSON)")
    parser.add_argument(
        "--compile-math",
        action="store_true",
        help="torch.compile the loss math: server_math, the server (--compile-math) and the cached path",
    )
    parser.add_argument(
        "--inline-math-bytes",
        type=int,
        default=0,
        metavar="BYTES",
        help="the server's --inline-math-bytes: stream requests up to BYTES of logits computed on its event loop",
    )
    parser.add_argument("--list", action="store_true", help="list the paths and exit")
    return parser


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_shape(
    ctx: Context, n: int, c: int, names: Sequence[str], repeats: int, warmup: int
) -> dict[str, dict[str, Any]]:
    """{path: {"median_ms", "samples"} or {"unavailable": reason}} for one shape, timed interleaved."""
    results: dict[str, dict[str, Any]] = {}
    steps: dict[str, Step] = {}
    try:
        for name in names:
            try:
                steps[name] = PATHS[name].make(ctx, n, c)
            except Unavailable as reason:
                results[name] = {"unavailable": str(reason)}
            except Exception as error:  # e.g. a shape the path cannot take; the other paths still run
                results[name] = {"unavailable": f"failed to set up: {type(error).__name__}: {error}"[:300]}
        order = list(steps)
        times: dict[str, list[float]] = {name: [] for name in order}
        for round_ in range(warmup + repeats):
            shift = round_ % max(len(order), 1)
            for name in order[shift:] + order[:shift]:
                if name in results:
                    continue  # failed in an earlier round
                run = steps[name].run
                _sync(ctx.device)
                start = time.perf_counter()
                try:
                    run()
                except Exception as error:
                    results[name] = {"unavailable": f"failed: {type(error).__name__}: {error}"[:300]}
                    continue
                _sync(ctx.device)
                elapsed = time.perf_counter() - start
                if round_ >= warmup:
                    times[name].append(elapsed * 1e3)
        for name in order:
            if name in results:
                continue
            samples = times[name]
            made = steps[name]
            results[name] = {
                "kwargs": made.kwargs,
                **({"note": made.note()} if made.note else {}),
                "median_ms": statistics.median(samples),
                "p10_ms": _quantile(samples, 0.1),
                "p90_ms": _quantile(samples, 0.9),
                "samples": len(samples),
            }
    finally:
        for made in steps.values():
            made.close()
    return {name: results[name] for name in names}


def _quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def add_ratios(rows: list[dict[str, Any]]) -> None:
    by_shape: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_shape.setdefault((row["n"], row["c"]), {})[row["path"]] = row
    for row in rows:
        same = by_shape[(row["n"], row["c"])]
        for key, reference in (("ratio_torch_ls", "torch_ls"), ("ratio_autograd_ols", "autograd_ols")):
            ref = same.get(reference, {}).get("median_ms")
            row[key] = row["median_ms"] / ref if ref and "median_ms" in row else None


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    medians = {(row["n"], row["c"], row["path"]): row.get("median_ms") for row in rows}
    shapes = sorted({(row["n"], row["c"]) for row in rows})
    checks: list[dict[str, Any]] = []
    for target in TARGETS:
        applicable = target.shapes if target.shapes is not None else tuple(s for s in shapes if s[1] >= 1000)
        for n, c in applicable:
            if (n, c) not in shapes:
                continue
            value, ref = medians.get((n, c, target.path)), medians.get((n, c, target.reference))
            if value is None or ref is None:
                checks.append({"target": target.name, "shape": f"{n}x{c}", "value": None, "met": None})
                continue
            measured = value / ref if target.kind == "ratio" else value - ref
            checks.append(
                {
                    "target": target.name,
                    "shape": f"{n}x{c}",
                    "kind": target.kind,
                    "path": target.path,
                    "reference": target.reference,
                    "value": measured,
                    "bound": target.bound,
                    "met": measured <= target.bound,
                }
            )
    return checks


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'shape':>10}  {'path':<13} {'median ms':>10} {'p10-p90 ms':>15} {'x torch LS':>10} {'x autograd OLS':>14}"
    ]
    previous = None
    for row in rows:
        shape = f"{row['n']}x{row['c']}"
        if previous is not None and shape != previous:
            lines.append("")
        previous = shape
        if "unavailable" in row:
            lines.append(f"{shape:>10}  {row['path']:<13} {'n/a':>10}  ({row['unavailable']})")
            continue
        spread = f"{row['p10_ms']:.3f}-{row['p90_ms']:.3f}"
        lines.append(
            f"{shape:>10}  {row['path']:<13} {row['median_ms']:10.3f} {spread:>15} "
            f"{_fmt(row['ratio_torch_ls'], '10.2f'):>10} {_fmt(row['ratio_autograd_ols'], '14.2f'):>14}"
        )
    return "\n".join(lines)


def format_targets(checks: list[dict[str, Any]]) -> str:
    lines = []
    for check in checks:
        if check["value"] is None:
            lines.append(f"  {check['target']:<40} {check['shape']:>9}  not measured")
            continue
        unit = "x" if check["kind"] == "ratio" else " ms"
        verdict = "met" if check["met"] else "NOT met"
        lines.append(
            f"  {check['target']:<40} {check['shape']:>9}  {check['value']:7.3f}{unit} "
            f"(<= {check['bound']}{unit} {check['reference']})  {verdict}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        for path in PATHS.values():
            print(f"{path.name:<13} {path.description}")
        return 0
    shapes = args.shapes or parse_shapes(QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    names = args.paths or parse_paths(DEFAULT_PATHS)
    repeats = args.repeats or (5 if args.quick else 60)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 10)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    options = {}
    if args.shm_kwargs is not None:
        options["shm"] = dict(args.shm_kwargs)
    if args.stream_kwargs is not None:
        options["stream"] = dict(args.stream_kwargs)
    if args.cached_kwargs is not None:
        options["cached"] = dict(args.cached_kwargs)
    elif args.compile_math:
        options["cached"] = {"cached": True, "compile_math": True}
    info = machine.describe(str(device))
    print(machine.header(info))
    print(f"{repeats} interleaved rounds per shape after {warmup} warm-up rounds; median per path", flush=True)

    server = None
    if REMOTE.intersection(names):
        extra = ["--matrix-memory-bytes", str(args.server_budget)] if args.server_budget else []
        if args.compile_math:
            extra += ["--compile-math", "true"]
        if args.inline_math_bytes:
            extra += ["--inline-math-bytes", str(args.inline_math_bytes)]
        server = ServerProcess(torch_threads=args.server_threads, device=args.device, extra=extra)
        print(f"server: {' '.join(server.argv[1:])} (pid {server.pid}, {server.target})", flush=True)
    rows: list[dict[str, Any]] = []
    try:
        ctx = Context(
            device=device, target=server.target if server else None, options=options, compile_math=args.compile_math
        )
        for n, c in shapes:
            started = time.monotonic()
            for name, result in run_shape(ctx, n, c, names, repeats, warmup).items():
                rows.append({"shape": f"{n}x{c}", "n": n, "c": c, "path": name, **result})
            print(f"timed {n}x{c} in {time.monotonic() - started:.1f} s", flush=True)
    finally:
        if server is not None:
            server.stop()
    add_ratios(rows)
    checks = check_targets(rows)
    print()
    print(format_table(rows))
    used = {row["path"]: row["kwargs"] for row in rows if row.get("kwargs")}
    if used:
        print("client options: " + "; ".join(f"{name} {kwargs}" for name, kwargs in used.items()))
    for row in rows:
        if row.get("note"):
            print(f"note: {row['shape']} {row['path']}: {row['note']}")
    if checks:
        print("\nissue 5 targets (ratios of medians from this run):")
        print(format_targets(checks))
    if args.json:
        document = {
            "machine": info,
            "config": {"shapes": [f"{n}x{c}" for n, c in shapes], "paths": names, "repeats": repeats, "warmup": warmup},
            "paths": {name: PATHS[name].description for name in names},
            "results": rows,
            "targets": checks,
        }
        with open(args.json, "w") as file:
            json.dump(document, file, indent=2)
            file.write("\n")
    return 0
