"""Which loss kernel runs: ``auto`` takes the fused kernel where it loads and falls back to the eager
math, saying so, where it cannot; ``fused`` refuses to run without it; ``eager`` never loads it.

The fallback is shown for real: a child process whose ``numba`` cannot be imported (a package of that
name that raises ImportError shadows the installed one on PYTHONPATH), as on a platform numba lacks.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lossd
from lossd import _kernels
from lossd import functional as F

ROOT = Path(__file__).resolve().parent.parent
SERVE = [sys.executable, "-m", "lossd_server", "serve", "--host", "127.0.0.1", "--port", "0", "--device", "cpu"]
SERVE += ["--store", "memory", "--workers", "1", "--local-socket", ""]
_PROBE = """
import logging, sys, torch
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from lossd import _kernels, functional as F
cpu = torch.device("cpu")
print("resolve", _kernels.resolve("auto", cpu))
print("describe", _kernels.describe("auto", cpu))
g = torch.Generator().manual_seed(0)
z, y = torch.randn(8, 5, generator=g), torch.randint(0, 5, (8,), generator=g)
soft = F.initial_soft_labels(5, 0.1)
auto = F.online_label_smoothing(z, y, soft, alpha=0.5, kernel="auto")
eager = F.online_label_smoothing(z, y, soft, alpha=0.5, kernel="eager")
print("equal", torch.equal(auto.loss, eager.loss) and torch.equal(auto.grad, eager.grad), auto.fused is None)
try:
    _kernels.resolve("fused", cpu)
except _kernels.KernelUnavailableError as error:
    print("fused refused:", error)
"""


@pytest.fixture()
def without_numba(tmp_path: Path) -> dict[str, str]:
    """The environment of a child in which ``import numba`` fails."""
    package = tmp_path / "shadow" / "numba"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('raise ImportError("numba is not available here (test shadow)")\n')
    path = os.pathsep.join([str(package.parent), str(ROOT / "client"), str(ROOT / "server")])
    return {**os.environ, "PYTHONPATH": path, "LOSSD_TORCH_THREADS": "1"}


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_auto_falls_back_to_the_eager_math_where_numba_cannot_load_and_says_why(
    without_numba: dict[str, str],
) -> None:
    result = _run([sys.executable, "-c", _PROBE], without_numba)
    assert result.returncode == 0, result.stderr
    assert "resolve None" in result.stdout  # no backend: the eager ops run
    assert "describe eager (numba: ImportError: numba is not available here (test shadow))" in result.stdout
    assert "equal True True" in result.stdout  # the very numbers of kernel="eager"
    assert "fused refused: math_kernel='fused': the fused kernel cannot load on cpu (numba: ImportError" in (
        result.stdout
    )
    # Logged once, with the reason.
    logged = [line for line in result.stderr.splitlines() if "math kernel auto on cpu" in line]
    assert logged == [
        "lossd: math kernel auto on cpu: eager (numba: ImportError: numba is not available here (test shadow))"
    ]


def test_a_server_on_auto_starts_on_the_eager_math_and_says_so_at_start_up(without_numba: dict[str, str]) -> None:
    process = subprocess.Popen([*SERVE, "--math-kernel", "auto"], env=without_numba, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    lines: list[str] = []
    try:
        for _ in range(50):
            line = process.stderr.readline()
            lines.append(line)
            if "serving on" in line or not line:
                break
        serving = lines[-1]
        assert "serving on" in serving, "".join(lines)
        assert "math=eager (numba: ImportError: numba is not available here (test shadow))" in serving
        match = re.search(r"serving on (127\.0\.0\.1:\d+) ", serving)
        assert match is not None
        # And it serves: the loss equals the eager math's.
        logits, labels = torch.randn(4, 3, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0])
        with lossd.Client(match.group(1)) as client:
            client.create_session("s", lossd.SessionSpec(kind="label_smoothing", n_classes=3, smoothing=0.1))
            result = client.compute_loss("s", logits, labels)
        expected = F.smoothed_cross_entropy(logits, labels, smoothing=0.1, kernel="eager")
        assert torch.equal(result.loss, expected.loss)
    finally:
        process.terminate()
        process.wait(timeout=30)
        process.stderr.close()


def test_a_server_on_fused_refuses_to_start_where_the_kernel_cannot_load(without_numba: dict[str, str]) -> None:
    result = _run([*SERVE, "--math-kernel", "fused"], without_numba)
    assert result.returncode != 0
    assert "the fused kernel cannot load on cpu (numba: ImportError: numba is not available here" in result.stderr
    assert "Traceback" not in result.stderr  # one line, as every start-up refusal


def test_auto_and_fused_run_numba_here_and_eager_never_loads_it() -> None:
    cpu = torch.device("cpu")
    assert _kernels.describe("auto", cpu) == "fused (numba)"
    assert _kernels.describe("fused", cpu) == "fused (numba)"
    assert _kernels.describe("eager", cpu) == "eager (asked for)"
    assert _kernels.resolve("eager", cpu) is None
    backend = _kernels.resolve("auto", cpu)
    assert backend is not None and backend.name == "numba"
    z, y = torch.randn(8, 5, generator=torch.Generator().manual_seed(2)), torch.arange(8) % 5
    assert F.smoothed_cross_entropy(z, y, smoothing=0.1, kernel="auto").fused is not None
    assert F.smoothed_cross_entropy(z, y, smoothing=0.1, kernel="eager").fused is None


@pytest.mark.parametrize("bad", ["Fused", "numba", "", "compile"])
def test_an_unknown_kernel_name_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="math_kernel to be 'auto', 'fused' or 'eager'"):
        _kernels.check_choice(bad)
    with pytest.raises(ValueError, match="math_kernel to be 'auto', 'fused' or 'eager'"):
        _kernels.resolve(bad, torch.device("cpu"))  # type: ignore[arg-type]
