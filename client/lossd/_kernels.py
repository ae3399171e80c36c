"""Which code computes the loss: the eager torch ops, or a fused kernel for the device.

``auto`` takes the fused kernel where it loads (numba on the CPU, Triton on CUDA) and
the eager math otherwise, and logs once per device kind which one it uses and why;
``fused`` insists (an error where the kernel cannot load); ``eager`` never tries.
Loading compiles on first use, or reads numba's on-disk cache, so a server warms the
kernel up at start-up (:func:`warm_up`) and no training step waits for a compiler.
"""

from __future__ import annotations

import logging
import threading
from typing import Literal, get_args

import torch

from lossd._fused import Backend

MathKernel = Literal["auto", "fused", "eager"]
MATH_KERNELS: tuple[str, ...] = get_args(MathKernel)

log = logging.getLogger("lossd")
_lock = threading.Lock()
_reported: set[str] = set()
_loaded: dict[str, Backend] = {}  # device kind -> its fused kernel, once it has loaded (every step asks)


class KernelUnavailableError(ValueError):
    """``fused`` was asked for where the device's fused kernel cannot load (a setting that cannot be met)."""


def _backend(device_type: str) -> tuple[Backend | None, str | None]:
    """(the fused kernel of a device kind, None) or (None, why it cannot load)."""
    if device_type == "cpu":
        from lossd import _fused_cpu

        failure = _fused_cpu.available()
        return (None, f"numba: {failure}") if failure else (_fused_cpu.BACKEND, None)
    if device_type == "cuda":
        from lossd import _fused_triton

        failure = _fused_triton.available()
        return (None, f"triton: {failure}") if failure else (_fused_triton.BACKEND, None)
    return None, f"no fused kernel for {device_type} devices"


def check_choice(kernel: str) -> MathKernel:
    if kernel not in MATH_KERNELS:
        raise ValueError(f"Expected math_kernel to be 'auto', 'fused' or 'eager' but got {kernel!r}")
    return kernel  # type: ignore[return-value]


def resolve(kernel: MathKernel | Backend, device: torch.device) -> Backend | None:
    """The fused kernel to run on ``device``, or None for the eager math. A backend object is taken as it
    is (tests run the Triton kernel on the CPU through its interpreter so)."""
    if not isinstance(kernel, str):
        return kernel
    if kernel in ("auto", "fused"):
        loaded = _loaded.get(device.type)
        if loaded is not None:
            return loaded
    if check_choice(kernel) == "eager":
        return None
    backend, failure = _backend(device.type)
    if backend is not None:
        _loaded[device.type] = backend
        return backend
    if kernel == "fused":
        raise KernelUnavailableError(f"math_kernel='fused': the fused kernel cannot load on {device.type} ({failure})")
    with _lock:
        if device.type not in _reported:
            _reported.add(device.type)
            log.info("lossd: math kernel auto on %s: eager (%s)", device.type, failure)
    return None


def describe(kernel: MathKernel, device: torch.device) -> str:
    """What ``kernel`` runs on ``device``, in words: "fused (numba)", or "eager (why not fused)"."""
    if kernel == "eager":
        return "eager (asked for)"
    backend, failure = _backend(device.type)
    if backend is not None:
        return f"fused ({backend.name})"
    if kernel == "fused":
        raise KernelUnavailableError(f"--math-kernel fused: the fused kernel cannot load on {device.type} ({failure})")
    return f"eager ({failure})"


def warm_up(kernel: MathKernel, device: torch.device) -> str:
    """Load (compile or read from cache) the kernel ``kernel`` picks for ``device`` now; say which it is."""
    return describe(check_choice(kernel), device)
