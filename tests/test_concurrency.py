"""Many trainers on one session: no update lost or applied twice; health answers while workers are busy."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

import lossd
from lossd import functional as F
from lossd_server.config import Settings
from lossd_server.embedded import EmbeddedServer
from tests.conftest import TEST_DEVICE, ComputeGate

C = 10
THREADS = 8
STEPS = 6


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (32,), generator=generator)
    logits = torch.randn(32, C, generator=generator)
    logits[torch.arange(32), labels] += 2.0 * (torch.rand(32, generator=generator) < 0.6)  # many correct rows
    return logits, labels


def test_eight_trainers_on_one_session_sum_exactly(server: EmbeddedServer, session_name: str) -> None:
    spec = lossd.SessionSpec(kind="online_label_smoothing", n_classes=C, smoothing=0.1, alpha=0.5)
    with lossd.Client(server.target) as admin:
        admin.create_session(session_name, spec)

    def trainer(rank: int) -> None:
        with lossd.Client(server.target) as client:  # one channel and one stream per trainer
            for step in range(STEPS):
                logits, labels = _batch(rank * 1000 + step)
                client.compute_loss(session_name, logits, labels, training=True)

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(trainer, range(THREADS)))

    expected_acc = torch.zeros(C, C, dtype=torch.float64)
    expected_counts = torch.zeros(C, dtype=torch.int64)
    samples = 0
    # The same math (the server's kernel, on its device), so only the order of summation can differ.
    device = torch.device(TEST_DEVICE)
    kernel = server.settings.math_kernel
    soft = F.initial_soft_labels(C, 0.1, device=device)
    for rank in range(THREADS):
        for step in range(STEPS):
            logits, labels = (t.to(device) for t in _batch(rank * 1000 + step))
            output = F.online_label_smoothing(logits, labels, soft, alpha=0.5, kernel=kernel)
            rows, probs = F.correct_rows(output, labels)
            expected_acc.index_add_(0, rows.cpu(), probs.cpu())
            expected_counts.index_add_(0, rows.cpu(), torch.ones_like(rows.cpu()))
            samples += output.n_used

    with lossd.Client(server.target) as admin:
        state = admin.get_state(session_name)
    assert torch.equal(state.counts, expected_counts)
    assert state.samples_this_epoch == samples == THREADS * STEPS * 32
    # Only the order of float64 summation differs between the server and this loop.
    torch.testing.assert_close(state.accumulator, expected_acc.T, rtol=1e-12, atol=1e-12)


def test_health_answers_while_every_worker_is_busy(compute_gate: ComputeGate) -> None:
    with EmbeddedServer(Settings(port=0, device="cpu", workers=2, grace_seconds=1)) as server:
        clients = [lossd.Client(server.target) for _ in range(3)]
        clients[0].create_session("busy", lossd.SessionSpec(kind="cross_entropy", n_classes=4))
        logits, labels = torch.randn(2, 4), torch.tensor([0, 1])
        with ThreadPoolExecutor(3) as pool:
            calls = [pool.submit(c.compute_loss, "busy", logits, labels) for c in clients]
            for _ in range(2):  # both workers are now inside a stream's request
                assert compute_gate.entered.acquire(timeout=10)
            with grpc.insecure_channel(server.target) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            compute_gate.release.set()
            results = [call.result(timeout=30) for call in calls]
        for c in clients:
            c.close()
    assert all(result.n_used == 2 for result in results)
