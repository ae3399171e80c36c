"""Per-step time of the OLS module: inline bytes on the stream vs the same-host shared-memory transport.

    python bench/shm_step.py [--shape 256x1000] [--dtype float32] [--rounds 40] [--steps 20]

One ``lossd serve`` child on TCP loopback (client and server in separate processes,
one torch thread each). Rounds alternate the paths -- torch's label-smoothing CE, the
local autograd OLS module, lossd OLS inline, lossd OLS over shared memory -- so drift
hits them alike; each round times ``--steps`` forward+backward steps and the table
gives the median per-step time over the rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lossd
from bench.baseline import AutogradOLS
from bench.server import ServerProcess


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="256x1000")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    n, c = (int(x) for x in args.shape.split("x"))
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    logits = torch.randn(n, c, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, c, (n,))
    with ServerProcess() as server:
        target = server.target
        with (
            lossd.OnlineLabelSmoothing(0.5, c, target=target, shared_memory=False) as inline,
            lossd.OnlineLabelSmoothing(0.5, c, target=target, shared_memory=True) as shared,
        ):
            baseline = AutogradOLS(0.5, c)
            paths: dict[str, Callable[[], None]] = {
                "torch LS CE": lambda: F.cross_entropy(logits, labels, label_smoothing=0.1).backward(),
                "autograd OLS": lambda: baseline(logits, labels).backward(),
                "lossd OLS inline": lambda: inline(logits, labels).backward(),
                "lossd OLS shm": lambda: shared(logits, labels).backward(),
            }
            times: dict[str, list[float]] = {name: [] for name in paths}
            for step in paths.values():  # warm-up; attaches the segment
                for _ in range(5):
                    step()
            stream = shared.client._connection._stream
            assert stream is not None and stream.shm_segment is not None, f"no shared memory: {stream}"
            for _ in range(args.rounds):
                for name, step in paths.items():
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        step()
                    times[name].append((time.perf_counter() - start) / args.steps * 1e3)
    torch_ms = statistics.median(times["torch LS CE"])
    ols_ms = statistics.median(times["autograd OLS"])
    print(f"{n}x{c} {args.dtype}, {os.cpu_count()} CPUs, median of {args.rounds} rounds x {args.steps} steps")
    print(f"{'path':<18} {'ms/step':>8} {'/torch LS':>10} {'/autograd OLS':>14}")
    for name, samples in times.items():
        ms = statistics.median(samples)
        print(f"{name:<18} {ms:8.3f} {ms / torch_ms:10.2f} {ms / ols_ms:14.2f}")


if __name__ == "__main__":
    main()
