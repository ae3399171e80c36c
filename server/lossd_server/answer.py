"""A loss answer as the server keeps it, and its one-copy wire encoding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lossd import _codec, _wire
from lossd.v1 import loss_service_pb2 as pb


@dataclass(frozen=True)
class Answer:
    """A loss request's answer, before it is put on a transport. The replay log keeps this, so a resend
    on any transport gets the same numbers: encoded into gRPC wire bytes, or written into a local segment."""

    request_id: str
    loss: torch.Tensor  # CPU: a scalar, or [N] for reduction none; float32 (float64 for float64 logits)
    grad: torch.Tensor | None  # contiguous, CPU, wire dtype, times 2^grad_exponent; never written to
    grad_exponent: int
    n_used: int
    n_correct: int
    epoch: int

    @property
    def nbytes(self) -> int:
        """What keeping it costs (the replay log reserves this): about its encoded size, as before it was kept
        unencoded (field tags and varints, the id, the loss and the gradient)."""
        grad = 0 if self.grad is None else self.grad.numel() * self.grad.element_size()
        return 32 + len(self.request_id) + self.loss.numel() * self.loss.element_size() + grad

    def response(self) -> pb.LossResponse:
        """The LossResponse, every field but grad (lossd._wire adds it without copying it into the message)."""
        return pb.LossResponse(
            request_id=self.request_id,
            loss=_codec.encode(self.loss),
            n_used=self.n_used,
            n_correct=self.n_correct,
            epoch=self.epoch,
            grad_exponent=self.grad_exponent,
        )


def serialize_loss_response(response: Answer | pb.LossResponse) -> bytes:
    """The wire bytes of a loss answer: the gradient copied once, straight from its tensor (lossd._wire)."""
    if isinstance(response, Answer):
        return _wire.encode_loss_response(response.response(), response.grad)
    return response.SerializeToString()
