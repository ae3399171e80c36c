"""``lossd demo`` in a reduced configuration, and its calibration metric."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lossd_server.cli import main
from lossd_server.demo import expected_calibration_error

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_demo_trains_every_loss_and_writes_its_plots(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """No --target: the demo starts an embedded server on loopback and stops it."""
    argv = ["demo", "--epochs", "2", "--seeds", "1", "--samples", "400", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in out if line.split() and line.split()[0] in ("CE", "LS", "OLS")}
    assert sorted(rows) == ["CE", "LS", "OLS"]  # one row per loss
    for loss, row in rows.items():
        accuracy, ece, nll = (float(row[i]) for i in (1, 4, 7))
        assert 0.5 < accuracy <= 1.0, (loss, row)  # two epochs on digits already learn something
        assert 0.0 <= ece <= 1.0 and nll > 0.0
        assert row[2] == row[5] == row[8] == "±"
    import matplotlib.image

    for name in ("ols_soft_labels", "reliability_ce", "reliability_ls", "reliability_ols", "accuracy_per_epoch"):
        path = tmp_path / f"{name}.png"
        assert path.read_bytes()[:8] == PNG_MAGIC, name
        assert matplotlib.image.imread(path).ndim == 3


def test_demo_without_a_server_says_so_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["demo", "--epochs", "1", "--seeds", "1", "--samples", "100", "--out", str(tmp_path)]
    assert main([*argv, "--target", "127.0.0.1:1"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("lossd demo: ") and "Traceback" not in "\n".join(err)


def test_expected_calibration_error_matches_a_hand_count() -> None:
    # Bins of width 1/15: 0.95 and 0.99 share the last bin (acc 1/2, conf 0.97), 0.5 sits alone (acc 1, conf 0.5).
    confidences = torch.tensor([0.95, 0.99, 0.5])
    hits = torch.tensor([True, False, True])
    expected = (2 / 3) * abs(0.5 - 0.97) + (1 / 3) * abs(1.0 - 0.5)
    assert expected_calibration_error(confidences, hits) == pytest.approx(expected)
    assert expected_calibration_error(torch.tensor([1.0, 1.0]), torch.tensor([True, True])) == 0.0
