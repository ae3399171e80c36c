"""The bare gRPC bytes echo served by ``grpc.aio`` vs a sync ``grpc.server(ThreadPoolExecutor)``.

    python -m bench.grpc_servers [--sizes 64x100,256x1000,1024x1000] [--dtype float32]
                                 [--rounds 200] [--warmup 20] [--workers 4] [--bdp-probe]
                                 [--no-tune-malloc] [--json FILE]

Two children, ``python -m bench.echo_server --kind aio`` and ``--kind sync`` (lossd serve's
server options), and one client process with one open stream to each per payload size
(bench.echo_server.EchoStream). A payload NxC is a lossd training step's: a request of the
logits in ``--dtype`` plus int64 labels, and a gradient-sized response. Round trips alternate
between the two servers (the order flips every round) so drift hits both alike; the table gives
the median round trip per server kind and the ratio sync / aio. It decides which server kind
lossd keeps for the LossStream: the floor of the gRPC transport is what the kind adds per step.
Both servers and this client tune glibc malloc as lossd's server and client do, unless
``--no-tune-malloc``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from bench import machine
from bench.echo_server import KINDS, EchoServerProcess, EchoStream, tune_malloc
from bench.harness import parse_shapes
from bench.paths import wire_bytes

DEFAULT_SIZES = "64x100,256x1000,1024x1000"


def _quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(targets: dict[str, str], n: int, c: int, dtype: torch.dtype, rounds: int, warmup: int) -> dict[str, Any]:
    """Interleaved round trips of one payload size against each server kind."""
    request, response = wire_bytes(n, c, dtype)
    streams = {kind: EchoStream(target, request, response) for kind, target in targets.items()}
    times: dict[str, list[float]] = {kind: [] for kind in streams}
    try:
        order = list(streams)
        for round_ in range(warmup + rounds):
            for kind in order if round_ % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                streams[kind].round_trip()
                elapsed = time.perf_counter() - start
                if round_ >= warmup:
                    times[kind].append(elapsed * 1e3)
    finally:
        for stream in streams.values():
            stream.close()
    row: dict[str, Any] = {"size": f"{n}x{c}", "request_bytes": request, "response_bytes": response}
    for kind, samples in times.items():
        row[kind] = {
            "median_ms": statistics.median(samples),
            "p10_ms": _quantile(samples, 0.1),
            "p90_ms": _quantile(samples, 0.9),
            "samples": len(samples),
        }
    row["sync_over_aio"] = row["sync"]["median_ms"] / row["aio"]["median_ms"]
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'payload':>10} {'request B':>10} {'response B':>10}  "
        f"{'aio ms':>8} {'p10-p90':>14}  {'sync ms':>8} {'p10-p90':>14}  {'sync/aio':>8}"
    ]
    for row in rows:
        cells = []
        for kind in KINDS:
            stats = row[kind]
            cells.append(f"{stats['median_ms']:8.3f} {stats['p10_ms']:6.3f}-{stats['p90_ms']:<7.3f}")
        lines.append(
            f"{row['size']:>10} {row['request_bytes']:>10} {row['response_bytes']:>10}  "
            f"{cells[0]}  {cells[1]}  {row['sync_over_aio']:8.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc_servers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=parse_shapes, default=None, help=f"NxC payloads (default {DEFAULT_SIZES})")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="wire dtype")
    parser.add_argument("--rounds", type=int, default=200, help="timed round trips per server kind and size")
    parser.add_argument("--warmup", type=int, default=20, help="untimed round trips per server kind and size")
    parser.add_argument("--workers", type=int, default=4, help="the sync server's thread pool (default 4)")
    parser.add_argument("--bdp-probe", action="store_true", help="turn BDP probing on in both servers (lossd: off)")
    parser.add_argument("--no-tune-malloc", action="store_true", help="leave glibc malloc as it is, here and there")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    sizes = args.sizes or parse_shapes(DEFAULT_SIZES)
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(1)  # the client does no math; one thread a process, as the harness
    if not args.no_tune_malloc:
        tune_malloc()  # as a lossd Client does in its process
    info = machine.describe("cpu")
    print(machine.header(info))
    servers: dict[str, EchoServerProcess] = {}
    try:
        for kind in KINDS:
            servers[kind] = EchoServerProcess(
                kind, workers=args.workers, bdp_probe=args.bdp_probe, tune_malloc=not args.no_tune_malloc
            )
            print(f"{kind} echo: {' '.join(servers[kind].argv[1:])} (pid {servers[kind].pid})", flush=True)
        targets = {kind: server.target for kind, server in servers.items()}
        print(f"{args.rounds} interleaved round trips per kind and size after {args.warmup} warm-up ones, {args.dtype}")
        rows = [measure(targets, n, c, dtype, args.rounds, args.warmup) for n, c in sizes]
    finally:
        for server in servers.values():
            server.stop()
    print()
    print(format_table(rows))
    if args.json:
        config = {"sizes": [row["size"] for row in rows], "dtype": args.dtype, "rounds": args.rounds}
        config |= {"warmup": args.warmup, "workers": args.workers, "bdp_probe": args.bdp_probe}
        config |= {"tune_malloc": not args.no_tune_malloc}
        with open(args.json, "w") as file:
            json.dump({"machine": info, "config": config, "results": rows}, file, indent=2)
            file.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
