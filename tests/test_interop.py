"""A Node.js client (tests/interop/ols_client.js, @grpc/grpc-js loading proto/ directly) against a real
server: the lossd.v1 contract is all a trainer in another language needs.

The Node client trains an OLS session over two epochs (ComputeLoss tagged with the epoch, NextEpoch);
the same batches go through the Python client on a second session of the same server, and every loss,
gradient, count and the final S must be the same bytes. The first batch is also checked against torch's
own cross-entropy in float64 (epoch 0's soft labels are the off-target smoothed one-hot).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import lossd
from lossd_server.embedded import EmbeddedServer

INTEROP = Path(__file__).parent / "interop"
C, N, ALPHA, SMOOTHING = 5, 8, 0.4, 0.1
EPOCHS, BATCHES = 2, 2

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js (node) on PATH")


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(array.tobytes()).decode()


def _f32(text: str, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype="<f4").reshape(shape).copy())


def _batches() -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    generator = torch.Generator().manual_seed(2026)
    epochs = []
    for _ in range(EPOCHS):
        batches = []
        for _ in range(BATCHES):
            labels = torch.randint(0, C, (N,), generator=generator)
            logits = torch.randn(N, C, generator=generator) + 2.0 * TF.one_hot(labels, C)
            batches.append((logits, labels))
        epochs.append(batches)
    return epochs


def _run_node(target: str, session: str, tmp_path: Path) -> dict[str, object]:
    if not (INTEROP / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("tests/interop has no node_modules: run `npm ci --prefix tests/interop` (.ci/run does)")
    document = {
        "session": session,
        "n_classes": C,
        "alpha": ALPHA,
        "smoothing": SMOOTHING,
        "epochs": [
            [
                {"n": N, "logits": _b64(logits.numpy().astype("<f4")), "labels": _b64(labels.numpy().astype("<i8"))}
                for logits, labels in epoch
            ]
            for epoch in _batches()
        ],
    }
    (tmp_path / "input.json").write_text(json.dumps(document))
    completed = subprocess.run(
        ["node", str(INTEROP / "ols_client.js"), target, str(tmp_path / "input.json"), str(tmp_path / "output.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    output: dict[str, object] = json.loads((tmp_path / "output.json").read_text())
    return output


def _torch_reference(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OLS at epoch 0 in float64: alpha * CE + (1 - alpha) * CE with off-target smoothing (eps * C / (C - 1))."""
    z = logits.to(torch.float64).requires_grad_()
    loss = ALPHA * TF.cross_entropy(z, labels) + (1 - ALPHA) * TF.cross_entropy(
        z, labels, label_smoothing=SMOOTHING * C / (C - 1)
    )
    (grad,) = torch.autograd.grad(loss, z)
    return loss.detach(), grad


def test_a_node_client_trains_two_epochs_with_the_python_clients_numbers(
    server: EmbeddedServer, client: lossd.Client, session_name: str, tmp_path: Path
) -> None:
    output = _run_node(server.target, f"{session_name}-node", tmp_path)

    python = f"{session_name}-python"
    with lossd.OnlineLabelSmoothing(
        ALPHA, C, SMOOTHING, target=server.target, session=python, transport="grpc"
    ) as module:
        expected = []
        for epoch in _batches():
            for logits, labels in epoch:
                leaf = logits.clone().requires_grad_()
                loss = module(leaf, labels)
                loss.backward()
                assert leaf.grad is not None
                expected.append((loss.detach(), leaf.grad))
            module.next_epoch()

    batches = output["batches"]
    assert isinstance(batches, list) and len(batches) == EPOCHS * BATCHES
    for index, (batch, (loss, grad)) in enumerate(zip(batches, expected, strict=True)):
        assert batch["epoch"] == index // BATCHES
        assert torch.equal(_f32(batch["loss"], ()), loss), index
        assert torch.equal(_f32(batch["grad"], (N, C)), grad), index
        assert batch["n_used"] == N
    assert output["epoch"] == EPOCHS
    node_s = _f32(str(output["supervise"]), (C, C))
    assert torch.equal(node_s, client.get_state(python).supervise)
    assert not torch.equal(node_s, client.get_state(python).supervise.new_zeros((C, C)))

    # The numbers themselves: the first batch against torch in float64, to float32 rounding.
    logits, labels = _batches()[0][0]
    reference_loss, reference_grad = _torch_reference(logits, labels)
    torch.testing.assert_close(_f32(batches[0]["loss"], ()).double(), reference_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(
        _f32(batches[0]["grad"], (N, C)).double(), reference_grad, rtol=0, atol=1e-6 * float(reference_grad.abs().max())
    )
