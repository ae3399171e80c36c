"""The timed paths. Each makes a step (one forward+backward, or the server's fused equivalent) for a shape.

A path that the installed client does not support raises :class:`Unavailable` with
the reason, and the table says so instead of a figure.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

import lossd
from bench.baseline import AutogradOLS
from lossd import functional as LF

ALPHA = 0.5
SMOOTHING = 0.1


class Unavailable(Exception):
    """This path cannot run here (the client lacks the option, no server, ...)."""


@dataclass
class Context:
    device: torch.device
    target: str | None  # the child server's address; None: no remote paths
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # --shm-kwargs / --cached-kwargs overrides
    compile_math: bool = False  # server_math through torch.compile (--compile-math)


@dataclass
class Step:
    run: Callable[[], None]
    close: Callable[[], None] = lambda: None
    kwargs: dict[str, Any] = field(default_factory=dict)  # the client options the path used
    note: Callable[[], str] | None = None  # read after timing, e.g. whether shared memory was really used


@dataclass(frozen=True)
class Path:
    name: str
    description: str
    make: Callable[[Context, int, int], Step]


def batch(
    n: int, c: int, device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (a leaf that requires grad) and labels; about half the rows predicted correctly,
    so the OLS statistics update does real work."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=generator)
    logits = torch.randn(n, c, generator=generator) + 3 * F.one_hot(labels, c)
    return logits.to(device=device, dtype=dtype).requires_grad_(), labels.to(device)


def _backward_step(logits: torch.Tensor, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        logits.grad = None  # as zero_grad(set_to_none=True): no accumulation into .grad
        loss_fn().backward()  # type: ignore[no-untyped-call]

    return run


def torch_ls(ctx: Context, n: int, c: int) -> Step:
    logits, labels = batch(n, c, ctx.device)
    return Step(_backward_step(logits, lambda: F.cross_entropy(logits, labels, label_smoothing=SMOOTHING)))


def autograd_ols(ctx: Context, n: int, c: int) -> Step:
    logits, labels = batch(n, c, ctx.device)
    module = AutogradOLS(ALPHA, c, SMOOTHING, device=ctx.device).train()
    return Step(_backward_step(logits, lambda: module(logits, labels)))


def server_math(ctx: Context, n: int, c: int) -> Step:
    """What the server does per training request, in-process, without RPC or decoding:
    the fused loss + gradient, then the statistics update (session.compute)."""
    logits, labels = batch(n, c, ctx.device)
    z = logits.detach()
    soft = LF.initial_soft_labels(c, SMOOTHING, device=ctx.device)
    accumulator = torch.zeros(c, c, dtype=torch.float64, device=ctx.device)
    counts = torch.zeros(c, dtype=torch.int64, device=ctx.device)

    def run() -> None:
        output = LF.online_label_smoothing(z, labels, soft, alpha=ALPHA, compiled=ctx.compile_math)
        rows, probs = LF.correct_rows(output, labels)
        accumulator.index_add_(0, rows, probs)
        counts.index_add_(0, rows, torch.ones_like(rows))

    return Step(run)


# Client options that may exist (other issues add them): the first keyword the client
# accepts wins; --shm-kwargs / --cached-kwargs (JSON) override the guess.
SHM_CANDIDATES: tuple[dict[str, Any], ...] = (
    {"shared_memory": True},
    {"transport": "shm"},
    {"transport": "shared_memory"},
    {"shm": True},
)
CACHED_CANDIDATES: tuple[dict[str, Any], ...] = (
    {"mode": "cached"},
    {"mode": "epoch_cached"},
    {"cached": True},
    {"epoch_cached": True},
    {"epoch_cache": True},
)


def accepted_keywords() -> set[str]:
    """Keyword arguments that ``lossd.OnlineLabelSmoothing`` (through RemoteLoss) and ``lossd.Client`` take."""
    names: set[str] = set()
    for function in (lossd.OnlineLabelSmoothing.__init__, lossd.nn.RemoteLoss.__init__, lossd.Client.__init__):
        for parameter in inspect.signature(function).parameters.values():
            if parameter.kind is parameter.KEYWORD_ONLY or parameter.kind is parameter.POSITIONAL_OR_KEYWORD:
                names.add(parameter.name)
    return names


def client_option(kind: str, ctx: Context) -> dict[str, Any]:
    """The keyword arguments that turn on ``kind`` ('shm' or 'cached'), or Unavailable."""
    if kind in ctx.options:
        return ctx.options[kind]
    env = os.environ.get(f"LOSSD_BENCH_{kind.upper()}_KWARGS")
    if env:
        return dict(json.loads(env))
    accepted = accepted_keywords()
    for candidate in SHM_CANDIDATES if kind == "shm" else CACHED_CANDIDATES:
        if set(candidate) <= accepted:
            return candidate
    what = "shared-memory transport" if kind == "shm" else "epoch-cached mode"
    raise Unavailable(f"the client has no {what} option (pass --{kind}-kwargs JSON once it has one)")


def stream_option(ctx: Context) -> dict[str, Any]:
    """Keyword arguments that keep the tensors on the stream (TCP): shared memory, where the client
    has it, is on by default on the same host, so the TCP paths turn it off."""
    if "stream" in ctx.options:
        return ctx.options["stream"]
    return {"shared_memory": False} if "shared_memory" in accepted_keywords() else {}


def _shm_note(module: lossd.OnlineLabelSmoothing) -> str:
    """Whether the module's stream really attached a shared-memory segment (best effort: private attributes)."""
    stream = getattr(getattr(module.client, "_connection", None), "_stream", None)
    if stream is None or not hasattr(stream, "shm_attaches"):
        return "shared-memory use not observable"
    if getattr(stream, "shm_segment", None) is not None or stream.shm_attaches:
        return "shared memory attached"
    return f"shared memory NOT used: {getattr(stream, 'shm_refusal', None) or 'no segment'}"


def _remote(dtype: torch.dtype, option: str | None = None) -> Callable[[Context, int, int], Step]:
    def make(ctx: Context, n: int, c: int) -> Step:
        if ctx.target is None:
            raise Unavailable("no server (remote paths not requested)")
        extra = client_option(option, ctx) if option else stream_option(ctx)
        logits, labels = batch(n, c, ctx.device, dtype)
        try:
            module = lossd.OnlineLabelSmoothing(ALPHA, c, SMOOTHING, target=ctx.target, **extra)
        except TypeError as error:  # a guessed keyword that means something else
            raise Unavailable(f"OnlineLabelSmoothing(**{extra}) failed: {error}") from error
        module.train()
        note = (lambda: _shm_note(module)) if option == "shm" else None
        return Step(_backward_step(logits, lambda: module(logits, labels)), module.close, extra, note)

    return make


PATHS: dict[str, Path] = {
    path.name: path
    for path in (
        Path("torch_ls", "torch F.cross_entropy(label_smoothing=0.1) fwd+bwd, local", torch_ls),
        Path("autograd_ols", "autograd OLS module fwd+bwd (bench/baseline.py), local", autograd_ols),
        Path("server_math", "lossd.functional fused OLS loss+grad+stats, in-process, no RPC", server_math),
        Path(
            "remote_f32",
            "lossd.OnlineLabelSmoothing fwd+bwd, TCP loopback stream, float32 wire",
            _remote(torch.float32),
        ),
        Path(
            "remote_bf16",
            "lossd.OnlineLabelSmoothing fwd+bwd, TCP loopback stream, bfloat16 wire",
            _remote(torch.bfloat16),
        ),
        Path(
            "remote_shm", "lossd.OnlineLabelSmoothing fwd+bwd, shared-memory transport", _remote(torch.float32, "shm")
        ),
        Path(
            "cached", "lossd.OnlineLabelSmoothing fwd+bwd, epoch-cached client mode", _remote(torch.float32, "cached")
        ),
    )
}
REMOTE = frozenset({"remote_f32", "remote_bf16", "remote_shm", "cached"})
