"""The benchmark harness (bench/, ``python -m bench``) runs end to end: smoke tests, no timing assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ is not installed: it runs from the checkout
    sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402
from bench.baseline import ReferenceOLS  # noqa: E402
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
    assert "issue 13 targets" not in table  # no target applies to 16x10
    document = json.loads(report.read_text())
    rows = {row["path"]: row for row in document["results"]}
    # The default paths are all of them; --quick runs the OLS section only (no per-byte shape).
    assert set(rows) == {name for name, path in PATHS.items() if not path.per_byte}
    assert document["config"]["per_byte_shapes"] == []
    for name, row in rows.items():
        assert f" {name} " in table
        assert row["shape"] == "16x10" and row["section"] == "ols"
        if "unavailable" in row:  # a client option another issue adds: the table says why
            assert name in ("remote_local", "cached") and row["unavailable"]
            continue
        assert row["median_ms"] > 0 and row["samples"] == 5
        assert row["ratio_torch_ls"] > 0 and row["ratio_reference_ols"] > 0
    for name in ("torch_ls", "reference_ols", "server_math", "remote_f32", "remote_bf16", "grpc_echo"):
        assert "median_ms" in rows[name], rows[name]
    assert rows["torch_ls"]["ratio_torch_ls"] == pytest.approx(1.0)
    assert rows["reference_ols"]["ratio_reference_ols"] == pytest.approx(1.0)
    assert rows["grpc_echo"]["note"] == f"{16 * 10 * 4 + 16 * 8} B out, {16 * 10 * 4} B back per step"
    if "median_ms" in rows["remote_local"]:
        assert "note" in rows["remote_local"]  # which transport the module used, or that it cannot tell
    assert document["machine"]["cores"] >= 1 and document["config"]["repeats"] == 5


def test_per_byte_paths_run_on_their_own_shapes(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    paths = "torch_ls,ls_server_math,remote_ls_bf16,grpc_echo_bf16"
    result = _run(
        "bench",
        *("--paths", paths, "--shapes", "4x3", "--repeats", "2", "--warmup", "1"),
        *("--per-byte-shapes", "8x5000", "--per-byte-repeats", "2", "--json", str(report)),
    )
    assert result.returncode == 0, result.stderr
    assert "per-byte paths" in result.stdout
    rows = json.loads(report.read_text())["results"]
    assert [(row["shape"], row["path"], row["section"]) for row in rows] == [
        ("4x3", "torch_ls", "ols"),
        ("8x5000", "ls_server_math", "per_byte"),
        ("8x5000", "remote_ls_bf16", "per_byte"),
        ("8x5000", "grpc_echo_bf16", "per_byte"),
    ]
    for row in rows:
        assert row["median_ms"] > 0 and row["samples"] == 2, row
    assert rows[3]["note"] == f"{8 * 5000 * 2 + 8 * 8} B out, {8 * 5000 * 2} B back per step"


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
    assert all(row["ratio_reference_ols"] is None for row in rows)  # its reference path was not run


def test_bad_arguments_are_refused() -> None:
    assert _run("bench", "--paths", "nope").returncode == 2
    assert _run("bench", "--shapes", "10").returncode == 2


def test_grpc_servers_quick_run_times_both_server_kinds(tmp_path: Path) -> None:
    report = tmp_path / "servers.json"
    result = _run("bench.grpc_servers", "--sizes", "4x10,2x3", "--rounds", "3", "--warmup", "1", "--json", str(report))
    assert result.returncode == 0, result.stderr
    assert "sync/aio" in result.stdout
    rows = json.loads(report.read_text())["results"]
    assert [(row["size"], row["request_bytes"], row["response_bytes"]) for row in rows] == [
        ("4x10", 4 * 10 * 4 + 4 * 8, 4 * 10 * 4),
        ("2x3", 2 * 3 * 4 + 2 * 8, 2 * 3 * 4),
    ]
    for row in rows:
        assert row["aio"]["samples"] == row["sync"]["samples"] == 3 and row["sync_over_aio"] > 0


def test_bad_per_byte_shapes_are_refused() -> None:
    assert _run("bench", "--per-byte-shapes", "1024").returncode == 2


def test_targets_are_checked_on_their_shapes() -> None:
    rows = [
        {"n": 256, "c": 1000, "path": "reference_ols", "median_ms": 6.0},
        {"n": 256, "c": 1000, "path": "server_math", "median_ms": 2.0},
        {"n": 256, "c": 1000, "path": "remote_local", "median_ms": 2.08},
        {"n": 256, "c": 1000, "path": "remote_f32", "median_ms": 6.5},
        {"n": 64, "c": 100, "path": "server_math", "median_ms": 0.3},
        {"n": 64, "c": 100, "path": "remote_local", "median_ms": 0.4},
        {"n": 1024, "c": 1000, "path": "server_math", "median_ms": 8.0},
        {"n": 1024, "c": 1000, "path": "remote_f32", "median_ms": 20.0},
        {"n": 1024, "c": 1000, "path": "grpc_echo", "median_ms": 5.0},
        {"n": 1024, "c": 32000, "path": "ls_server_math", "median_ms": 500.0},
        {"n": 1024, "c": 32000, "path": "remote_ls_bf16", "median_ms": 800.0},
    ]
    checks = {(check["target"], check["shape"]): check for check in harness.check_targets(rows)}
    added = checks[("local transport added ms", "256x1000")]
    assert added["value"] == pytest.approx(0.08) and added["met"] is True and added["bound"] == 0.10
    tiny = checks[("local transport added ms", "64x100")]
    assert tiny["value"] == pytest.approx(0.1) and tiny["met"] is False and tiny["bound"] == 0.05
    assert checks[("local transport vs reference", "256x1000")]["value"] == pytest.approx(2.08 / 6.0)
    assert checks[("gRPC f32 vs reference", "256x1000")]["met"] is False
    assert checks[("gRPC bf16 vs reference", "256x1000")]["met"] is None  # not measured
    per_byte = checks[("gRPC per-byte (float32 wire)", "1024x1000")]
    assert per_byte["value"] == pytest.approx((20.0 - 8.0) / 5.0) and per_byte["met"] is False
    assert per_byte["floor"] == "grpc_echo"
    assert checks[("gRPC per-byte (bfloat16 wire, LS)", "1024x32000")]["met"] is None  # no echo measured
    assert ("gRPC f32 vs reference", "1024x1000") not in checks  # only on its shapes
    assert ("gRPC per-byte (float32 wire)", "256x1000") not in checks
    text = harness.format_targets(list(checks.values()))
    assert "<= 2.0x grpc_echo" in text and "not measured" in text


def test_memory_quick_run_refuses_a_32000_class_session(tmp_path: Path) -> None:
    report = tmp_path / "memory.json"
    result = _run("bench.memory", "--quick", "--json", str(report))
    assert result.returncode == 0, result.stderr
    document = json.loads(report.read_text())
    assert document["refusal"]["outcome"] == "RESOURCE_EXHAUSTED"
    assert document["refusal"]["server_alive"] and document["refusal"]["server_serves_after"]
    assert [row["n_classes"] for row in document["sessions"]] == [100, 1000]
    assert document["flat"]["requests"] == 200 and len(document["flat"]["rss_mib"]) > 2


def _reference_loss_float64(
    logits: torch.Tensor, labels: torch.Tensor, supervise: torch.Tensor, alpha: float
) -> torch.Tensor:
    """The reference's loss re-derived in float64: alpha CE + (1 - alpha) mean_i sum_c -S[c, y_i] log p_ic."""
    log_probs = logits.double().log_softmax(dim=1)
    hard = -log_probs.gather(1, labels.unsqueeze(1)).mean()
    soft = -(supervise.double()[:, labels].t() * log_probs).sum(dim=1).mean()
    return alpha * hard + (1 - alpha) * soft


def test_baseline_is_the_reference_module() -> None:
    n_classes, alpha, smoothing = 5, 0.3, 0.2
    module = ReferenceOLS(alpha, n_classes, smoothing)
    for name in ("supervise", "update", "idx_count"):
        assert getattr(module, name).dtype == torch.float32 and name in dict(module.named_buffers())
    assert module.supervise.shape == module.update.shape == (n_classes, n_classes)
    assert isinstance(module.hard_loss, torch.nn.CrossEntropyLoss)
    expected = torch.full((n_classes, n_classes), smoothing / (n_classes - 1))
    expected.fill_diagonal_(1 - smoothing)
    assert torch.equal(module.supervise, expected)

    # A non-symmetric S, so a transposed index would give another loss.
    generator = torch.Generator().manual_seed(1)
    supervise = torch.rand(n_classes, n_classes, generator=generator)
    module.supervise.copy_(supervise / supervise.sum(dim=0))
    logits = torch.randn(7, n_classes, generator=generator, requires_grad=True)
    labels = torch.randint(0, n_classes, (7,), generator=generator)
    loss = module.eval()(logits, labels)
    reference = _reference_loss_float64(logits.detach(), labels, module.supervise, alpha)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), reference, rtol=1e-6, atol=1e-6)
    loss.backward()
    double = logits.detach().double().requires_grad_()
    _reference_loss_float64(double, labels, module.supervise, alpha).backward()
    torch.testing.assert_close(logits.grad.double(), double.grad, rtol=1e-5, atol=1e-6)
    assert not module.update.any() and not module.idx_count.any()  # eval(): no statistics


def test_baseline_step_adds_correct_rows_to_update_columns() -> None:
    module = ReferenceOLS(0.5, 3, 0.1)
    labels = torch.tensor([1, 0, 0, 1])
    probs = torch.tensor([[0.3, 0.6, 0.1], [0.7, 0.2, 0.1], [0.3, 0.3, 0.4], [0.2, 0.7, 0.1]])  # row 2 is wrong
    module.step(probs, labels)
    # The reference's orientation: row i's probabilities go to column y_i (update[:, y]).
    expected = torch.zeros(3, 3)
    expected[:, 0] = probs[1]
    expected[:, 1] = probs[0] + probs[3]
    torch.testing.assert_close(module.update, expected)
    assert torch.equal(module.idx_count, torch.tensor([1.0, 2.0, 0.0]))

    # forward() in training mode steps with the softmax of the logits.
    module = ReferenceOLS(0.5, 3, 0.1).train()
    logits = probs.log()  # softmax(log p) = p, as the rows sum to 1
    module(logits, labels)
    torch.testing.assert_close(module.update, expected)
    assert torch.equal(module.idx_count, torch.tensor([1.0, 2.0, 0.0]))

    module.next_epoch()  # column means; a class never predicted correctly gets a zero column
    torch.testing.assert_close(module.supervise, expected / torch.tensor([1.0, 2.0, 1.0]))
    assert not module.update.any() and not module.idx_count.any()
    assert module.supervise.data_ptr() != module.update.data_ptr()
    assert "supervise" in dict(module.named_buffers())
