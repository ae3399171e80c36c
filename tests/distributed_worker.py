"""One rank of a distributed OLS run, started as torchrun would start it (see tests/test_distributed.py).

Environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT. Arguments: the lossd target,
the session name, a seed, the number of epochs and the path of the JSON result.

The rank joins a gloo process group, creates ``lossd.OnlineLabelSmoothing`` on the named
session *without* world_size / rank (so they must come from torch.distributed), and
trains ``epochs`` epochs on its own shard. Every batch's loss and gradient are checked
against float64 math on this rank's shard with the S fetched from the server at the
start of the epoch. Any failure raises: the process exits non-zero with a traceback.

The data is a pure function of (seed, epoch, rank, step), so the test can rebuild the
union of all shards in one process (:func:`plan` and :func:`make_batch`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import time
from typing import Any

import torch
import torch.distributed as dist

import lossd
from lossd import functional as LF

C = 10
N = 32
ALPHA = 0.4
EPS = 0.15
IGNORE = -100
N_IGNORED = 2  # ignored rows per batch
BUMP = 3.0  # added to the label's logit of most rows, so most predictions are correct
BUMP_FRACTION = 0.75
MIN_TOP_GAP = 1e-3  # no near-ties at the top: float32 and float64 argmax agree

# float32 server math against a float64 re-derivation: the softmax is exact to a few
# ulp (~1e-7 relative), S is stored in float32 (rounding ~6e-8 relative). Gradient
# entries are at most ~1/N, the loss is O(1): both tolerances leave a wide margin.
LOSS_RTOL, LOSS_ATOL = 1e-6, 1e-6
GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-7


def plan(epoch: int, rank: int) -> list[tuple[str, int]]:
    """(mode, batch size) of each step of ``rank`` in ``epoch``: uneven across ranks and epochs,
    with one eval batch (which must not count) somewhere in the middle."""
    n_train = 2 + (rank + epoch) % 3
    steps = [("train", N)] * n_train
    steps[-1] = ("train", N - 4 * rank - 2 * epoch)  # a short last batch
    steps.insert(1 + (rank + 2 * epoch) % (n_train - 1), ("eval", N))
    return steps


def make_batch(seed: int, epoch: int, rank: int, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic [size, C] float32 logits and [size] labels, biased toward the label."""
    gen = torch.Generator().manual_seed(((seed * 1000 + epoch) * 1000 + rank) * 1000 + step)
    while True:
        labels = torch.randint(0, C, (size,), generator=gen)
        logits = torch.randn((size, C), generator=gen)
        bumped = torch.rand(size, generator=gen) < BUMP_FRACTION
        rows = torch.arange(size)
        logits[rows[bumped], labels[bumped]] += BUMP
        labels[torch.randperm(size, generator=gen)[:N_IGNORED]] = IGNORE
        top = logits.to(torch.float64).topk(2, dim=1).values
        if bool((top[:, 0] - top[:, 1] > MIN_TOP_GAP).all()):
            return logits, labels


def expected(logits: torch.Tensor, labels: torch.Tensor, supervise: torch.Tensor) -> LF.LossOutput:
    """Float64 OLS on this batch; ``supervise`` is in the wire layout (column k: class k)."""
    return LF.online_label_smoothing(
        logits.detach().to(torch.float64), labels, supervise.T.to(torch.float64), alpha=ALPHA, ignore_index=IGNORE
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, where: str) -> None:
    torch.testing.assert_close(
        actual.to(torch.float64), expected, rtol=rtol, atol=atol, msg=lambda message: f"{where}: {message}"
    )


def run(target: str, session: str, seed: int, epochs: int) -> dict[str, Any]:
    torch.set_num_threads(1)  # two cores, shared with the server and the other ranks
    dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=60))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    # From here on only torch.distributed knows the ranks: the module must take them from it.
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(name, None)

    sleeps = random.Random(f"{seed}/{rank}")
    criterion = lossd.OnlineLabelSmoothing(ALPHA, C, EPS, session=session, target=target, barrier_timeout=60.0)
    assert (criterion.rank, criterion.spec.world_size) == (rank, world_size), (criterion.rank, criterion.spec)
    assert criterion.client.get_session(session).spec.world_size == world_size

    result: dict[str, Any] = {
        "rank": rank,
        "world_size": world_size,
        "max_loss_error": 0.0,
        "max_grad_error": 0.0,
        "epochs_seen": [],  # the module's epoch at the start of each epoch and after next_epoch
        "supervise": [],  # S (wire layout) fetched at the start of each epoch
        "trained": [],  # (samples, correct) this rank trained on, per epoch
    }
    for epoch in range(epochs):
        supervise = criterion.supervise
        assert criterion.epoch == epoch, (criterion.epoch, epoch)
        result["supervise"].append(supervise.tolist())
        samples = correct = 0
        for step, (mode, size) in enumerate(plan(epoch, rank)):
            time.sleep(sleeps.uniform(0.0, 0.02))
            z, labels = make_batch(seed, epoch, rank, step, size)
            logits = z.clone().requires_grad_(True)
            criterion.train(mode == "train")
            loss = criterion(logits, labels)
            loss.backward()
            assert criterion.epoch == epoch, (criterion.epoch, epoch)
            assert logits.grad is not None and logits.grad.dtype == torch.float32

            ref = expected(z, labels, supervise)
            assert ref.grad is not None
            loss_error = abs(float(loss) - float(ref.loss))
            grad_error = float((logits.grad.to(torch.float64) - ref.grad).abs().max())
            result["max_loss_error"] = max(result["max_loss_error"], loss_error)
            result["max_grad_error"] = max(result["max_grad_error"], grad_error)
            where = f"rank {rank}, epoch {epoch}, step {step} ({mode})"
            assert_close(loss.detach(), ref.loss, LOSS_RTOL, LOSS_ATOL, f"{where}, loss")
            assert_close(logits.grad, ref.grad, GRAD_RTOL, GRAD_ATOL, f"{where}, grad")
            if mode == "train":
                samples += ref.n_used
                correct += ref.n_correct
        criterion.train()
        result["trained"].append([samples, correct])

        if epoch == epochs - 1:
            # Once every rank has trained its last batch, rank 0 records the epoch's statistics
            # before anyone can finish the epoch (that needs rank 0's next_epoch too).
            dist.barrier()
            if rank == 0:
                info, state = criterion.info(), criterion.state()
                assert rank not in info.ranks_finished
                result["last_epoch"] = {
                    "epoch": info.epoch,
                    "samples_this_epoch": info.samples_this_epoch,
                    "correct_this_epoch": info.correct_this_epoch,
                    "state_samples_this_epoch": state.samples_this_epoch,
                    "accumulator": state.accumulator.tolist(),
                    "counts": state.counts.tolist(),
                }
        time.sleep(sleeps.uniform(0.0, 0.05))  # vary the order in which ranks reach the barrier
        before = criterion.epoch
        criterion.next_epoch()
        assert criterion.epoch == epoch + 1, (before, criterion.epoch)
        result["epochs_seen"].append([before, criterion.epoch])

    criterion.close()
    dist.barrier()
    dist.destroy_process_group()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--session", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = run(args.target, args.session, args.seed, args.epochs)
    with open(args.out, "w") as file:
        json.dump(result, file)


if __name__ == "__main__":
    main()
