"""The loss kernels a test can run: the eager math, the device's fused kernel, and Triton's (on the CPU
through its interpreter, which tests/conftest.py switches on without a GPU)."""

from __future__ import annotations

from typing import Any

import pytest

from lossd._fused import Backend
from lossd._kernels import MathKernel

Kernel = MathKernel | Backend


def triton_backend() -> Backend | None:
    """The Triton kernel where it runs on CPU tensors: through its interpreter (the functional tests'
    tensors are on the CPU; compiled on a GPU, tests/test_fused_triton.py covers it on CUDA tensors)."""
    from lossd import _fused_triton

    if _fused_triton.available() is not None or not _fused_triton._INTERPRETED:
        return None
    return _fused_triton.BACKEND


def _triton_reason() -> str:
    from lossd import _fused_triton

    failure = _fused_triton.available()
    if failure is not None:
        return f"triton: {failure}"
    return "the Triton kernel is compiled for CUDA here (tests/test_fused_triton.py runs it on CUDA tensors)"


# Functional tests take each; "fused" is numba on the CPU, a hard dependency, so it never skips.
KERNEL_PARAMS: list[Any] = [
    "eager",
    "fused",
    pytest.param("triton", marks=pytest.mark.skipif(triton_backend() is None, reason=_triton_reason())),
]


def kernel_of(name: str) -> Kernel:
    if name == "triton":
        backend = triton_backend()
        assert backend is not None
        return backend
    return name  # type: ignore[return-value]
