"""The server's memory (issue 5, target 6): RSS per OLS session, RSS over 10,000 requests, the 32000-class refusal.

    python -m bench.memory [--requests 10000] [--json FILE] [--quick]

Starts ``lossd serve --store memory`` (default budget: matrix_memory_bytes 4 GiB) in a
child process and reads its VmRSS from /proc/PID/status:

1. per session: RSS before and after creating OLS sessions (one training request each,
   so the accumulator is touched) at C=1000 (several sessions, averaged) and C=10000,
   and after deleting them; the budget's figure is 12 C^2 + 8 C bytes a session;
2. flat: one C=1000 session, N=64 float32 training requests on the stream, RSS sampled
   along the way (first request vs last);
3. refusal: creating a 32000-class OLS session (12.3 GB of matrices) must fail with
   RESOURCE_EXHAUSTED while the server stays up and keeps serving.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

import lossd
from bench import machine
from bench.paths import batch
from bench.server import ServerProcess

MiB = 1 << 20


def _step(module: lossd.OnlineLabelSmoothing, logits: torch.Tensor, labels: torch.Tensor) -> None:
    logits.grad = None
    module(logits, labels).backward()


def per_session(server: ServerProcess, c: int, sessions: int) -> dict[str, Any]:
    before = server.rss_bytes()
    modules = [lossd.OnlineLabelSmoothing(0.5, c, target=server.target) for _ in range(sessions)]
    created = server.rss_bytes()
    logits, labels = batch(64, c, torch.device("cpu"))
    for module in modules:
        _step(module, logits, labels)
    stepped = server.rss_bytes()
    for module in modules:
        module.close()
    time.sleep(0.5)
    deleted = server.rss_bytes()
    return {
        "n_classes": c,
        "sessions": sessions,
        "budget_bytes_per_session": 12 * c * c + 8 * c,
        "rss_before_mib": before / MiB,
        "per_session_after_create_mib": (created - before) / sessions / MiB,
        "per_session_after_one_request_mib": (stepped - before) / sessions / MiB,
        "rss_after_delete_mib": deleted / MiB,
    }


def flat(server: ServerProcess, requests: int, c: int = 1000, n: int = 64) -> dict[str, Any]:
    logits, labels = batch(n, c, torch.device("cpu"))
    marks = sorted({1, 10, 100, *range(max(requests // 10, 1), requests + 1, max(requests // 10, 1)), requests})
    samples: list[tuple[int, float]] = []
    started = time.monotonic()
    with lossd.OnlineLabelSmoothing(0.5, c, target=server.target) as module:
        for i in range(1, requests + 1):
            _step(module, logits, labels)
            if i in marks:
                samples.append((i, server.rss_bytes() / MiB))
    elapsed = time.monotonic() - started
    by_request = dict(samples)
    settled = by_request.get(min(1000, requests), samples[0][1])
    return {
        "n": n,
        "n_classes": c,
        "requests": requests,
        "seconds": elapsed,
        "rss_mib": samples,
        "first_mib": samples[0][1],
        "last_mib": samples[-1][1],
        "growth_after_warmup_mib": samples[-1][1] - settled,
        "warmup_request": min(1000, requests),
    }


def refusal(server: ServerProcess, c: int = 32000) -> dict[str, Any]:
    before = server.rss_bytes()
    outcome = "created (NOT refused)"
    message = ""
    try:
        lossd.OnlineLabelSmoothing(0.5, c, target=server.target).close()
    except lossd.ResourceExhaustedError as error:
        outcome, message = "RESOURCE_EXHAUSTED", str(error)
    except lossd.LossdError as error:
        outcome, message = type(error).__name__, str(error)
    alive = server.process.poll() is None
    serves = False
    if alive:
        logits, labels = batch(8, 10, torch.device("cpu"))
        with lossd.OnlineLabelSmoothing(0.5, 10, target=server.target) as module:
            _step(module, logits, labels)
            serves = True
    return {
        "n_classes": c,
        "matrix_bytes": 12 * c * c + 8 * c,
        "outcome": outcome,
        "message": message,
        "server_alive": alive,
        "server_serves_after": serves,
        "rss_before_mib": before / MiB,
        "rss_after_mib": server.rss_bytes() / MiB,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000, help="requests in the flat-RSS run (default 10000)")
    parser.add_argument("--quick", action="store_true", help="C=100/1000 sessions and 200 requests: a smoke run")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    info = machine.describe()
    print(machine.header(info))
    sizes = [(100, 4), (1000, 2)] if args.quick else [(1000, 8), (10000, 1)]
    requests = 200 if args.quick else args.requests
    with ServerProcess(store="memory") as server:
        print(f"server: {' '.join(server.argv[1:])} (pid {server.pid}); default budget")
        # Warm the server's code paths (imports, first-request allocations) before measuring.
        warm_logits, warm_labels = batch(64, 1000, torch.device("cpu"))
        with lossd.OnlineLabelSmoothing(0.5, 1000, target=server.target) as module:
            for _ in range(20):
                _step(module, warm_logits, warm_labels)
        time.sleep(0.5)
        report: dict[str, Any] = {"machine": info, "rss_idle_mib": server.rss_bytes() / MiB}
        print(f"\nserver RSS after warm-up: {report['rss_idle_mib']:.1f} MiB")
        report["sessions"] = [per_session(server, c, k) for c, k in sizes]
        print(f"\n{'C':>6} {'sessions':>8} {'budget MiB':>10} {'RSS/session created':>20} {'after 1 request':>16}")
        for row in report["sessions"]:
            print(
                f"{row['n_classes']:>6} {row['sessions']:>8} {row['budget_bytes_per_session'] / MiB:10.1f} "
                f"{row['per_session_after_create_mib']:17.1f} MiB {row['per_session_after_one_request_mib']:12.1f} MiB"
                f"   (RSS after delete {row['rss_after_delete_mib']:.1f} MiB)"
            )
        report["flat"] = flat(server, requests)
        f = report["flat"]
        print(f"\n{requests} requests of {f['n']}x{f['n_classes']} float32 on one OLS session ({f['seconds']:.1f} s):")
        print("  " + ", ".join(f"#{i}: {rss:.1f}" for i, rss in f["rss_mib"]) + " MiB")
        print(
            f"  first {f['first_mib']:.1f} MiB, last {f['last_mib']:.1f} MiB; "
            f"growth after request {f['warmup_request']}: {f['growth_after_warmup_mib']:+.1f} MiB"
        )
        report["refusal"] = refusal(server)
        r = report["refusal"]
        print(
            f"\n32000-class OLS session ({r['matrix_bytes'] / 2**30:.1f} GiB of matrices) under the default budget: "
            f"{r['outcome']}; server alive {r['server_alive']}, serves after {r['server_serves_after']}, "
            f"RSS {r['rss_before_mib']:.1f} -> {r['rss_after_mib']:.1f} MiB"
        )
        if r["message"]:
            print(f"  {r['message']}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(report, file, indent=2)
            file.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
