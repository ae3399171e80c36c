"""The examples run as documented."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path

from lossd_server.embedded import EmbeddedServer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_one_import_example_trains_and_learns_soft_labels() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "one_import.py"), "--epochs", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["epoch 0", "epoch 1"]
    accuracy = float(lines[1].rsplit(" ", 1)[1])
    assert accuracy > 0.8, result.stdout
    soft_label = [float(v) for v in lines[2].split("[", 1)[1].rstrip("]").split(",")]
    # A learnt column averages softmax rows, so it sums to 1 up to the printing: 10 values at 3 decimals.
    assert abs(sum(soft_label) - 1.0) <= 10 * 0.0005 + 1e-9
    assert soft_label[0] != 0.9  # it moved from its label-smoothing init


def test_torchrun_example_gives_every_rank_the_same_soft_labels(server: EmbeddedServer) -> None:
    with socket.socket() as probe:  # a free port for torch.distributed's rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            str(EXAMPLES / "torchrun_ols.py"),
            "--target",
            server.target,
            "--session",
            f"torchrun-{uuid.uuid4().hex[:8]}",
            "--epochs",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # Two processes share the pipe, so one's line can land inside the other's: match, don't split.
    reports = re.findall(r"rank (\d)/2 epoch (\d): S diagonal mean ([0-9.]+)", result.stdout)
    assert sorted((rank, epoch) for rank, epoch, _ in reports) == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]
    lines = [f"rank {rank} epoch {epoch}: {mean}" for rank, epoch, mean in reports]
    by_epoch = {epoch: {mean for _, e, mean in reports if e == str(epoch)} for epoch in (0, 1)}
    # Both ranks print the same S after each epoch: one matrix, learnt from both shards.
    assert all(len(values) == 1 for values in by_epoch.values()), lines
