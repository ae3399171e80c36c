"""Resolve ``--device``, and the budget of a CUDA device's memory (``--device-memory-bytes``)."""

from __future__ import annotations

import logging

import torch

from lossd_server.config import GiB, Settings
from lossd_server.memory import MemoryAccount

log = logging.getLogger("lossd_server")

# The default budget is this share of the device. The rest is what the budget cannot see: the CUDA
# context and kernels (~0.5-1 GiB), the caching allocator's rounding and fragmentation, and the device
# copies of the calls in flight (their logits, gradient and math, bounded by request_memory_bytes).
DEVICE_MEMORY_FRACTION = 0.8
# Never less than this beside the request budget, on a small device where 20% would not cover it.
DEVICE_RESERVE_BYTES = 1 * GiB


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} was requested but only {torch.cuda.device_count()} CUDA devices exist")
    return device


def device_total_memory(device: torch.device) -> int:
    """The device's memory in bytes (a function of its own, so tests can stand in for a GPU)."""
    return int(torch.cuda.get_device_properties(device).total_memory)


def default_device_memory_bytes(total: int, request_memory_bytes: int) -> int:
    return max(0, min(int(total * DEVICE_MEMORY_FRACTION), total - request_memory_bytes - DEVICE_RESERVE_BYTES))


def device_memory(settings: Settings, device: torch.device, request_memory_bytes: int) -> MemoryAccount | None:
    """The ``device`` account on a CUDA server; None on the CPU, where sessions charge the host accounts.

    ``--device-memory-bytes`` on a CPU server is refused rather than ignored: it says the operator meant
    the matrices to be on a GPU (``--device auto`` finding none, say), and a server that starts anyway
    would hold them in host memory under budgets nobody set for that.
    """
    if device.type != "cuda":
        if settings.device_memory_bytes is not None:
            raise ValueError(
                f"device_memory_bytes={settings.device_memory_bytes} is set but the server's device is {device}; "
                "it budgets a CUDA device's memory (unset it, or run on --device cuda)"
            )
        return None
    total = device_total_memory(device)
    limit = settings.device_memory_bytes
    if limit is None:
        limit = default_device_memory_bytes(total, request_memory_bytes)
    elif limit > total:
        raise ValueError(f"device_memory_bytes={limit} is more than {device}'s {total} bytes of memory")
    return MemoryAccount("device", limit, "device_memory_bytes")
