"""One interleaved run over shapes x paths; prints the table and issues 13's and 14's targets, optionally JSON.

    python -m bench [--shapes 64x100,256x1000,1024x1000] [--repeats 60] [--paths a,b,...]
                    [--per-byte-shapes 1024x32000] [--per-byte-repeats 25]
                    [--math-kernel auto|fused|eager] [--threads-report]
                    [--json FILE] [--quick] [--device cpu|cuda]

For each shape every path is set up, warmed up, then timed round-robin: each round
runs every path once, in an order rotated from round to round, so drift (thermal,
other tenants, the allocator) hits all paths alike. The figure is the median over
rounds. Ratios are to torch's ``F.cross_entropy(z, y, label_smoothing=0.1)``
forward+backward and to the reference OLS module (ankandrew/online-label-smoothing-pt,
re-implemented step for step in bench/baseline.py), both float32, same shape, same run.
The remote paths talk to a ``lossd serve --store memory`` child process: ``remote_local``
with ``transport="local"`` (a same-host Unix socket and a sealed memfd segment),
``remote_f32`` / ``remote_bf16`` with ``transport="grpc"`` (the LossStream over TCP
loopback). ``grpc_echo`` is the floor of the latter: a bare gRPC bytes echo in another
child (bench/echo_server.py) on one open stream, sending a step's request bytes (logits
in the wire dtype and int64 labels) and receiving a gradient's bytes, nothing else.

``--math-kernel`` (default auto) picks the loss math's code everywhere the harness computes it:
``server_math`` and ``ls_server_math`` (``kernel=``), the ``lossd serve`` child (``--math-kernel``)
and the ``cached`` path (``math_kernel=``): ``fused`` is one kernel (numba on the CPU, Triton on
CUDA), ``eager`` the torch ops, ``auto`` the fused kernel where it loads. ``server_math`` is what the
server computes per OLS training request: ``online_label_smoothing(..., kernel=)`` then
``add_statistics``; ``server_math_eager`` is the same with ``kernel="eager"`` whatever the option says.

Two sections. The OLS paths run on ``--shapes``. The per-byte paths (``ls_server_math``,
``remote_ls_bf16``, ``grpc_echo_bf16``) run on ``--per-byte-shapes`` (default 1024x32000,
with ``--per-byte-repeats`` rounds, default 25, after 3 warm-up rounds): at C = 32000 an
OLS session's C x C float32 + float64 state is 12 GB, more than this machine holds, so the
per-byte check at that size uses label smoothing (``lossd.LabelSmoothingLoss``, bfloat16
logits on the wire, no C x C state), with its in-process math (the server's
``smoothed_cross_entropy`` on the decoded bfloat16 logits) as the "server math" that the
transport is measured over. ``--paths`` selects from both sections; ``--per-byte-shapes
none`` skips the second, and ``--quick`` (shape 16x10, 5 rounds) does not run it. The server
math paths compute loss and gradient in float32 and stop there: the server's cast of the
gradient to the wire dtype is counted as transport, as it is work the echo does not do.
``--threads-report`` adds, after the run, ``server_math`` against ``torch_ls`` at 1 and 2 torch
threads in this process (bench/threads.py, also ``python -m bench.threads``).

This process tunes glibc malloc as the first lossd Client would (``LOSSD_TUNE_MALLOC=false``
leaves it), so every path runs under the same allocator whichever paths are selected; lossd
serve and the echo child tune theirs. The default run takes one to two minutes on 2 cores.

Targets (issue 13), each on its shapes:

- local transport added ms: remote_local - server_math <= 0.10 ms at 256x1000, <= 0.05 ms at 64x100;
- local transport vs reference: remote_local / reference_ols <= 0.6 at 256x1000;
- gRPC f32 / bf16 vs reference: remote_f32 / reference_ols <= 1.0, remote_bf16 / reference_ols <= 0.7
  at 256x1000;
- gRPC per-byte: (remote - its server math) <= 2 x the echo of the same bytes, at 1024x1000 float32
  (remote_f32, server_math, grpc_echo) and 1024x32000 bfloat16 (remote_ls_bf16, ls_server_math,
  grpc_echo_bf16).

Targets (issue 14, the fused kernel), CPU (``--device cpu``), one torch thread (``--threads 1``, the
default):

- CPU server math vs torch LS: server_math / torch_ls <= 1.0 at 256x1000 and 1024x1000; the stretch
  bound, <= 0.7 on the same shapes, is a line of its own;
- cached step vs torch LS: cached / torch_ls <= 1.1 at 256x1000 and 1024x1000;
- cached step added ms: cached - torch_ls <= 0.05 ms at 64x100.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bench import machine, threads
from bench.echo_server import KINDS, EchoServerProcess
from bench.paths import ECHO, PATHS, REMOTE, Context, Step, Unavailable
from bench.server import ServerProcess
from bench.threads import THREADS_REPORT_COUNTS, THREADS_REPORT_SHAPES
from lossd._kernels import MATH_KERNELS

DEFAULT_SHAPES = "64x100,256x1000,1024x1000"
DEFAULT_PER_BYTE_SHAPES = "1024x32000"
DEFAULT_PATHS = ",".join(PATHS)
QUICK_SHAPES = "16x10"
PER_BYTE_WARMUP = 3
ISSUE_14_SHAPES = ((256, 1000), (1024, 1000))
ISSUE_14: dict[str, Any] = {"issue": 14, "devices": ("cpu",)}


@dataclass(frozen=True)
class Target:
    """One of an issue's targets (13: the data plane; 14: the fused kernel), as a check on the table.

    ``kind``: "ratio": path / reference <= bound; "added_ms": path - reference <= bound (ms);
    "added_ratio": (path - reference) / floor <= bound, e.g. what a remote path adds over its
    math against a bare echo of the same bytes.
    """

    name: str
    path: str
    reference: str  # a path name
    kind: str
    bound: float
    shapes: tuple[tuple[int, int], ...] | None  # None: every shape with C >= 1000
    floor: str | None = None  # the path "added_ratio" divides by
    issue: int = 13
    devices: tuple[str, ...] | None = None  # the --device kinds it applies to; None: any


TARGETS = (
    Target("local transport added ms", "remote_local", "server_math", "added_ms", 0.10, ((256, 1000),)),
    Target("local transport added ms", "remote_local", "server_math", "added_ms", 0.05, ((64, 100),)),
    Target("local transport vs reference", "remote_local", "reference_ols", "ratio", 0.6, ((256, 1000),)),
    Target("gRPC f32 vs reference", "remote_f32", "reference_ols", "ratio", 1.0, ((256, 1000),)),
    Target("gRPC bf16 vs reference", "remote_bf16", "reference_ols", "ratio", 0.7, ((256, 1000),)),
    Target(
        "gRPC per-byte (float32 wire)",
        "remote_f32",
        "server_math",
        "added_ratio",
        2.0,
        ((1024, 1000),),
        floor="grpc_echo",
    ),
    Target(
        "gRPC per-byte (bfloat16 wire, LS)",
        "remote_ls_bf16",
        "ls_server_math",
        "added_ratio",
        2.0,
        ((1024, 32000),),
        floor="grpc_echo_bf16",
    ),
    # Issue 14 (the fused kernel), CPU, one torch thread: the server's math and the cached step against
    # torch's LS CE. The stretch bound is a line of its own.
    Target("CPU server math vs torch LS", "server_math", "torch_ls", "ratio", 1.0, ISSUE_14_SHAPES, **ISSUE_14),
    Target(
        "CPU server math vs torch LS, stretch", "server_math", "torch_ls", "ratio", 0.7, ISSUE_14_SHAPES, **ISSUE_14
    ),
    Target("cached step vs torch LS", "cached", "torch_ls", "ratio", 1.1, ISSUE_14_SHAPES, **ISSUE_14),
    Target("cached step added ms over torch LS", "cached", "torch_ls", "added_ms", 0.05, ((64, 100),), **ISSUE_14),
)
ISSUES = {13: "issue 13 targets", 14: "issue 14 targets (CPU, one torch thread)"}


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        n, _, c = item.strip().lower().partition("x")
        if not n.isdigit() or not c.isdigit() or int(n) < 1 or int(c) < 2:
            raise argparse.ArgumentTypeError(f"a shape is NxC with N >= 1 and C >= 2, got {item!r}")
        shapes.append((int(n), int(c)))
    return shapes


def parse_optional_shapes(text: str) -> list[tuple[int, int]]:
    """Shapes, or none at all ("none" or "")."""
    return [] if text.strip().lower() in ("", "none") else parse_shapes(text)


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
    parser.add_argument(
        "--per-byte-shapes",
        type=parse_optional_shapes,
        default=None,
        help=f"shapes of the per-byte (label smoothing) paths, or none (default {DEFAULT_PER_BYTE_SHAPES}; quick none)",
    )
    parser.add_argument(
        "--per-byte-repeats",
        type=int,
        default=25,
        help=f"timed rounds per per-byte shape, after {PER_BYTE_WARMUP} warm-up rounds (default 25)",
    )
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: shapes {QUICK_SHAPES}, 5 rounds")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--device", default="cpu", help="where the local paths and the server compute (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in this process (default 1)")
    parser.add_argument("--server-threads", type=int, default=1, help="the server's --torch-threads (default 1)")
    parser.add_argument(
        "--server-budget", type=int, metavar="BYTES", help="the server's --matrix-memory-bytes (default: its default)"
    )
    parser.add_argument("--local-kwargs", type=json.loads, help="OnlineLabelSmoothing kwargs for remote_local (JSON)")
    parser.add_argument(
        "--stream-kwargs",
        type=json.loads,
        help="client kwargs for remote_f32/bf16 and remote_ls_bf16 (JSON; default transport='grpc')",
    )
    parser.add_argument("--cached-kwargs", type=json.loads, help="OnlineLabelSmoothing kwargs for cached (JSON)")
    parser.add_argument(
        "--echo-server", choices=KINDS, default="aio", help="the echo child's gRPC server kind (default aio)"
    )
    parser.add_argument(
        "--math-kernel",
        choices=MATH_KERNELS,
        default="auto",
        help="the loss math's kernel: server_math and ls_server_math (kernel=), the server (--math-kernel) and "
        "the cached path (math_kernel=); fused: numba on the CPU, Triton on CUDA (default auto)",
    )
    parser.add_argument(
        "--threads-report",
        action="store_true",
        help=f"after the run, server_math against torch_ls at {THREADS_REPORT_COUNTS} torch threads in this "
        f"process, at {THREADS_REPORT_SHAPES} (bench/threads.py; about 10 s)",
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


RATIOS = (("ratio_torch_ls", "torch_ls"), ("ratio_reference_ols", "reference_ols"))


def add_ratios(rows: list[dict[str, Any]]) -> None:
    by_shape: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_shape.setdefault((row["n"], row["c"]), {})[row["path"]] = row
    for row in rows:
        same = by_shape[(row["n"], row["c"])]
        for key, reference in RATIOS:
            ref = same.get(reference, {}).get("median_ms")
            row[key] = row["median_ms"] / ref if ref and "median_ms" in row else None


def _measure(target: Target, value: float, ref: float, floor: float | None) -> float | None:
    if target.kind == "ratio":
        return value / ref
    if target.kind == "added_ms":
        return value - ref
    if target.kind == "added_ratio":
        return None if not floor else (value - ref) / floor
    raise ValueError(f"unknown target kind {target.kind!r}")


def check_targets(rows: list[dict[str, Any]], device: str = "cpu") -> list[dict[str, Any]]:
    """The targets that apply to the rows' shapes (and to ``device``), each from the medians of this run."""
    medians = {(row["n"], row["c"], row["path"]): row.get("median_ms") for row in rows}
    shapes = sorted({(row["n"], row["c"]) for row in rows})
    checks: list[dict[str, Any]] = []
    for target in TARGETS:
        if target.devices is not None and torch.device(device).type not in target.devices:
            continue
        applicable = target.shapes if target.shapes is not None else tuple(s for s in shapes if s[1] >= 1000)
        for n, c in applicable:
            if (n, c) not in shapes:
                continue
            value, ref = medians.get((n, c, target.path)), medians.get((n, c, target.reference))
            floor = medians.get((n, c, target.floor)) if target.floor else None
            measured = None if value is None or ref is None else _measure(target, value, ref, floor)
            check: dict[str, Any] = {
                "issue": target.issue,
                "target": target.name,
                "shape": f"{n}x{c}",
                "kind": target.kind,
                "path": target.path,
                "reference": target.reference,
                **({"floor": target.floor} if target.floor else {}),
                "value": measured,
                "bound": target.bound,
                "met": None if measured is None else measured <= target.bound,
            }
            checks.append(check)
    return checks


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


SECTION_TITLES = {
    "ols": "",
    "per_byte": "per-byte paths (label smoothing, bfloat16 wire: no C x C state at this C)",
}


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'shape':>10}  {'path':<15} {'median ms':>10} {'p10-p90 ms':>17} {'x torch LS':>10} {'x reference OLS':>15}"
    ]
    previous: tuple[str, str] | None = None
    for row in rows:
        shape, section = f"{row['n']}x{row['c']}", row.get("section", "ols")
        if previous is not None and (shape, section) != previous:
            lines.append("")
        if section != (previous[1] if previous else "ols") and SECTION_TITLES.get(section):
            lines.append(SECTION_TITLES[section] + ":")
        previous = (shape, section)
        if "unavailable" in row:
            lines.append(f"{shape:>10}  {row['path']:<15} {'n/a':>10}  ({row['unavailable']})")
            continue
        spread = f"{row['p10_ms']:.3f}-{row['p90_ms']:.3f}"
        lines.append(
            f"{shape:>10}  {row['path']:<15} {row['median_ms']:10.3f} {spread:>17} "
            f"{_fmt(row['ratio_torch_ls'], '10.2f'):>10} {_fmt(row['ratio_reference_ols'], '15.2f'):>15}"
        )
    return "\n".join(lines)


def _describe_bound(check: dict[str, Any]) -> str:
    if check["kind"] == "ratio":
        return f"{check['value']:7.3f}x  (<= {check['bound']}x {check['reference']})"
    if check["kind"] == "added_ms":
        return f"{check['value']:7.3f} ms (<= {check['bound']} ms over {check['reference']})"
    return f"{check['value']:7.3f}x  ({check['path']} - {check['reference']} <= {check['bound']}x {check['floor']})"


def format_targets(checks: list[dict[str, Any]]) -> str:
    lines = []
    for check in checks:
        if check["value"] is None:
            lines.append(f"  {check['target']:<38} {check['shape']:>10}  not measured")
            continue
        verdict = "met" if check["met"] else "NOT met"
        lines.append(f"  {check['target']:<38} {check['shape']:>10}  {_describe_bound(check)}  {verdict}")
    return "\n".join(lines)


def _tune_malloc_as_the_client() -> str:
    """Apply the lossd client's glibc malloc tuning to this process (it honours LOSSD_TUNE_MALLOC)."""
    try:
        from lossd._malloc import tune_client_once
    except ImportError:
        return "as it is (this lossd client does not tune it)"
    tune_client_once()
    if os.environ.get("LOSSD_TUNE_MALLOC", "true").strip().lower() in ("0", "false", "no", "off"):
        return "as it is (LOSSD_TUNE_MALLOC)"
    return "tuned as lossd's client and server tune it (LOSSD_TUNE_MALLOC=false: as it is)"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        for path in PATHS.values():
            section = "  [per-byte]" if path.per_byte else ""
            print(f"{path.name:<15} {path.description}{section}")
        return 0
    shapes = args.shapes if args.shapes is not None else parse_shapes(QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    if args.per_byte_shapes is not None:
        per_byte_shapes = args.per_byte_shapes
    else:
        per_byte_shapes = [] if args.quick else parse_shapes(DEFAULT_PER_BYTE_SHAPES)
    names = args.paths or parse_paths(DEFAULT_PATHS)
    ols_names = [name for name in names if not PATHS[name].per_byte] if shapes else []
    per_byte_names = [name for name in names if PATHS[name].per_byte] if per_byte_shapes else []
    repeats = args.repeats or (5 if args.quick else 60)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 10)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    # What the first lossd Client does to this process anyway: tuned up front, every path (local ones
    # in a run without remote paths too) runs under the same allocator settings.
    tuned = _tune_malloc_as_the_client()
    options = {}
    for kind, given in (("local", args.local_kwargs), ("stream", args.stream_kwargs)):
        if given is not None:
            options[kind] = dict(given)
    if args.cached_kwargs is not None:
        options["cached"] = dict(args.cached_kwargs)
    info = machine.describe(str(device))
    print(machine.header(info))
    print(f"{repeats} interleaved rounds per shape after {warmup} warm-up rounds; median per path", flush=True)
    print(f"malloc: {tuned}", flush=True)
    if per_byte_names:
        print(f"per-byte shapes: {args.per_byte_repeats} rounds after {PER_BYTE_WARMUP} warm-up rounds", flush=True)

    running = set(ols_names) | set(per_byte_names)
    server = echo = None
    rows: list[dict[str, Any]] = []
    try:
        if REMOTE.intersection(running):
            extra = ["--matrix-memory-bytes", str(args.server_budget)] if args.server_budget else []
            extra += ["--math-kernel", args.math_kernel]
            if args.inline_math_bytes:
                extra += ["--inline-math-bytes", str(args.inline_math_bytes)]
            server = ServerProcess(torch_threads=args.server_threads, device=args.device, extra=extra)
            print(f"server: {' '.join(server.argv[1:])} (pid {server.pid}, {server.target})", flush=True)
        if ECHO.intersection(running):
            echo = EchoServerProcess(args.echo_server)
            print(f"echo server: {' '.join(echo.argv[1:])} (pid {echo.pid}, {echo.target})", flush=True)
        ctx = Context(
            device=device,
            target=server.target if server else None,
            options=options,
            math_kernel=args.math_kernel,
            echo_target=echo.target if echo else None,
        )
        sections = [("ols", shapes, ols_names, repeats, warmup)]
        sections.append(("per_byte", per_byte_shapes, per_byte_names, args.per_byte_repeats, PER_BYTE_WARMUP))
        for section, section_shapes, section_names, section_repeats, section_warmup in sections:
            if not section_names:
                continue
            for n, c in section_shapes:
                started = time.monotonic()
                results = run_shape(ctx, n, c, section_names, section_repeats, section_warmup)
                for name, result in results.items():
                    rows.append({"shape": f"{n}x{c}", "n": n, "c": c, "path": name, "section": section, **result})
                print(f"timed {n}x{c} in {time.monotonic() - started:.1f} s", flush=True)
    finally:
        for child in (server, echo):
            if child is None:
                continue
            if child.process.poll() is not None:  # died during the run: say why, its paths say "failed"
                tail = "".join(child.lines[-15:])
                print(f"{child.name} exited early with status {child.process.returncode}; its last lines:\n{tail}")
            child.stop()
    add_ratios(rows)
    checks = check_targets(rows, args.device)
    print()
    print(format_table(rows))
    used = {row["path"]: row["kwargs"] for row in rows if row.get("kwargs")}
    if used:
        print("client options: " + "; ".join(f"{name} {kwargs}" for name, kwargs in used.items()))
    for row in rows:
        if row.get("note"):
            print(f"note: {row['shape']} {row['path']}: {row['note']}")
    for issue, title in ISSUES.items():
        issue_checks = [check for check in checks if check["issue"] == issue]
        if issue_checks:
            print(f"\n{title} (from the medians of this run):")
            if issue == 14 and args.threads != 1:
                print(f"  (this run used --threads {args.threads}: the bounds are for one thread)")
            print(format_targets(issue_checks))
    threads_rows: list[dict[str, Any]] = []
    if args.threads_report:
        print(f"\nthreads report ({threads.DESCRIPTION}):", flush=True)
        threads_rows = threads.run(math_kernel=args.math_kernel)
        print(threads.format_report(threads_rows))
        torch.set_num_threads(args.threads)
    if args.json:
        document = {
            "machine": info,
            "config": {
                "shapes": [f"{n}x{c}" for n, c in shapes],
                "per_byte_shapes": [f"{n}x{c}" for n, c in per_byte_shapes],
                "paths": names,
                "repeats": repeats,
                "warmup": warmup,
                "per_byte_repeats": args.per_byte_repeats,
                "per_byte_warmup": PER_BYTE_WARMUP,
                "echo_server": args.echo_server,
                "math_kernel": args.math_kernel,
                "threads": args.threads,
                "server_threads": args.server_threads,
            },
            "paths": {name: PATHS[name].description for name in names},
            "results": rows,
            "targets": checks,
            **({"threads_report": threads_rows} if args.threads_report else {}),
        }
        with open(args.json, "w") as file:
            json.dump(document, file, indent=2)
            file.write("\n")
    return 0
