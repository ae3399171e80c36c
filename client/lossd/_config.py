"""Client configuration and its defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from lossd._retry import RetryPolicy

DEFAULT_TARGET = "localhost:50051"
TARGET_ENV = "LOSSD_TARGET"
DEFAULT_TIMEOUT = 60.0  # seconds, for each unary call
DEFAULT_MAX_MESSAGE_BYTES = 512 << 20  # gRPC's 4 MiB default is below a 1024 x 1000 float32 batch
# How long next_epoch waits for the other ranks: torch.distributed's default collective timeout.
DEFAULT_BARRIER_TIMEOUT = 1800.0
# gRPC waits 1 s, then up to 120 s, between reconnect attempts; a trainer wants a restarted
# server found within a fraction of a second.
RECONNECT_BACKOFF_MS = (100, 1000)


@dataclass(frozen=True)
class ClientConfig:
    target: str = DEFAULT_TARGET
    timeout: float | None = DEFAULT_TIMEOUT
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    barrier_timeout: float | None = DEFAULT_BARRIER_TIMEOUT

    @classmethod
    def resolve(
        cls,
        target: str | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        retry_deadline: float = RetryPolicy.deadline,
        barrier_timeout: float | None = DEFAULT_BARRIER_TIMEOUT,
    ) -> ClientConfig:
        """The target comes from the argument, else ``LOSSD_TARGET``, else ``localhost:50051``."""
        return cls(
            target=target or os.environ.get(TARGET_ENV) or DEFAULT_TARGET,
            timeout=timeout,
            max_message_bytes=max_message_bytes,
            retry=RetryPolicy(deadline=retry_deadline),
            barrier_timeout=barrier_timeout,
        )

    def channel_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
            ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
            ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1]),
        ]
