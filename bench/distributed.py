"""Aggregate throughput of 1, 2 and 4 concurrent workers training on one shared OLS session.

    python bench/distributed.py [--n 256] [--c 1000] [--steps 200] [--rounds 3]

Starts `lossd serve` in a child process and, for each worker count W, W worker
processes (RANK / WORLD_SIZE set as torchrun would) that each run forward+backward
of ``lossd.OnlineLabelSmoothing`` on the bidirectional stream, all on one session
with world_size=W, then meet in next_epoch. Workers start together after a warm-up;
aggregate samples/s = all samples / (last finish - first start). The worker counts
are interleaved over ``--rounds`` and the median is reported. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import torch


def worker(target: str, session: str, n: int, c: int, steps: int) -> None:
    import lossd  # imported here so the parent starts fast

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(int(os.environ["RANK"]))
    labels = torch.randint(0, c, (n,), generator=generator)
    logits = (torch.randn(n, c, generator=generator) + 3 * torch.nn.functional.one_hot(labels, c)).requires_grad_()
    with lossd.OnlineLabelSmoothing(0.5, c, 0.1, session=session, target=target) as criterion:
        for _ in range(10):  # warm-up: connection, stream, allocator
            criterion(logits, labels).backward()
        print("ready", flush=True)
        sys.stdin.readline()  # "go": every worker starts at once
        times = []
        start = time.time()
        for _ in range(steps):
            begin = time.perf_counter()
            criterion(logits, labels).backward()
            times.append(time.perf_counter() - begin)
        end = time.time()
        criterion.next_epoch()  # the barrier: returns once every worker is done
    print(json.dumps({"start": start, "end": end, "step_ms": statistics.median(times) * 1e3}), flush=True)


def run_workers(target: str, world_size: int, n: int, c: int, steps: int) -> tuple[float, float]:
    """(aggregate samples/s, median step ms across workers) for one round."""
    session = f"bench-{uuid.uuid4().hex[:8]}"
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", target, session, str(n), str(c), str(steps)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size)},
        )
        for rank in range(world_size)
    ]
    try:
        for process in workers:
            assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        for process in workers:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        reports = []
        for process in workers:
            assert process.stdout is not None
            reports.append(json.loads(process.stdout.readline()))
            if process.wait(timeout=60) != 0:
                raise RuntimeError("a worker failed")
    finally:
        for process in workers:
            process.kill()
    elapsed = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    return world_size * steps * n / elapsed, statistics.median(r["step_ms"] for r in reports)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--c", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    server = subprocess.Popen(
        # The default durable store, in a directory of its own so runs never share sessions.
        [
            *(sys.executable, "-m", "lossd_server", "serve", "--port", "0", "--torch-threads", "1"),
            *("--state-dir", tempfile.mkdtemp(prefix="lossd-bench-")),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert server.stderr is not None
    match = None
    for _ in range(20):  # the store logs what it loaded before the server says where it serves
        match = re.search(r"serving on (\S+) ", server.stderr.readline())
        if match:
            break
    assert match, "the server did not start"
    target = match.group(1)
    results: dict[int, list[tuple[float, float]]] = {w: [] for w in args.workers}
    try:
        for _ in range(args.rounds):
            for world_size in args.workers:
                results[world_size].append(run_workers(target, world_size, args.n, args.c, args.steps))
    finally:
        server.terminate()
        server.wait()
    cores = os.cpu_count()
    print(f"{args.n}x{args.c} float32, OLS forward+backward on the stream, one session; {cores} CPU cores")
    print(f"median of {args.rounds} interleaved rounds of {args.steps} steps per worker")
    print(f"{'workers':>7} {'samples/s':>10} {'vs 1 worker':>12} {'step ms':>8}")
    base = statistics.median(r[0] for r in results[args.workers[0]])
    for world_size in args.workers:
        rate = statistics.median(r[0] for r in results[world_size])
        step = statistics.median(r[1] for r in results[world_size])
        print(f"{world_size:>7} {rate:>10.0f} {rate / base:>11.2f}x {step:>8.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    else:
        main()
