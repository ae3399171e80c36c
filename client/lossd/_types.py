"""What the client returns: plain dataclasses built from the wire messages."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lossd import _codec, _wire
from lossd._spec import SessionSpec
from lossd.v1 import loss_service_pb2 as pb


@dataclass(frozen=True)
class SessionInfo:
    name: str
    spec: SessionSpec
    epoch: int
    samples_this_epoch: int
    correct_this_epoch: int
    created_at: float
    updated_at: float
    state_bytes: int
    # Ranks that have called next_epoch for the current epoch.
    ranks_finished: tuple[int, ...] = ()
    # Current-epoch samples a server crash lost (seen after the last snapshot); 0 normally.
    samples_lost: int = 0
    # When the current epoch's statistics were last made durable (Unix seconds; 0: never or memory store).
    snapshot_at: float = 0.0
    # The tenant that owns it (empty without authentication).
    owner: str = ""

    @classmethod
    def from_proto(cls, message: pb.Session) -> SessionInfo:
        return cls(
            name=message.name,
            spec=SessionSpec.from_proto(message.spec),
            epoch=message.epoch,
            samples_this_epoch=message.samples_this_epoch,
            correct_this_epoch=message.correct_this_epoch,
            created_at=message.created_at,
            updated_at=message.updated_at,
            state_bytes=message.state_bytes,
            ranks_finished=tuple(message.ranks_finished),
            samples_lost=message.samples_lost,
            snapshot_at=message.snapshot_at,
            owner=message.owner,
        )


@dataclass(frozen=True)
class SessionState:
    """A session's whole OLS state. ``supervise[:, k]`` is the soft label of class k."""

    epoch: int
    supervise: torch.Tensor  # [C, C] float32
    accumulator: torch.Tensor  # [C, C] float64
    counts: torch.Tensor  # [C] int64
    samples_this_epoch: int = 0

    @classmethod
    def from_proto(cls, message: pb.SessionState) -> SessionState:
        return cls(
            epoch=message.epoch,
            supervise=_codec.decode(message.supervise, "supervise").clone(),
            accumulator=_codec.decode(message.accumulator, "accumulator").clone(),
            counts=_codec.decode(message.counts, "counts").clone(),
            samples_this_epoch=message.samples_this_epoch,
        )

    def to_proto(self) -> pb.SessionState:
        return pb.SessionState(
            epoch=self.epoch,
            supervise=_codec.encode(self.supervise),
            accumulator=_codec.encode(self.accumulator),
            counts=_codec.encode(self.counts),
            samples_this_epoch=self.samples_this_epoch,
        )


@dataclass(frozen=True)
class LossResult:
    loss: torch.Tensor  # scalar, or [N] for reduction "none"
    # [N, C] in the logits' dtype: d loss / d logits * 2^grad_exponent. A read-only view of
    # the response's bytes (no copy on the hot path): clone it before writing into it.
    scaled_grad: torch.Tensor | None
    grad_exponent: int
    n_used: int
    n_correct: int
    epoch: int
    request_id: str

    @property
    def grad(self) -> torch.Tensor | None:
        """d loss / d logits in the logits' dtype. For float16, scale :attr:`scaled_grad`
        instead (see :func:`lossd._codec.unscale_gradient`) to keep entries below 2^-24."""
        if self.scaled_grad is None:
            return None
        return _codec.unscale_gradient(self.scaled_grad, self.grad_exponent)

    @classmethod
    def from_received(cls, received: _wire.ReceivedResponse) -> LossResult:
        """From a response decoded by lossd._wire: the gradient views the received bytes (no copy)."""
        message = received.message
        return cls(
            loss=_codec.decode(message.loss, "loss").clone(),  # small; users may write into it
            scaled_grad=_wire.decode_tensor(message.grad, received.grad_data, "grad")
            if message.HasField("grad")
            else None,
            grad_exponent=message.grad_exponent,
            n_used=message.n_used,
            n_correct=message.n_correct,
            epoch=message.epoch,
            request_id=message.request_id,
        )

    @classmethod
    def from_proto(cls, message: pb.LossResponse) -> LossResult:
        return cls(
            loss=_codec.decode(message.loss, "loss").clone(),  # small; users may write into it
            scaled_grad=_codec.decode(message.grad, "grad") if message.HasField("grad") else None,
            grad_exponent=message.grad_exponent,
            n_used=message.n_used,
            n_correct=message.n_correct,
            epoch=message.epoch,
            request_id=message.request_id,
        )
