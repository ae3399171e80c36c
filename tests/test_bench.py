"""The benchmark harness (bench/, ``python -m bench``) runs end to end: smoke tests, no timing assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ is not installed: it runs from the checkout
    sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402
from bench.paths import PATHS  # noqa: E402


def _run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_quick_run_prints_every_path_with_ratios_and_writes_json(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    result = _run("bench", "--quick", "--json", str(report))
    assert result.returncode == 0, result.stderr
    table = result.stdout
    assert "cores" in table and "torch" in table  # the machine header
    document = json.loads(report.read_text())
    rows = {row["path"]: row for row in document["results"]}
    assert set(rows) == set(PATHS)  # the default paths are all of them
    for name, row in rows.items():
        assert f" {name} " in table
        assert row["shape"] == "16x10"
        if "unavailable" in row:  # a client option another issue adds: the table says why
            assert name in ("remote_shm", "cached") and row["unavailable"]
            continue
        assert row["median_ms"] > 0 and row["samples"] == 5
        assert row["ratio_torch_ls"] > 0 and row["ratio_autograd_ols"] > 0
    for name in ("torch_ls", "autograd_ols", "server_math", "remote_f32", "remote_bf16"):
        assert "median_ms" in rows[name], rows[name]
    assert rows["torch_ls"]["ratio_torch_ls"] == pytest.approx(1.0)
    assert rows["autograd_ols"]["ratio_autograd_ols"] == pytest.approx(1.0)
    assert document["machine"]["cores"] >= 1 and document["config"]["repeats"] == 5


def test_local_paths_only_need_no_server(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    result = _run(
        "bench", "--shapes", "8x5,4x3", "--paths", "torch_ls,server_math", "--repeats", "3", "--json", str(report)
    )
    assert result.returncode == 0, result.stderr
    assert "server:" not in result.stdout
    rows = json.loads(report.read_text())["results"]
    assert [(row["shape"], row["path"]) for row in rows] == [
        ("8x5", "torch_ls"),
        ("8x5", "server_math"),
        ("4x3", "torch_ls"),
        ("4x3", "server_math"),
    ]
    assert all(row["ratio_autograd_ols"] is None for row in rows)  # its reference path was not run


def test_bad_arguments_are_refused() -> None:
    assert _run("bench", "--paths", "nope").returncode == 2
    assert _run("bench", "--shapes", "10").returncode == 2


def test_targets_are_checked_on_their_shapes() -> None:
    rows = [
        {"n": 256, "c": 1000, "path": "autograd_ols", "median_ms": 2.0},
        {"n": 256, "c": 1000, "path": "server_math", "median_ms": 0.8},
        {"n": 256, "c": 1000, "path": "remote_f32", "median_ms": 2.5},
        {"n": 64, "c": 100, "path": "autograd_ols", "median_ms": 0.3},
        {"n": 64, "c": 100, "path": "remote_f32", "median_ms": 0.5},
    ]
    checks = {(check["target"], check["shape"]): check for check in harness.check_targets(rows)}
    assert checks[("1 server math", "256x1000")]["met"] is True
    assert checks[("2 remote float32 wire", "256x1000")]["met"] is False
    assert checks[("5 tiny shape, added ms (float32 wire)", "64x100")]["value"] == pytest.approx(0.2)
    assert ("1 server math", "64x100") not in checks
    assert checks[("2 remote bfloat16 wire", "256x1000")]["met"] is None  # not measured


def test_memory_quick_run_refuses_a_32000_class_session(tmp_path: Path) -> None:
    report = tmp_path / "memory.json"
    result = _run("bench.memory", "--quick", "--json", str(report))
    assert result.returncode == 0, result.stderr
    document = json.loads(report.read_text())
    assert document["refusal"]["outcome"] == "RESOURCE_EXHAUSTED"
    assert document["refusal"]["server_alive"] and document["refusal"]["server_serves_after"]
    assert [row["n_classes"] for row in document["sessions"]] == [100, 1000]
    assert document["flat"]["requests"] == 200 and len(document["flat"]["rss_mib"]) > 2
