"""Exactly-once under load: several processes train one session for a bounded time, resending some
requests and sending others twice at once (clients sharing a rank), against a real `lossd serve`.

The oracle is a float64 re-derivation from the batches the server acknowledged, each counted once.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import lossd
from lossd import functional as F
from tests.conftest import ols_spec
from tests.test_durability import Served, start

C, N = 10, 16
PROCESSES = 4
SECONDS = 3.0
MAX_STEPS = 60
# One rank per process, as under DDP; within a process two clients share the rank.
SPEC = dataclasses.replace(ols_spec(C), world_size=PROCESSES)


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (N,), generator=generator)
    logits = torch.randn(N, C, generator=generator) + 2.0 * torch.nn.functional.one_hot(labels, C)
    return logits, labels


def _together(
    clients: tuple[lossd.Client, lossd.Client], logits: torch.Tensor, labels: torch.Tensor, request_id: str, rank: int
) -> list[lossd.LossResult]:
    barrier = threading.Barrier(2)

    def send(client: lossd.Client) -> lossd.LossResult:
        barrier.wait()
        return client.compute_loss("load", logits, labels, epoch=0, request_id=request_id, rank=rank)

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(send, clients))


def trainer(target: str, worker: int, results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """Runs in its own process: returns the seeds it had acknowledged, and any mismatch it saw."""
    torch.set_num_threads(1)
    chooser = random.Random(worker)
    acknowledged: list[int] = []
    problems: list[str] = []
    deadline = time.monotonic() + SECONDS
    try:
        _train(target, worker, chooser, deadline, acknowledged, problems)
    except Exception as error:  # reported to the parent, which fails the test with it
        problems.append(f"worker {worker}: {type(error).__name__}: {error}")
    results.put((acknowledged, problems))


def _train(
    target: str, worker: int, chooser: random.Random, deadline: float, acknowledged: list[int], problems: list[str]
) -> None:
    with lossd.Client(target, retry_deadline=5) as first, lossd.Client(target, retry_deadline=5) as second:
        for step in range(MAX_STEPS):
            if time.monotonic() > deadline:
                break
            seed = worker * 10_000 + step
            logits, labels = batch(seed)
            request_id = f"w{worker}-s{step}"
            how = chooser.choice(["once", "resend", "together"])
            if how == "together":  # the same request from two clients at the same instant
                answers = _together((first, second), logits, labels, request_id, worker)
            else:
                answers = [first.compute_loss("load", logits, labels, epoch=0, request_id=request_id, rank=worker)]
                if how == "resend":
                    again = second.compute_loss("load", logits, labels, epoch=0, request_id=request_id, rank=worker)
                    answers.append(again)
            if not all(torch.equal(answer.loss, answers[0].loss) for answer in answers):
                problems.append(f"{request_id}: the copies got different answers")
            acknowledged.append(seed)


def test_several_processes_resending_and_racing_duplicates_count_each_batch_once(
    servers: list[Served], tmp_path: Path
) -> None:
    served = start(servers, tmp_path, "--snapshot-seconds", "0.2", "--workers", "4")
    with lossd.Client(served.target) as admin:
        admin.create_session("load", SPEC)
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue = context.Queue()  # type: ignore[type-arg]
    workers = [context.Process(target=trainer, args=(served.target, w, results)) for w in range(PROCESSES)]
    for process in workers:
        process.start()
    outcomes = [results.get(timeout=120) for _ in workers]
    for process in workers:
        process.join(timeout=30)
        assert process.exitcode == 0
    assert [problem for _, problems in outcomes for problem in problems] == []
    seeds = sorted(seed for acknowledged, _ in outcomes for seed in acknowledged)
    assert len(seeds) >= PROCESSES * 3  # the run did real work

    accumulator = torch.zeros(C, C, dtype=torch.float64)
    counts = torch.zeros(C, dtype=torch.int64)
    soft = F.initial_soft_labels(C, SPEC.smoothing, SPEC.init or "label_smoothing", SPEC.convention or "off_target")
    for seed in seeds:
        logits, labels = batch(seed)
        output = F.online_label_smoothing(logits.double(), labels, soft.double(), alpha=0.5)
        correct = output.correct.nonzero().squeeze(1)
        accumulator.index_add_(0, labels[correct], output.probs[correct].to(torch.float64))
        counts.index_add_(0, labels[correct], torch.ones_like(correct))
    with lossd.Client(served.target) as admin:
        state = admin.get_state("load")
        info = admin.get_session("load")
    assert info.samples_this_epoch == len(seeds) * N and info.samples_lost == 0
    assert torch.equal(state.counts, counts)
    # The server sums float32 probabilities in float64; the reference computes them in float64.
    torch.testing.assert_close(state.accumulator, accumulator.T, rtol=1e-6, atol=1e-6)
