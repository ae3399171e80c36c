"""The examples run as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
