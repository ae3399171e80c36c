"""Server settings: ``lossd serve`` flags override ``LOSSD_*`` environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1 << 20
GiB = 1 << 30

# A loss request of W bytes holds up to this many W at its peak (message, decoded copy, float32 math,
# gradient, encoded response; float16 logits are the worst): the request budget admits one of
# max_message_bytes at the least (lossd_server.admission.loss_footprint_factor).
LOSS_FOOTPRINT_FACTOR = 13


def machine_memory_bytes() -> int:
    """The memory this process may use: the cgroup's limit where one is set (a container), else the RAM."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOSSD_", extra="forbid")

    host: str | None = Field(
        None,
        description="Address to bind. Default: 0.0.0.0 when a token file is set, else 127.0.0.1 (loopback only).",
    )
    port: int = Field(50051, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:K.")
    max_message_bytes: int | None = Field(
        None,
        ge=4 * MiB,
        description="Largest request or response. Default: what request_memory_bytes can admit "
        "(request_memory_bytes / 13, at most 512 MiB); gRPC's own default is 4 MiB.",
    )
    max_sessions: int = Field(1024, ge=1, description="Sessions held at once.")
    matrix_memory_bytes: int = Field(
        4 * GiB,
        ge=0,
        description="Budget for what sessions hold between calls: OLS matrices (12 C^2 + 8 C bytes, 10 C^2 + 8 C "
        "with a bfloat16 S) and class weights (8 C bytes) on a CPU device (on CUDA: device_memory_bytes), "
        "the replay log (1 MiB a rank with the default replay_ids, and its kept responses).",
    )
    request_memory_bytes: int | None = Field(
        None,
        ge=16 * MiB,
        description="Budget for work in flight: received messages, what their math and responses allocate, "
        "and on a CPU device epoch ends and snapshot staging copies. Past it a call waits up to 2 s, then gets "
        "RESOURCE_EXHAUSTED. "
        "Default: a quarter of the machine's (or the container's) memory, at most 4 GiB.",
    )
    device_memory_bytes: int | None = Field(
        None,
        ge=0,
        description="Budget of a CUDA device's memory for the session state held there (OLS matrices, class "
        "weights) and its epoch ends and snapshot copies, which then leave matrix_memory_bytes and "
        "request_memory_bytes. Default: 80% of the device's memory, leaving at least request_memory_bytes + 1 GiB "
        "for calls in flight and CUDA itself. Setting it on a CPU device is an error.",
    )
    soft_label_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="dtype in which sessions hold the OLS soft labels S: bfloat16 halves them (2 C^2 bytes) at "
        "about 3 significant digits (8-bit mantissa). The accumulator stays float64; the wire and the store "
        "carry S as float32.",
    )
    replay_ids: int = Field(
        1024, ge=1, description="Training request ids remembered per rank, so a resend is never applied twice."
    )
    replay_responses: int = Field(
        2, ge=1, description="Responses kept per rank, so a resend after a lost response gets the original."
    )
    workers: int = Field(8, ge=1, description="Threads that run the loss math.")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads; 0 keeps torch's default.")
    math_kernel: Literal["auto", "fused", "eager"] = Field(
        "auto",
        description="The loss math: 'fused', one kernel for the device (numba on the CPU, Triton on CUDA), "
        "loaded at start-up, which fails where it cannot load; 'eager', torch ops; 'auto', the fused kernel "
        "where it loads and the eager ops otherwise. The same numbers to float rounding. Start-up says which.",
    )
    inline_math_bytes: int = Field(
        0,
        ge=0,
        description="Stream requests with at most this many bytes of logits run on the event loop, skipping "
        "the hand-off to a worker thread and back (about 0.3-0.5 ms a request). While one runs, the server "
        "answers nothing else, so this suits a server that serves one trainer's small batches; 0 turns it off.",
    )
    grace_seconds: float = Field(5.0, ge=0, le=60, description="How long SIGTERM waits for calls in flight.")
    store: Literal["sqlite", "memory"] = Field(
        "sqlite", description="sqlite keeps sessions in --state-dir across restarts; memory loses them."
    )
    state_dir: Path | None = Field(
        None, description="Directory of the SQLite store. Default: $XDG_STATE_HOME/lossd or ~/.local/state/lossd."
    )
    snapshot_seconds: float = Field(
        5.0, gt=0, le=3600, description="How often each changed accumulator is snapshotted (the most kill -9 loses)."
    )
    history_bytes: int = Field(
        64 * MiB, ge=0, description="Finished-epoch soft-label matrices kept per session; the newest is always kept."
    )
    idle_ttl_seconds: float = Field(
        1800.0, ge=0, description="An idle session moves from memory to the store after this long; 0 never."
    )
    token_file: Path | None = Field(
        None, description="Bearer tokens, one per line as 'TOKEN' or 'NAME TOKEN'; each token is a tenant."
    )
    tls_cert: Path | None = Field(None, description="PEM server certificate; with --tls-key, serves TLS only.")
    tls_key: Path | None = Field(None, description="PEM private key of --tls-cert.")
    tls_client_ca: Path | None = Field(None, description="PEM CA bundle; clients must present a certificate it signed.")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Serve Prometheus metrics over HTTP on this port; unset disables."
    )
    log_format: Literal["text", "json"] = Field("text", description="json writes one object per line.")
    tune_malloc: bool = Field(True, description="Raise glibc's mmap/trim thresholds for megabyte tensors.")
    local_socket: str | None = Field(
        None,
        description="Unix socket of the same-host data plane (tensors in a sealed memfd, one header per step). "
        "Default: lossd-PORT.sock in --state-dir; '' serves without one (clients then use the gRPC stream).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @property
    def bind_host(self) -> str:
        """Without tokens anyone who can reach the port may use it, so default to loopback."""
        if self.host is not None:
            return self.host
        return "0.0.0.0" if self.token_file is not None else "127.0.0.1"

    @property
    def resolved_request_memory_bytes(self) -> int:
        if self.request_memory_bytes is not None:
            return self.request_memory_bytes
        return max(16 * MiB, min(4 * GiB, machine_memory_bytes() // 4))

    @property
    def resolved_max_message_bytes(self) -> int:
        if self.max_message_bytes is not None:
            return self.max_message_bytes
        fitting = self.resolved_request_memory_bytes // LOSS_FOOTPRINT_FACTOR // MiB * MiB
        return max(4 * MiB, min(512 * MiB, fitting))

    @property
    def resolved_state_dir(self) -> Path:
        if self.state_dir is not None:
            return self.state_dir
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(base) / "lossd"

    def local_socket_path(self, port: int) -> Path | None:
        """The local transport's socket for a server on ``port``; None when disabled. The default is named
        after the port, so servers sharing a state directory (memory stores, say) never share a socket."""
        if self.local_socket is None:
            return self.resolved_state_dir / f"lossd-{port}.sock"
        return Path(self.local_socket) if self.local_socket.strip() else None

    @field_validator("device")
    @classmethod
    def _device_syntax(cls, value: str) -> str:
        base, _, index = value.partition(":")
        if base not in ("auto", "cpu", "cuda") or (index and (base != "cuda" or not index.isdigit())):
            raise ValueError(f"expected auto, cpu, cuda or cuda:K but got {value!r}")
        return value
