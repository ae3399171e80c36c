"""Drop-in loss modules whose forward and backward run on a lossd server.

Each forward sends the logits and labels once; the server returns the loss and
d loss / d logits, which backward scales by ``grad_output``. So ``loss.backward()``,
GradScaler, ``reduction='none'`` and models on any device work as with a local loss.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import uuid
import weakref
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Self

import torch
from torch import nn

from lossd import _codec, functional
from lossd._cached import EpochCache, check_labels, local_gradient
from lossd._client import Client
from lossd._config import DEFAULT_BARRIER_TIMEOUT, DEFAULT_TIMEOUT, TLSConfig
from lossd._distributed import barrier_if_initialised, resolve_ranks
from lossd._exceptions import InvalidArgumentError, NotFoundError
from lossd._kernels import MathKernel, check_choice, warm_up
from lossd._retry import RetryPolicy
from lossd._spec import SessionSpec
from lossd._types import SessionInfo, SessionState
from lossd.functional import DEFAULT_IGNORE_INDEX, EmptyClassPolicy, OlsInit, Reduction, compute_dtype

log = logging.getLogger("lossd")


class _RemoteLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        labels: torch.Tensor,
        module: RemoteLoss,
        need_grad: bool,
        loss_dtype: torch.dtype,
    ) -> torch.Tensor:
        result = module.client.compute_loss(
            module.session,
            logits.detach(),
            labels.detach().to("cpu"),
            training=module.training,
            need_grad=need_grad,
            rank=module.rank,
            epoch=module._epoch if module._epoch_tagged else None,
        )
        module._epoch = result.epoch
        grad = result.scaled_grad
        ctx.grad = grad.to(logits.device) if grad is not None else None
        ctx.grad_exponent = result.grad_exponent
        ctx.per_sample = module.spec.reduction == "none"
        return result.loss.to(device=logits.device, dtype=loss_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:
        return _scaled_backward(ctx, grad_output)


def _scaled_backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:
    """The gradient times ``grad_output``, unscaled by the 2^exponent a float16 gradient travels with."""
    grad: torch.Tensor | None = ctx.grad
    if grad is None:
        return None, None, None, None, None
    # Scale in float32 before rounding to the logits' dtype, so a GradScaler-scaled
    # float16 gradient keeps the small entries a float16 product would flush.
    scale = grad_output.to(compute_dtype(grad.dtype))
    if ctx.per_sample:
        scale = scale.reshape(-1, 1)
    return _codec.unscale_gradient(grad, ctx.grad_exponent, scale), None, None, None, None


class _CachedLoss(_RemoteLoss):
    """Epoch-cached OLS: the server's math on the epoch's S, computed here; backward as the remote path's."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: torch.Tensor,
        labels: torch.Tensor,
        module: OnlineLabelSmoothing,
        need_grad: bool,
        loss_dtype: torch.dtype,
    ) -> torch.Tensor:
        cache = module._epoch_cache()
        spec = module.spec
        assert spec.alpha is not None
        if labels.dtype != torch.int64 or labels.device != logits.device:
            labels = labels.to(device=logits.device, dtype=torch.int64)
        labels = labels.detach()
        check_labels(labels, spec)
        z = logits.detach().contiguous()
        soft = cache.soft_labels(module._epoch, logits.device)
        options: dict[str, Any] = {
            "alpha": spec.alpha,
            "weight": cache.weight(logits.device),
            "ignore_index": spec.ignore_index,
            "reduction": spec.reduction,
            "kernel": module.math_kernel,
        }
        # Training: the fused kernel adds the statistics in the same call (only if the batch is accepted).
        accumulate = cache.statistics_buffers(module._epoch, logits.device) if module.training else None
        output = functional.online_label_smoothing(
            z, labels, soft, need_grad=need_grad, accumulate=accumulate, **options
        )
        if not output.finite and not bool(torch.isfinite(logits).all()):
            raise InvalidArgumentError("logits: contains NaN or infinity")
        if module.training:
            cache.record(output, labels, module._epoch)
        ctx.grad, ctx.grad_exponent = (None, 0) if output.grad is None else local_gradient(output.grad, logits.dtype)
        ctx.per_sample = spec.reduction == "none"
        ctx.handed_over = False

        def recompute() -> torch.Tensor:
            again = functional.online_label_smoothing(z, labels, soft, need_grad=True, **options)
            assert again.grad is not None
            return local_gradient(again.grad, logits.dtype)[0]

        ctx.recompute = recompute
        return output.loss.to(device=logits.device, dtype=loss_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:
        if ctx.handed_over:  # a second backward through the same graph (retain_graph=True)
            ctx.grad, ctx.handed_over = ctx.recompute(), False
        grad: torch.Tensor | None = ctx.grad
        if grad is not None and _is_one(grad_output) and not ctx.grad_exponent:
            # loss.backward(): d loss / d z is the gradient itself. Handed over rather than multiplied by 1,
            # so autograd takes it as .grad without a copy (nothing else refers to it); torch's own loss
            # backward writes [N, C] once, and so does this.
            ctx.grad, ctx.handed_over = None, True
            return grad, None, None, None, None
        return _scaled_backward(ctx, grad_output)


def _is_one(grad_output: torch.Tensor) -> bool:
    """A scalar 1 on the CPU (reading a CUDA value would wait for the device)."""
    return grad_output.device.type == "cpu" and grad_output.numel() == 1 and float(grad_output) == 1.0


def _unchanged(loss: torch.Tensor) -> torch.Tensor:
    return loss


def _class_dim_last(input: torch.Tensor, dim: int) -> torch.Tensor:
    """``input`` with dim ``dim`` moved last; itself when it is last already, so backward has no permute node."""
    last = input.dim() - 1
    return input if last >= 0 and dim in (last, -1) else input.movedim(dim, -1)


def _private_name() -> str:
    return f"private-{uuid.uuid4().hex}"


def _close_quietly(client: Client, owns_client: bool, private_session: str | None) -> None:
    if private_session is not None and not client.closed:
        with contextlib.suppress(Exception):  # best effort at garbage collection; the server may be gone
            client.delete_session(private_session, retry=False)
    if owns_client:
        client.close()


class RemoteLoss(nn.Module):
    """Base class: one server session per module, one channel per module unless ``client`` is shared.

    ``session=None`` creates a private session that is deleted on :meth:`close`;
    a named session outlives the module, and a module created with the name of an
    existing session (same spec) joins it as it stands. The connection options
    (``timeout``, ``retry_deadline``, ``barrier_timeout``, ``token``, ``tls``, ``transport``,
    ``local_socket``) are those of :class:`lossd.Client`; :attr:`transport` says which way steps travel.
    """

    # Whether requests carry the module's epoch, so the server refuses them once the epoch is over.
    _epoch_tagged = False

    def __init__(
        self,
        spec: SessionSpec,
        *,
        target: str | None = None,
        session: str | None = None,
        client: Client | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        retry_deadline: float = RetryPolicy.deadline,
        barrier_timeout: float | None = DEFAULT_BARRIER_TIMEOUT,
        token: str | None = None,
        tls: TLSConfig | bool | None = None,
        transport: str | None = None,
        local_socket: str | None = None,
        rank: int = 0,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.rank = rank
        self._private = session is None
        self.session = session or _private_name()
        if client is None:
            client = Client(
                target,
                timeout=timeout,
                retry_deadline=retry_deadline,
                barrier_timeout=barrier_timeout,
                token=token,
                tls=tls,
                transport=transport,
                local_socket=local_socket,
            )
            self._connect(client, owns_client=True)
        else:
            self._connect(client, owns_client=False)
        if spec.n_classes:
            self._create_session(spec.n_classes)

    def _connect(self, client: Client, *, owns_client: bool) -> None:
        self.client = client
        self._epoch = 0
        self._created = False
        # Runs on close() or garbage collection, without keeping the module alive.
        private_session = self.session if self._private else None
        self._finalizer = weakref.finalize(self, _close_quietly, client, owns_client, private_session)

    # A module holds a live channel, which cannot be copied: a copy (copy.deepcopy,
    # torch.save of a model holding the loss) reconnects to the same target, joins a
    # named session at its first forward, and gets a fresh session of its own if private.
    # The token is never pickled, so a checkpoint holds no secret: an unpickled module takes
    # LOSSD_TOKEN; an in-process copy.deepcopy keeps the token.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())  # type: ignore[no-untyped-call]
        config = self.client.config
        state.update(
            client=None,
            _finalizer=None,
            _reconnect=(config.target, config.timeout, config.retry.deadline, config.barrier_timeout, config.tls),
            _transport=(config.transport, config.local_socket),
        )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Modules pickled before TLS support carry four settings.
        target, timeout, retry_deadline, barrier_timeout, *tls = state.pop("_reconnect")
        token = state.pop("_token", None)
        state.pop("_shared_memory", None)  # modules pickled before the local transport
        transport, local_socket = state.pop("_transport", (None, None))
        super().__setstate__(state)  # type: ignore[no-untyped-call]
        if self._private:
            self.session = _private_name()
        client = Client(
            target,
            timeout=timeout,
            retry_deadline=retry_deadline,
            barrier_timeout=barrier_timeout,
            token=token,
            tls=(tls[0] or False) if tls else None,  # the original's TLS settings, plaintext included
            transport=transport,
            local_socket=local_socket,
        )
        self._connect(client, owns_client=True)

    def __deepcopy__(self, memo: dict[int, Any]) -> Self:
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        state = copy.deepcopy(self.__getstate__(), memo)
        state["_token"] = self.client.config.token
        clone.__setstate__(state)
        return clone

    def _create_session(self, n_classes: int) -> None:
        """Get-or-create the session; torch-style modules that are not told C do it at the first forward."""
        info, _ = self.client.create_session(self.session, dataclasses.replace(self.spec, n_classes=n_classes))
        self.spec, self._epoch, self._created = info.spec, info.epoch, True

    @property
    def transport(self) -> str:
        """``"local"`` or ``"grpc"``: how this module's loss steps travel (see :class:`lossd.Client`)."""
        return self.client.transport

    @property
    def epoch(self) -> int:
        """The session epoch of the last response this module saw."""
        return self._epoch

    def info(self) -> SessionInfo:
        info = self.client.get_session(self.session)
        self._epoch = info.epoch
        return info

    def _flatten(
        self, input: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """([M, C] logits, [M] labels, the inverse for per-sample losses). Class dim last by default."""
        if input.dim() == 2 and target.dim() == 1:  # already flat: a reshape would add a view node to backward
            return input, target, _unchanged
        out_shape = input.shape[:-1]
        return input.reshape(-1, input.shape[-1]), target.reshape(-1), lambda loss: loss.reshape(out_shape)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.is_floating_point():
            raise TypeError(
                f"lossd losses take class-index targets (int64); got a {target.dtype} target. "
                "Probability (soft) targets are not supported."
            )
        logits, labels, unflatten = self._flatten(input, target)
        if not self._created:
            self._create_session(logits.shape[1])
        need_grad = input.requires_grad and torch.is_grad_enabled()
        # Under autocast torch computes cross-entropy in float32 and returns a float32
        # loss; a float16 loss would round it and overflow under GradScaler's 2^16 scale.
        autocast = logits.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(logits.device.type)
        loss_dtype = compute_dtype(logits.dtype) if autocast else logits.dtype
        try:
            loss = self._loss(logits, labels, need_grad, loss_dtype)
        except NotFoundError:
            if self.spec.kind == "online_label_smoothing":
                raise  # its soft labels are gone: recreating it would silently restart OLS
            # A stateless session lost with a server restart holds nothing to lose.
            self._create_session(logits.shape[1])
            loss = self._loss(logits, labels, need_grad, loss_dtype)
        return unflatten(loss) if self.spec.reduction == "none" else loss

    def _loss(
        self, logits: torch.Tensor, labels: torch.Tensor, need_grad: bool, loss_dtype: torch.dtype
    ) -> torch.Tensor:
        loss: torch.Tensor = _RemoteLoss.apply(logits, labels, self, need_grad, loss_dtype)  # type: ignore[no-untyped-call]
        return loss

    def close(self) -> None:
        """Close the channel (if this module opened it) and delete a private session."""
        self._finalizer()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def extra_repr(self) -> str:
        ranks = f", rank={self.rank}/{self.spec.world_size}" if self.spec.world_size > 1 else ""
        return f"session={self.session!r}, target={self.client.target!r}{ranks}"


def _comparable(value: Any) -> Any:
    # Spec values survive torch.save/load as lists where the dataclass has tuples.
    return tuple(value) if isinstance(value, list | tuple) else value


def _weight_tuple(weight: torch.Tensor | None) -> tuple[float, ...] | None:
    return None if weight is None else tuple(float(w) for w in weight.detach().to("cpu", torch.float64).reshape(-1))


class CrossEntropyLoss(RemoteLoss):
    """``torch.nn.CrossEntropyLoss`` computed by lossd: input [N, C, d1, ...] or [C], target [N, d1, ...] or [].

    The session is created at the first forward unless ``n_classes`` (or ``weight``) tells C up front.
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        ignore_index: int = DEFAULT_IGNORE_INDEX,
        reduction: Reduction = "mean",
        label_smoothing: float = 0.0,
        *,
        n_classes: int | None = None,
        **connection: Any,
    ) -> None:
        if n_classes is None and weight is not None:
            n_classes = weight.numel()
        spec = SessionSpec(
            kind="label_smoothing" if label_smoothing else "cross_entropy",
            n_classes=n_classes or 0,  # 0: learnt from the first input
            smoothing=label_smoothing,
            convention="uniform",
            reduction=reduction,
            ignore_index=ignore_index,
            weight=_weight_tuple(weight),
        )
        super().__init__(spec, **connection)
        self.register_buffer("weight", weight)
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing

    def _flatten(
        self, input: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        if input.dim() == 1:  # unbatched [C] with a scalar target
            return input.unsqueeze(0), target.reshape(1), lambda loss: loss.reshape(())
        return super()._flatten(_class_dim_last(input, 1), target)


class LabelSmoothingLoss(RemoteLoss):
    """The common ``LabelSmoothingLoss(classes, smoothing, dim)`` snippet: 1 - eps on the target,
    eps / (C - 1) elsewhere, averaged over samples (not the ``KLDivLoss`` 'mean' scale)."""

    def __init__(
        self,
        classes: int,
        smoothing: float = 0.0,
        dim: int = -1,
        *,
        reduction: Reduction = "mean",
        ignore_index: int = DEFAULT_IGNORE_INDEX,
        weight: torch.Tensor | None = None,
        **connection: Any,
    ) -> None:
        spec = SessionSpec(
            kind="label_smoothing",
            n_classes=classes,
            smoothing=smoothing,
            convention="off_target",
            reduction=reduction,
            ignore_index=ignore_index,
            weight=_weight_tuple(weight),
        )
        super().__init__(spec, **connection)
        self.cls, self.smoothing, self.dim = classes, smoothing, dim

    def _flatten(
        self, input: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        return super()._flatten(_class_dim_last(input, self.dim), target)


class OnlineLabelSmoothing(RemoteLoss):
    """Online Label Smoothing (Zhang et al., 2021) with the reference module's signature and semantics.

    The soft-label matrix lives on the server: ``supervise[:, k]`` is the soft
    label of class k. Call :meth:`next_epoch` once per epoch, and ``eval()``
    during validation so its batches do not count.

    Distributed workers share one matrix by naming one session: every rank calls
    ``OnlineLabelSmoothing(..., session="run-name")``. ``world_size`` and ``rank``
    come from the arguments, else an initialised torch.distributed, else the
    RANK / WORLD_SIZE variables torchrun sets. :meth:`next_epoch` is then a
    barrier: S is published once every rank has finished the epoch, from all
    their batches.

    ``cached=True`` selects the epoch-cached mode (see docs/cached-mode.md): S is
    fetched once per epoch and the loss and gradient are computed in this process
    with the server's own functions, bit for bit; this epoch's statistics are
    accumulated here in float64 and uploaded in the background every
    ``upload_every`` training steps or ``upload_seconds`` seconds (None: only at
    :meth:`next_epoch`, which uploads the rest before it arrives at the barrier).
    ``math_kernel`` picks that local math as the server's ``--math-kernel`` does:
    ``auto`` (the default) runs the fused kernel of the logits' device where it
    loads (numba on the CPU, loaded when the module is made; Triton on CUDA) and
    the eager torch ops otherwise, ``fused`` insists, ``eager`` never tries.
    """

    _epoch_tagged = True

    def __init__(
        self,
        alpha: float,
        n_classes: int,
        smoothing: float = 0.1,
        *,
        init: OlsInit = "label_smoothing",
        empty_class: EmptyClassPolicy = "keep",
        reduction: Reduction = "mean",
        ignore_index: int = DEFAULT_IGNORE_INDEX,
        weight: torch.Tensor | None = None,
        world_size: int | None = None,
        rank: int | None = None,
        cached: bool = False,
        upload_every: int | None = 100,
        upload_seconds: float | None = 10.0,
        math_kernel: MathKernel = "auto",
        **connection: Any,
    ) -> None:
        check_choice(math_kernel)
        if math_kernel != "auto" and not cached:
            raise ValueError("math_kernel: applies to cached=True (the server's --math-kernel covers remote mode)")
        if upload_every is not None and upload_every < 1:
            raise ValueError(f"upload_every: expected a positive number of steps or None but got {upload_every}")
        if upload_seconds is not None and upload_seconds <= 0:
            raise ValueError(f"upload_seconds: expected a positive number of seconds or None but got {upload_seconds}")
        self.cached, self.upload_every, self.upload_seconds = cached, upload_every, upload_seconds
        self.math_kernel = math_kernel
        if cached:
            warm_up(math_kernel, torch.device("cpu"))  # so the first step does not wait for numba
        self._cache: EpochCache | None = None
        world_size, rank = resolve_ranks(world_size, rank)
        if world_size > 1 and connection.get("session") is None:
            raise ValueError(
                f"world_size={world_size}: name the session so that every rank shares it, "
                "e.g. OnlineLabelSmoothing(..., session='my-run'); a private session would give each rank its own S"
            )
        spec = SessionSpec(
            kind="online_label_smoothing",
            n_classes=n_classes,
            smoothing=smoothing,
            convention="off_target",
            alpha=alpha,
            reduction=reduction,
            ignore_index=ignore_index,
            weight=_weight_tuple(weight),
            init=init,
            empty_class=empty_class,
            world_size=world_size,
        )
        super().__init__(spec, rank=rank, **connection)
        self.a, self.n_classes = alpha, n_classes

    # Epoch-cached mode ----------------------------------------------------------------

    def _epoch_cache(self) -> EpochCache:
        if self._cache is None:
            self._cache = EpochCache(
                self.client,
                self.session,
                self.spec,
                self.rank,
                upload_every=self.upload_every,
                upload_seconds=self.upload_seconds,
            )
        return self._cache

    def _loss(
        self, logits: torch.Tensor, labels: torch.Tensor, need_grad: bool, loss_dtype: torch.dtype
    ) -> torch.Tensor:
        if not self.cached:
            return super()._loss(logits, labels, need_grad, loss_dtype)
        loss: torch.Tensor = _CachedLoss.apply(logits, labels, self, need_grad, loss_dtype)  # type: ignore[no-untyped-call]
        return loss

    def flush(self) -> None:
        """Cached mode: upload this epoch's statistics recorded so far and wait until the server applied them."""
        if self._cache is not None:
            self._cache.flush()

    def __getstate__(self) -> dict[str, Any]:
        # A copy starts with no cached S and no statistics: those not uploaded belong to the original.
        return {**super().__getstate__(), "_cache": None}

    def close(self) -> None:
        """Cached mode: upload what is left (best effort), then close as remote modules do."""
        if self._cache is not None and not self._private and not self.client.closed:
            try:
                self._cache.flush(timeout=self.client.config.timeout)
            except Exception as error:  # closing must not fail; say what was lost
                log.warning("lossd: statistics of session %r not uploaded at close: %s", self.session, error)
        super().close()

    def next_epoch(self) -> None:
        """Finish this module's epoch and publish the new soft labels.

        With several ranks, waits until every rank has called it (up to the
        client's ``barrier_timeout``; DeadlineExceededError then names the missing
        ranks). The server is told which epoch ends, so a repeat, a retry after a
        lost reply, or a second module on the same session never advances twice.
        In cached mode the statistics still held here are uploaded (and applied) first.
        """
        self.flush()
        self._epoch = self.client.next_epoch(self.session, self._epoch, rank=self.rank).epoch

    @property
    def supervise(self) -> torch.Tensor:
        """The current C x C soft-label matrix (a CPU copy)."""
        return self.state().supervise

    def state(self) -> SessionState:
        self.flush()  # cached mode: the statistics held here belong in the state
        state = self.client.get_state(self.session)
        self._epoch = state.epoch
        return state

    # The server holds the state, so the module's state_dict fetches it and
    # load_state_dict pushes it back. Keys follow the reference module
    # (supervise, update, idx_count), so its checkpoints load too.
    def get_extra_state(self) -> dict[str, Any]:
        """The spec travels with the state, so a checkpoint is never loaded into a session that means else."""
        return {"format": 1, "spec": dataclasses.asdict(self.spec)}

    def set_extra_state(self, state: Any) -> None:
        """Checked in _load_from_state_dict, which handles the whole state at once."""

    def _spec_mismatch(self, extra: Any) -> str | None:
        if not isinstance(extra, dict) or not isinstance(extra.get("spec"), dict):
            return "expected the dict that OnlineLabelSmoothing.get_extra_state() writes"
        saved, mine = extra["spec"], dataclasses.asdict(self.spec)
        # world_size may change between runs: a resumed job can have more or fewer workers.
        differs = [
            f"{key}={saved.get(key)!r} (this module: {mine[key]!r})"
            for key in mine
            if key != "world_size" and _comparable(saved.get(key)) != _comparable(mine[key])
        ]
        return "the checkpoint is of a session with " + ", ".join(differs) if differs else None

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        state = self.state()
        destination[prefix + "supervise"] = state.supervise
        destination[prefix + "update"] = state.accumulator
        destination[prefix + "idx_count"] = state.counts
        destination[prefix + "epoch"] = torch.tensor(state.epoch)
        destination[prefix + "samples_this_epoch"] = torch.tensor(state.samples_this_epoch)

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        keys = ("supervise", "update", "idx_count")
        missing = [prefix + key for key in keys if prefix + key not in state_dict]
        if missing:
            missing_keys.extend(missing)
            return
        extra = state_dict.get(prefix + "_extra_state")  # absent in the reference module's checkpoints
        mismatch = None if extra is None else self._spec_mismatch(extra)
        if mismatch is not None:
            error_msgs.append(f"{prefix}_extra_state: {mismatch}")
            return
        counts = state_dict[prefix + "idx_count"]
        if counts.is_floating_point():  # the reference keeps float32 counts
            if not bool((counts == counts.round()).all()):
                error_msgs.append(f"{prefix}idx_count: counts must be whole numbers")
                return
            counts = counts.round()
        epoch = state_dict.get(prefix + "epoch")
        samples = state_dict.get(prefix + "samples_this_epoch")
        if self._cache is not None:  # as in remote mode, batches before the load count in the state it replaces
            self._cache.flush()
            self._cache.invalidate()
        if self.spec.world_size > 1 and self.rank != 0:
            # One shared state: rank 0 loads it, every rank waits for that before training on.
            self._epoch = int(epoch) if epoch is not None else self.info().epoch
            barrier_if_initialised()
            return
        state = SessionState(
            epoch=int(epoch) if epoch is not None else self._epoch,
            supervise=state_dict[prefix + "supervise"].detach().to("cpu", torch.float32),
            accumulator=state_dict[prefix + "update"].detach().to("cpu", torch.float64),
            counts=counts.detach().to("cpu", torch.int64),
            # The reference keeps no sample count: its correctly predicted samples are the least it saw.
            samples_this_epoch=int(samples) if samples is not None else int(counts.sum()),
        )
        self._epoch = self.client.load_state(self.session, state).epoch
        if self.spec.world_size > 1:
            barrier_if_initialised()
        if strict:
            known = {prefix + key for key in (*keys, "epoch", "samples_this_epoch", "_extra_state")}
            unexpected_keys.extend(
                k for k in state_dict if k.startswith(prefix) and k not in known and "." not in k[len(prefix) :]
            )
