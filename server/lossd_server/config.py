"""Server settings: ``lossd serve`` flags override ``LOSSD_*`` environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1 << 20
GiB = 1 << 30


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOSSD_", extra="forbid")

    host: str = Field("127.0.0.1", description="Address to bind. Use 0.0.0.0 to accept remote trainers.")
    port: int = Field(50051, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:K.")
    max_message_bytes: int = Field(
        512 * MiB, ge=4 * MiB, description="Largest request or response; gRPC's default is 4 MiB."
    )
    max_sessions: int = Field(1024, ge=1, description="Sessions held at once.")
    matrix_memory_bytes: int = Field(
        4 * GiB, ge=0, description="Budget for all OLS matrices (12 C^2 + 8 C bytes a session)."
    )
    replay_ids: int = Field(
        1024, ge=1, description="Training request ids remembered per rank, so a resend is never applied twice."
    )
    replay_responses: int = Field(
        2, ge=1, description="Responses kept per rank, so a resend after a lost response gets the original."
    )
    workers: int = Field(8, ge=1, description="Threads that run the loss math.")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads; 0 keeps torch's default.")
    grace_seconds: float = Field(5.0, ge=0, le=60, description="How long SIGTERM waits for calls in flight.")
    tune_malloc: bool = Field(True, description="Raise glibc's mmap/trim thresholds for megabyte tensors.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("device")
    @classmethod
    def _device_syntax(cls, value: str) -> str:
        base, _, index = value.partition(":")
        if base not in ("auto", "cpu", "cuda") or (index and (base != "cuda" or not index.isdigit())):
            raise ValueError(f"expected auto, cpu, cuda or cuda:K but got {value!r}")
        return value
