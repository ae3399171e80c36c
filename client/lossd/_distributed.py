"""Which rank this process is, and of how many, for sessions shared by distributed workers."""

from __future__ import annotations

import os

import torch.distributed as dist


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_ranks(world_size: int | None, rank: int | None) -> tuple[int, int]:
    """(world_size, rank): the arguments when given, else an initialised torch.distributed,
    else the RANK / WORLD_SIZE variables torchrun sets, else (1, 0)."""
    if (world_size is None) != (rank is None):
        raise ValueError("give both world_size and rank, or neither (then they come from torch.distributed)")
    if world_size is None or rank is None:
        if dist.is_available() and dist.is_initialized():
            world_size, rank = dist.get_world_size(), dist.get_rank()
        else:
            env_world_size, env_rank = _env_int("WORLD_SIZE"), _env_int("RANK")
            world_size, rank = (env_world_size, env_rank or 0) if env_world_size is not None else (1, 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"expected world_size >= 1 and 0 <= rank < world_size but got {world_size=}, {rank=}")
    return world_size, rank


def barrier_if_initialised() -> None:
    """Wait for every rank, when the processes form a torch.distributed group."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
