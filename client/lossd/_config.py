"""Client configuration and its defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import grpc

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
# Client-side names only: LOSSD_TOKEN_FILE, LOSSD_TLS_CERT and LOSSD_TLS_KEY are the server's settings.
TOKEN_ENV = "LOSSD_TOKEN"
TLS_CA_ENV = "LOSSD_TLS_CA"
TLS_CLIENT_CERT_ENV = "LOSSD_TLS_CLIENT_CERT"
TLS_CLIENT_KEY_ENV = "LOSSD_TLS_CLIENT_KEY"
TLS_SERVER_NAME_ENV = "LOSSD_TLS_SERVER_NAME"
TRANSPORT_ENV = "LOSSD_TRANSPORT"
LOCAL_SOCKET_ENV = "LOSSD_LOCAL_SOCKET"
TRANSPORTS = ("auto", "local", "grpc")
_TLS_ENVS = (TLS_CA_ENV, TLS_CLIENT_CERT_ENV, TLS_CLIENT_KEY_ENV, TLS_SERVER_NAME_ENV)


def _env(name: str) -> str | None:
    return os.environ.get(name, "").strip() or None


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise OSError(f"lossd TLS: cannot read the {what} {path}: {error.strerror or error}") from None


@dataclass(frozen=True)
class TLSConfig:
    """How the client speaks TLS to a server started with ``--tls-cert``/``--tls-key``.

    ``ca``: PEM bundle that signed the server's certificate (None: the system's roots).
    ``cert`` and ``key``: this client's certificate and key, for a server with ``--tls-client-ca`` (mTLS).
    ``server_name``: the name to check the server's certificate against, when it differs from the target's host.
    """

    ca: str | Path | None = None
    cert: str | Path | None = None
    key: str | Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("lossd.TLSConfig: a client certificate needs its key, and a key its certificate")

    @classmethod
    def from_env(cls) -> TLSConfig | None:
        """From LOSSD_TLS_CA, _CLIENT_CERT, _CLIENT_KEY and _SERVER_NAME; None when none of them is set."""
        ca, cert, key, server_name = (_env(name) for name in _TLS_ENVS)
        if ca is None and cert is None and key is None and server_name is None:
            return None
        return cls(ca=ca, cert=cert, key=key, server_name=server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        """Reads the files now, so a missing one fails when the client is made, not at the first call."""
        return grpc.ssl_channel_credentials(
            root_certificates=None if self.ca is None else _read(self.ca, "CA bundle"),
            private_key=None if self.key is None else _read(self.key, "client key"),
            certificate_chain=None if self.cert is None else _read(self.cert, "client certificate"),
        )

    def channel_options(self) -> list[tuple[str, str]]:
        return [] if self.server_name is None else [("grpc.ssl_target_name_override", self.server_name)]


def resolve_token(token: str | None) -> str | None:
    """The argument, else LOSSD_TOKEN; "" means no token even when LOSSD_TOKEN is set."""
    value = _env(TOKEN_ENV) if token is None else token.strip()
    if not value:
        return None
    # gRPC metadata must be printable ASCII; say so here rather than fail obscurely at the first call.
    if not all("\x21" <= char <= "\x7e" for char in value):
        source = "LOSSD_TOKEN" if token is None else "token"
        raise ValueError(f"lossd: {source} must be printable ASCII without spaces")
    return value


def resolve_tls(tls: TLSConfig | bool | None) -> TLSConfig | None:
    """``None``: from the LOSSD_TLS_* variables (plaintext if none is set); ``False``: plaintext;
    ``True``: TLS, with the LOSSD_TLS_* variables for anything they set; a TLSConfig: exactly that."""
    if isinstance(tls, TLSConfig):
        return tls
    if tls is False:
        return None
    from_env = TLSConfig.from_env()
    if tls is True and from_env is None:
        return TLSConfig()
    return from_env


def resolve_transport(transport: str | None) -> str:
    """The argument, else LOSSD_TRANSPORT, else "auto"."""
    source = "transport" if transport is not None else TRANSPORT_ENV
    value = (transport if transport is not None else _env(TRANSPORT_ENV) or "auto").strip().lower()
    if value not in TRANSPORTS:
        raise ValueError(f"lossd: {source} must be one of {', '.join(TRANSPORTS)}; got {value!r}")
    return value


@dataclass(frozen=True)
class ClientConfig:
    target: str = DEFAULT_TARGET
    timeout: float | None = DEFAULT_TIMEOUT
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    barrier_timeout: float | None = DEFAULT_BARRIER_TIMEOUT
    token: str | None = field(default=None, repr=False)  # a secret: kept out of reprs and logs
    tls: TLSConfig | None = None
    # How loss steps travel: "local" (the server's same-host socket and a shared segment), "grpc" (the
    # LossStream), or "auto": local when the server advertises a socket this process can reach.
    transport: str = "auto"
    # The server's socket as this process sees it, when that differs from the path the server advertises
    # (a container that mounts the socket's volume elsewhere); None: the advertised path.
    local_socket: str | None = None

    @classmethod
    def resolve(
        cls,
        target: str | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        retry_deadline: float = RetryPolicy.deadline,
        barrier_timeout: float | None = DEFAULT_BARRIER_TIMEOUT,
        token: str | None = None,
        tls: TLSConfig | bool | None = None,
        transport: str | None = None,
        local_socket: str | None = None,
    ) -> ClientConfig:
        """Arguments win over the environment: the target comes from the argument, else ``LOSSD_TARGET``,
        else ``localhost:50051``; the token, TLS and transport as :func:`resolve_token`, :func:`resolve_tls`
        and :func:`resolve_transport` say; the local socket from the argument, else ``LOSSD_LOCAL_SOCKET``."""
        return cls(
            target=target or os.environ.get(TARGET_ENV) or DEFAULT_TARGET,
            timeout=timeout,
            max_message_bytes=max_message_bytes,
            retry=RetryPolicy(deadline=retry_deadline),
            barrier_timeout=barrier_timeout,
            token=resolve_token(token),
            tls=resolve_tls(tls),
            transport=resolve_transport(transport),
            local_socket=local_socket or _env(LOCAL_SOCKET_ENV),
        )

    def channel_options(self) -> list[tuple[str, int | str]]:
        tls_options = [] if self.tls is None else self.tls.channel_options()
        return [
            *tls_options,
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
            ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
            ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1]),
        ]
