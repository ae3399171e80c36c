"""Per-step time of the epoch-cached OLS module against the remote one and torch's label-smoothing CE.

    python bench/cached_step.py [--batch 256] [--classes 1000] [--repeats 300] [--threads 1]

One forward+backward per step, float32 logits on the CPU, the three paths
interleaved step by step (rotating which goes first) so that they share the
machine's noise. The remote and cached modules talk to a `lossd serve` child
process over TCP loopback; the cached one runs with its default upload
settings (its statistics go to the server in the background every 100 steps)
and trains, so every step also accumulates its statistics.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import lossd


def start_server(threads: int) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "lossd_server", "serve", "--port", "0", "--device", "cpu"]
    command += ["--torch-threads", str(threads), "--store", "memory", "--state-dir", tempfile.mkdtemp()]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert server.stderr is not None
    for _ in range(20):
        match = re.search(r"serving on (\S+) ", server.stderr.readline())
        if match:
            return server, match.group(1)
    server.kill()
    raise RuntimeError("the server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, here and in the server")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n, c = args.batch, args.classes
    server, target = start_server(args.threads)
    try:
        generator = torch.Generator().manual_seed(0)
        labels = torch.randint(0, c, (n,), generator=generator)
        # Mostly correct predictions, as late in training: the statistics path does real work.
        base = torch.randn(n, c, generator=generator) + 4.0 * F.one_hot(labels, c)
        remote = lossd.OnlineLabelSmoothing(0.5, c, target=target)
        cached = lossd.OnlineLabelSmoothing(0.5, c, target=target, cached=True)

        def torch_ls() -> None:
            logits = base.clone().requires_grad_()
            F.cross_entropy(logits, labels, label_smoothing=0.1).backward()  # type: ignore[no-untyped-call]

        def module_step(module: lossd.OnlineLabelSmoothing) -> Callable[[], None]:
            def run() -> None:
                logits = base.clone().requires_grad_()
                module(logits, labels).backward()

            return run

        paths: dict[str, Callable[[], None]] = {
            "torch F.cross_entropy(label_smoothing=0.1)": torch_ls,
            "lossd OLS cached": module_step(cached),
            "lossd OLS remote (stream, float32)": module_step(remote),
        }
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(10):  # warm-up, and the cached module's one fetch of S
            for run in paths.values():
                run()
        names = list(paths)
        for i in range(args.repeats):
            for name in names[i % 3 :] + names[: i % 3]:
                start = time.perf_counter()
                paths[name]()
                times[name].append(time.perf_counter() - start)
        cached.flush()
        medians = {name: statistics.median(values) * 1e3 for name, values in times.items()}
        reference = medians[names[0]]
        print(f"{n}x{c} float32, CPU, torch threads {args.threads}, {args.repeats} interleaved steps per path")
        print(f"{'path':<44} {'median ms':>10} {'p90 ms':>8} {'x torch LS':>11}")
        for name, values in times.items():
            p90 = statistics.quantiles(values, n=10)[-1] * 1e3
            print(f"{name:<44} {medians[name]:>10.3f} {p90:>8.3f} {medians[name] / reference:>11.2f}")
        remote.close()
        cached.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
