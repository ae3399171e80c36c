"""Distributed data parallel training where every rank shares one OLS soft-label matrix.

    lossd serve &
    torchrun --nproc-per-node 2 examples/torchrun_ols.py --target localhost:50051 --session run-1

Each rank trains on its own shard. The loss module reads its rank and world size
from torch.distributed; naming the session is the only change from one process.
next_epoch() is a barrier: the server publishes S once every rank has finished
the epoch, from all of their batches, so every rank trains on the same S.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch import nn

from lossd import Client, OnlineLabelSmoothing


def blobs(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.randn(10, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 10, (n,), generator=generator)
    return centres[labels] + 1.5 * torch.randn(n, 32, generator=generator), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="localhost:50051")
    parser.add_argument("--session", default="torchrun-example")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # env:// from torchrun
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = blobs(1024, torch.Generator().manual_seed(1 + rank))  # this rank's shard
    with OnlineLabelSmoothing(alpha=0.5, n_classes=10, smoothing=0.1, session=args.session, target=args.target) as ols:
        for epoch in range(args.epochs):
            for batch in torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch)).split(128):
                loss = ols(model(x[batch]), y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            ols.next_epoch()  # waits for every rank
            diagonal = ols.supervise.diagonal()
            print(f"rank {rank}/{world_size} epoch {epoch}: S diagonal mean {diagonal.mean():.4f}", flush=True)
    dist.barrier()
    if rank == 0:
        with Client(args.target) as client:
            client.delete_session(args.session)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
