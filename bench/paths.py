"""The timed paths. Each makes a step (one forward+backward, the server's fused equivalent, or one
bare gRPC round trip) for a shape.

A path that the installed client does not support raises :class:`Unavailable` with
the reason, and the table says so instead of a figure.

Paths belong to one of two sections (:attr:`Path.per_byte`): the OLS paths run on the harness's
``--shapes``; the per-byte paths (label smoothing, bfloat16 wire) run on ``--per-byte-shapes``,
shapes whose C x C OLS state would not fit (see :mod:`bench.harness`).
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
from bench.baseline import ReferenceOLS
from bench.echo_server import EchoStream
from lossd import _kernels
from lossd import functional as LF
from lossd._kernels import MathKernel

ALPHA = 0.5
SMOOTHING = 0.1
LABEL_BYTES = 8  # the labels travel as int64


class Unavailable(Exception):
    """This path cannot run here (the client lacks the option, no server, ...)."""


@dataclass
class Context:
    device: torch.device
    target: str | None  # the lossd child server's address; None: no remote paths
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # --local/--stream/--cached-kwargs overrides
    math_kernel: MathKernel = "auto"  # server_math's and the cached path's kernel (--math-kernel)
    echo_target: str | None = None  # the echo child server's address; None: no echo paths


@dataclass
class Step:
    run: Callable[[], None]
    close: Callable[[], None] = lambda: None
    kwargs: dict[str, Any] = field(default_factory=dict)  # the client options the path used
    note: Callable[[], str] | None = None  # read after timing, e.g. which transport was really used


@dataclass(frozen=True)
class Path:
    name: str
    description: str
    make: Callable[[Context, int, int], Step]
    per_byte: bool = False  # runs on --per-byte-shapes instead of --shapes


def batch(
    n: int, c: int, device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (a leaf that requires grad) and labels; about half the rows predicted correctly,
    so the OLS statistics update does real work."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=generator)
    logits = torch.randn(n, c, generator=generator)
    logits[torch.arange(n), labels] += 3.0
    return logits.to(device=device, dtype=dtype).requires_grad_(), labels.to(device)


def wire_bytes(n: int, c: int, dtype: torch.dtype) -> tuple[int, int]:
    """(request, response) payload bytes of one training step: logits and int64 labels, then the gradient."""
    element = torch.empty((), dtype=dtype).element_size()
    return n * c * element + n * LABEL_BYTES, n * c * element


def _backward_step(logits: torch.Tensor, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        logits.grad = None  # as zero_grad(set_to_none=True): no accumulation into .grad
        loss_fn().backward()  # type: ignore[no-untyped-call]

    return run


def torch_ls(ctx: Context, n: int, c: int) -> Step:
    logits, labels = batch(n, c, ctx.device)
    return Step(_backward_step(logits, lambda: F.cross_entropy(logits, labels, label_smoothing=SMOOTHING)))


def reference_ols(ctx: Context, n: int, c: int) -> Step:
    logits, labels = batch(n, c, ctx.device)
    module = ReferenceOLS(ALPHA, c, SMOOTHING).to(ctx.device).train()
    return Step(_backward_step(logits, lambda: module(logits, labels)))


def _kernel_note(kernel: MathKernel, device: torch.device) -> Callable[[], str]:
    """What ``kernel`` runs on ``device``, in words (read after timing, as other notes are)."""

    def note() -> str:
        try:
            return f"math kernel {kernel}: {_kernels.describe(kernel, device)}"
        except Exception as error:  # fused asked for where it cannot load: the path says "failed" too
            return f"math kernel {kernel}: {type(error).__name__}: {error}"

    return note


def _server_math(kernel: Callable[[Context], MathKernel]) -> Callable[[Context, int, int], Step]:
    """What the server computes per OLS training request, in-process, without RPC or decoding:
    loss + gradient (``online_label_smoothing``), then the statistics (``add_statistics``: the
    correct rows' probabilities into the accumulator and the counts, one kernel call after a fused
    output). No gradient cast: that is the transport's."""

    def make(ctx: Context, n: int, c: int) -> Step:
        chosen = kernel(ctx)
        logits, labels = batch(n, c, ctx.device)
        z = logits.detach()
        soft = LF.initial_soft_labels(c, SMOOTHING, device=ctx.device)
        accumulator = torch.zeros(c, c, dtype=torch.float64, device=ctx.device)
        counts = torch.zeros(c, dtype=torch.int64, device=ctx.device)

        def run() -> None:
            output = LF.online_label_smoothing(z, labels, soft, alpha=ALPHA, kernel=chosen)
            LF.add_statistics(output, labels, accumulator, counts)

        return Step(run, kwargs={"kernel": chosen}, note=_kernel_note(chosen, ctx.device))

    return make


server_math = _server_math(lambda ctx: ctx.math_kernel)
server_math_eager = _server_math(lambda ctx: "eager")


def ls_server_math(ctx: Context, n: int, c: int) -> Step:
    """What the server does per label-smoothing request (session._forward for a ``LabelSmoothingLoss``
    session: 1 - eps on the target, eps / (C - 1) elsewhere), on the bfloat16 logits it decodes:
    loss and gradient in float32. No statistics (label smoothing keeps none), no gradient cast."""
    logits, labels = batch(n, c, ctx.device, torch.bfloat16)
    z = logits.detach()

    def run() -> None:
        LF.smoothed_cross_entropy(z, labels, smoothing=SMOOTHING, convention="off_target", kernel=ctx.math_kernel)

    return Step(run, kwargs={"kernel": ctx.math_kernel}, note=_kernel_note(ctx.math_kernel, ctx.device))


# The epoch-cached mode's keyword: the first one the client accepts wins; --cached-kwargs (JSON)
# overrides the guess.
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


def _override(kind: str, ctx: Context) -> dict[str, Any] | None:
    """--KIND-kwargs, else $LOSSD_BENCH_KIND_KWARGS (JSON), else None."""
    if kind in ctx.options:
        return ctx.options[kind]
    env = os.environ.get(f"LOSSD_BENCH_{kind.upper()}_KWARGS")
    return dict(json.loads(env)) if env else None


def local_option(ctx: Context) -> dict[str, Any]:
    """The keyword arguments of the same-host local transport (Unix socket + sealed memfd), or Unavailable."""
    override = _override("local", ctx)
    if override is not None:
        return override
    if "transport" in accepted_keywords():
        return {"transport": "local"}
    raise Unavailable("the client has no transport= keyword yet (pass --local-kwargs JSON once it has one)")


def grpc_option(ctx: Context) -> dict[str, Any]:
    """The keyword arguments that keep the tensors on the gRPC LossStream: ``transport="grpc"``; a client
    without ``transport`` gets ``shared_memory=False`` where it has that (its same-host default), else nothing."""
    override = _override("stream", ctx)
    if override is not None:
        return override
    accepted = accepted_keywords()
    if "transport" in accepted:
        return {"transport": "grpc"}
    return {"shared_memory": False} if "shared_memory" in accepted else {}


def cached_option(ctx: Context) -> dict[str, Any]:
    """The keyword arguments of the epoch-cached mode, with ``math_kernel=`` (--math-kernel) where the client
    takes it, or Unavailable. --cached-kwargs (or $LOSSD_BENCH_CACHED_KWARGS) is taken as it is."""
    override = _override("cached", ctx)
    if override is not None:
        return override
    accepted = accepted_keywords()
    for candidate in CACHED_CANDIDATES:
        if set(candidate) <= accepted:
            return {**candidate, "math_kernel": ctx.math_kernel} if "math_kernel" in accepted else candidate
    raise Unavailable("the client has no epoch-cached mode option (pass --cached-kwargs JSON once it has one)")


def _transport_note(module: lossd.nn.RemoteLoss, wanted: str) -> str:
    """Which transport the module really used, where it says (``module.transport``)."""
    try:
        used = module.transport
    except AttributeError:
        return "transport not observable (the module has no .transport)"
    except Exception as error:  # a property that fails tells something too
        return f"module.transport failed: {type(error).__name__}: {error}"
    return f"transport {used!r}" + ("" if used == wanted else f" (NOT {wanted!r})")


def _remote(
    dtype: torch.dtype, option: Callable[[Context], dict[str, Any]], wanted: str | None = None
) -> Callable[[Context, int, int], Step]:
    """An OLS module on the lossd child server; ``wanted``: the transport the note checks."""

    def make(ctx: Context, n: int, c: int) -> Step:
        if ctx.target is None:
            raise Unavailable("no server (remote paths not requested)")
        extra = option(ctx)
        logits, labels = batch(n, c, ctx.device, dtype)
        try:
            module = lossd.OnlineLabelSmoothing(ALPHA, c, SMOOTHING, target=ctx.target, **extra)
        except TypeError as error:  # a guessed keyword that means something else
            raise Unavailable(f"OnlineLabelSmoothing(**{extra}) failed: {error}") from error
        module.train()
        note = (lambda: _transport_note(module, wanted)) if wanted else None
        return Step(_backward_step(logits, lambda: module(logits, labels)), module.close, extra, note)

    return make


def remote_ls_bf16(ctx: Context, n: int, c: int) -> Step:
    if ctx.target is None:
        raise Unavailable("no server (remote paths not requested)")
    extra = grpc_option(ctx)
    logits, labels = batch(n, c, ctx.device, torch.bfloat16)
    try:
        module = lossd.LabelSmoothingLoss(c, SMOOTHING, target=ctx.target, **extra)
    except TypeError as error:
        raise Unavailable(f"LabelSmoothingLoss(**{extra}) failed: {error}") from error
    return Step(_backward_step(logits, lambda: module(logits, labels)), module.close, extra)


def _echo(dtype: torch.dtype) -> Callable[[Context, int, int], Step]:
    """One round trip on an open stream to the bare echo server: a training request's bytes out, a gradient's back."""

    def make(ctx: Context, n: int, c: int) -> Step:
        if ctx.echo_target is None:
            raise Unavailable("no echo server (echo paths not requested)")
        request, response = wire_bytes(n, c, dtype)
        stream = EchoStream(ctx.echo_target, request, response)
        return Step(stream.round_trip, stream.close, note=lambda: f"{request} B out, {response} B back per step")

    return make


PATHS: dict[str, Path] = {
    path.name: path
    for path in (
        Path("torch_ls", "torch F.cross_entropy(label_smoothing=0.1) fwd+bwd, local", torch_ls),
        Path(
            "reference_ols",
            "the reference OLS module (ankandrew/online-label-smoothing-pt), fwd+bwd",
            reference_ols,
        ),
        Path(
            "server_math",
            "lossd.functional OLS loss+grad + add_statistics, kernel=--math-kernel, in-process, no RPC",
            server_math,
        ),
        Path(
            "server_math_eager",
            "the same with kernel='eager' (torch ops)",
            server_math_eager,
        ),
        Path(
            "remote_local",
            "lossd.OnlineLabelSmoothing fwd+bwd, transport='local' (Unix socket + memfd), float32",
            _remote(torch.float32, local_option, "local"),
        ),
        Path(
            "remote_f32",
            "lossd.OnlineLabelSmoothing fwd+bwd, transport='grpc' (TCP loopback stream), float32 wire",
            _remote(torch.float32, grpc_option),
        ),
        Path(
            "remote_bf16",
            "lossd.OnlineLabelSmoothing fwd+bwd, transport='grpc' (TCP loopback stream), bfloat16 wire",
            _remote(torch.bfloat16, grpc_option),
        ),
        Path("grpc_echo", "bare gRPC bytes echo on one stream, float32 request/gradient sizes", _echo(torch.float32)),
        Path(
            "cached",
            "lossd.OnlineLabelSmoothing fwd+bwd, epoch-cached client mode",
            _remote(torch.float32, cached_option),
        ),
        Path(
            "ls_server_math",
            "lossd.functional label-smoothing loss+grad of bfloat16 logits, kernel=--math-kernel, in-process, no RPC",
            ls_server_math,
            per_byte=True,
        ),
        Path(
            "remote_ls_bf16",
            "lossd.LabelSmoothingLoss fwd+bwd, transport='grpc' (TCP loopback stream), bfloat16 wire",
            remote_ls_bf16,
            per_byte=True,
        ),
        Path(
            "grpc_echo_bf16",
            "bare gRPC bytes echo on one stream, bfloat16 request/gradient sizes",
            _echo(torch.bfloat16),
            per_byte=True,
        ),
    )
}
REMOTE = frozenset({"remote_local", "remote_f32", "remote_bf16", "cached", "remote_ls_bf16"})
ECHO = frozenset({"grpc_echo", "grpc_echo_bf16"})
