"""The loss kernels a test can run: the eager math, the device's fused kernel, and Triton's (on the CPU
through its interpreter, which tests/conftest.py switches on without a GPU)."""

from __future__ import annotations

from typing import Any

import pytest

from lossd._fused import Backend
from lossd._kernels import MathKernel

Kernel = MathKernel | Backend


def triton_backend() -> Backend | None:
    try:
        from lossd import _fused_triton
    except ImportError:
        return None
    return _fused_triton.BACKEND if _fused_triton.available() is None else None


def _triton_reason() -> str:
    try:
        from lossd import _fused_triton
    except ImportError as error:
        return f"lossd._fused_triton: {error}"
    return _fused_triton.available() or ""


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
