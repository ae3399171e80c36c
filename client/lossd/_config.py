"""Client configuration and its defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_TARGET = "localhost:50051"
TARGET_ENV = "LOSSD_TARGET"
DEFAULT_TIMEOUT = 60.0  # seconds, for each unary call
DEFAULT_MAX_MESSAGE_BYTES = 512 << 20  # gRPC's 4 MiB default is below a 1024 x 1000 float32 batch


@dataclass(frozen=True)
class ClientConfig:
    target: str = DEFAULT_TARGET
    timeout: float | None = DEFAULT_TIMEOUT
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    @classmethod
    def resolve(
        cls,
        target: str | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> ClientConfig:
        """The target comes from the argument, else ``LOSSD_TARGET``, else ``localhost:50051``."""
        return cls(
            target=target or os.environ.get(TARGET_ENV) or DEFAULT_TARGET,
            timeout=timeout,
            max_message_bytes=max_message_bytes,
        )

    def channel_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
        ]
