"""The CUDA path computes what the CPU path computes. Skipped without a CUDA device."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import lossd
from lossd_server.config import Settings
from lossd_server.embedded import EmbeddedServer

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

C = 37
SPECS = {
    "ce_weighted": lossd.SessionSpec(
        kind="cross_entropy", n_classes=C, weight=tuple(float(i % 5 + 1) for i in range(C))
    ),
    "ls_uniform_sum": lossd.SessionSpec(kind="label_smoothing", n_classes=C, smoothing=0.1, reduction="sum"),
    "ls_off_target_none": lossd.SessionSpec(
        kind="label_smoothing", n_classes=C, smoothing=0.2, convention="off_target", reduction="none", ignore_index=3
    ),
    "ols": lossd.SessionSpec(
        kind="online_label_smoothing", n_classes=C, smoothing=0.1, alpha=0.4, empty_class="uniform"
    ),
}


@pytest.fixture(scope="module")
def targets() -> Iterator[tuple[str, str]]:
    with EmbeddedServer(Settings(port=0, device="cuda")) as gpu, EmbeddedServer(Settings(port=0, device="cpu")) as cpu:
        yield gpu.target, cpu.target


def _batch(seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (257,), generator=generator)
    logits = torch.randn(257, C, generator=generator) * 3
    logits[torch.arange(257), labels] += 4.0 * (torch.rand(257, generator=generator) < 0.5)
    return logits.to(dtype), labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(SPECS))
def test_gpu_matches_cpu_over_epochs(targets: tuple[str, str], name: str, dtype: torch.dtype) -> None:
    spec = SPECS[name]
    session = f"cuda-{name}-{dtype}"
    with lossd.Client(targets[0]) as gpu, lossd.Client(targets[1]) as cpu:
        for client in (gpu, cpu):
            client.create_session(session, spec)
        for epoch in range(3):
            for step in range(4):
                logits, labels = _batch(100 * epoch + step, dtype)
                on_gpu = gpu.compute_loss(session, logits, labels, training=step != 3)
                on_cpu = cpu.compute_loss(session, logits, labels, training=step != 3)
                assert (on_gpu.n_used, on_gpu.n_correct) == (on_cpu.n_used, on_cpu.n_correct)
                # Both compute in float32; only reduction order differs.
                torch.testing.assert_close(on_gpu.loss, on_cpu.loss, rtol=2e-6, atol=2e-6)
                assert on_gpu.grad is not None and on_cpu.grad is not None
                assert on_gpu.grad.dtype == dtype
                # The two devices' float32 softmax differ by a few float32 ulps, and p - t cancels,
                # so allow 4 float32 ulps of the gradient's scale, plus one ulp of the wire dtype
                # for rounding the two results to it on either side of a rounding boundary.
                scale = float(on_cpu.grad.float().abs().max())
                atol = 4 * torch.finfo(torch.float32).eps * scale
                ulp = torch.finfo(dtype).eps
                torch.testing.assert_close(on_gpu.grad.float(), on_cpu.grad.float(), rtol=ulp, atol=atol)
            for client in (gpu, cpu):
                client.next_epoch(session)
        gpu_state, cpu_state = gpu.get_state(session), cpu.get_state(session)
    assert torch.equal(gpu_state.counts, cpu_state.counts)
    torch.testing.assert_close(gpu_state.accumulator, cpu_state.accumulator, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(gpu_state.supervise, cpu_state.supervise, rtol=1e-6, atol=1e-7)


def test_auto_picks_cuda() -> None:
    with EmbeddedServer(Settings(port=0, device="auto")) as server:
        assert server._running is not None and server._running.device.type == "cuda"
