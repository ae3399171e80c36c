"""A loss answer as the server keeps it, and its one-copy wire encoding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lossd import _wire
from lossd.v1 import loss_service_pb2 as pb


@dataclass(frozen=True)
class Answer:
    """A LossResponse before its gradient is placed. The replay log keeps this, so a resend on any
    transport gets the same numbers, inline on gRPC or written straight into a local segment."""

    response: pb.LossResponse  # every field but grad
    grad: torch.Tensor | None  # contiguous, CPU, wire dtype, times 2^grad_exponent; never written to

    @property
    def nbytes(self) -> int:
        """What keeping it costs (the replay log reserves this)."""
        grad = 0 if self.grad is None else self.grad.numel() * self.grad.element_size()
        return self.response.ByteSize() + grad


def serialize_loss_response(response: Answer | pb.LossResponse) -> bytes:
    """The wire bytes of a loss answer: the gradient copied once, straight from its tensor (lossd._wire)."""
    if isinstance(response, Answer):
        return _wire.encode_loss_response(response.response, response.grad)
    return response.SerializeToString()
