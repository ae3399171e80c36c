"""Median time of one loss forward+backward: torch's local label smoothing vs lossd's modules.

    python bench/remote_step.py [--device cpu|cuda] [--store sqlite|memory]

Starts `lossd serve` in a child process on the same device and talks to it over
TCP loopback, so client and server are separate processes as in training. A
rough probe for the issue notes; the full harness is a later issue's.
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


def median_ms(step: Callable[[], None], device: torch.device, repeats: int = 50) -> float:
    for _ in range(5):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--store", choices=["sqlite", "memory"], default="sqlite", help="the server's store")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(1)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lossd_server",
            "serve",
            "--port",
            "0",
            "--device",
            args.device,
            "--torch-threads",
            "1",
            "--matrix-memory-bytes",
            str(16 << 30),
            "--store",
            args.store,
            "--state-dir",
            tempfile.mkdtemp(prefix="lossd-bench-"),
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
    print(f"{'shape':>12} {'dtype':>9} {'torch LS':>9} {'lossd LS':>9} {'lossd OLS':>10}  (ms, {device})")
    shapes = [(64, 100, torch.float32), (256, 1000, torch.float32), (1024, 1000, torch.float32)]
    shapes += [(256, 1000, torch.bfloat16)]
    if device.type == "cuda":  # 12 GB of OLS matrices: a GPU-host shape
        shapes += [(1024, 32000, torch.bfloat16)]
    try:
        for n, c, dtype in shapes:
            _compare(target, device, n, c, dtype)
    finally:
        server.terminate()
        server.wait()


def _compare(target: str, device: torch.device, n: int, c: int, dtype: torch.dtype) -> None:
    logits = torch.randn(n, c, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, c, (n,), device=device)
    with (
        lossd.CrossEntropyLoss(label_smoothing=0.1, target=target) as ls,
        lossd.OnlineLabelSmoothing(0.5, c, target=target) as ols,
    ):
        local = median_ms(
            lambda: F.cross_entropy(logits, labels, label_smoothing=0.1).backward(),  # type: ignore[no-untyped-call]
            device,
        )
        remote_ls = median_ms(lambda: ls(logits, labels).backward(), device)
        remote_ols = median_ms(lambda: ols(logits, labels).backward(), device)
    name = str(dtype).removeprefix("torch.")
    print(f"{n:>5}x{c:<6} {name:>9} {local:9.3f} {remote_ls:9.3f} {remote_ols:10.3f}")


if __name__ == "__main__":
    main()
