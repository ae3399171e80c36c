"""The loss math through ``torch.compile``: opt-in, with a fallback to eager that never fails a request.

Eager, :func:`lossd.functional.loss_terms` is about 30 torch ops, and on a CPU
their dispatch costs as much as the arithmetic at small shapes; compiled, it is a
few fused loops (C++ on the CPU, Triton on a GPU) with the same formulas, so the
same numbers to float rounding. Compiling needs a C++ compiler (and Triton on a
GPU) and takes seconds the first time per configuration; shapes are dynamic, so
a new batch size does not compile again. Where compiling fails (no compiler, an
unsupported torch), the reason is logged once and the eager code runs from then on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger("lossd")

_lock = threading.Lock()
_compiled: dict[Callable[..., Any], Callable[..., Any]] = {}
_failed: str | None = None


def compile_failure() -> str | None:
    """Why compiling failed in this process (the eager code runs instead), or None."""
    return _failed


def _as_data(value: Any) -> Any:
    """A float as a 0-dim tensor, so that dynamo traces it as an input instead of specialising the
    graph on its value (every session's alpha would compile anew, and past dynamo's cache limit
    fall back to eager silently); 0.0 stays a float, since it selects a branch."""
    return torch.tensor(value, dtype=torch.float64) if isinstance(value, float) and value != 0.0 else value


def compiled_loss_terms(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)``, compiled once per process (shapes dynamic); eager after a failure."""
    global _failed
    if _failed is None:
        data = tuple(_as_data(arg) for arg in args)
        try:
            with _lock:
                compiled = _compiled.get(function)
                if compiled is None:
                    compiled = _compiled[function] = torch.compile(function, dynamic=True)
            return compiled(*data, **kwargs)
        except Exception as error:  # no compiler, unsupported backend: the eager code gives the same answer
            _failed = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            log.warning("lossd: compiled loss math unavailable, running it eagerly: %s", _failed)
    return function(*args, **kwargs)
