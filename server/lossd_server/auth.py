"""Who is calling: the tenant that owns the sessions a call may see, and the server's TLS credentials.

Sessions are keyed by (owner, name), so one tenant never sees, reads or
overwrites another's. Without tokens every caller is the anonymous owner "".
With ``--token-file`` every LossService call must carry ``authorization: Bearer
<token>``; health checking and reflection stay open (see docs/security.md).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc import aio

from lossd._exceptions import UnauthenticatedError
from lossd_server.config import Settings

log = logging.getLogger("lossd_server")

Identify = Callable[[aio.ServicerContext], str]

# Short tokens can be guessed; 16 characters is the floor (`openssl rand -hex 32` gives 64).
MIN_TOKEN_LENGTH = 16
# Tokens travel as gRPC metadata, which must be printable ASCII; no spaces, so lines split cleanly.
_TOKEN = re.compile(r"[\x21-\x7e]+")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:+-]{0,127}")
# At most one "unknown bearer token" WARNING this often: a misconfigured trainer or a scanner retrying
# in a loop would otherwise fill the log (and the disk) with one line per call.
REFUSAL_LOG_SECONDS = 10.0


def anonymous(context: aio.ServicerContext) -> str:
    return ""


class TokenFileError(ValueError):
    """A token file that cannot be used; the message names the file and line, never a token."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("ascii", "surrogateescape")).digest()


def token_owner(token: str) -> str:
    """The owner id of an unnamed token: derived from it, yet useless for recovering it."""
    return "token-" + _digest(token).hex()[:12]


@dataclass(frozen=True)
class Tenant:
    owner: str
    digest: bytes  # sha256 of the token: only digests are kept in memory and compared


def load_tokens(path: Path) -> list[Tenant]:
    """Parse a token file: one ``TOKEN`` or ``NAME TOKEN`` a line; blank lines and ``#`` comments are skipped."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise TokenFileError(f"cannot read token file {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise TokenFileError(f"token file {path}: not UTF-8 text (byte {error.start})") from None
    tenants: list[Tenant] = []
    lines_of_owner: dict[str, int] = {}
    lines_of_digest: dict[bytes, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"token file {path}, line {number}"
        fields = line.split()
        if len(fields) > 2:
            raise TokenFileError(f"{where}: expected 'TOKEN' or 'NAME TOKEN', got {len(fields)} fields")
        token = fields[-1]
        if not _TOKEN.fullmatch(token):
            raise TokenFileError(f"{where}: the token must be printable ASCII (it travels as gRPC metadata)")
        if len(token) < MIN_TOKEN_LENGTH:
            raise TokenFileError(
                f"{where}: the token is shorter than {MIN_TOKEN_LENGTH} characters; "
                "generate one with e.g. `openssl rand -hex 32`"
            )
        if len(fields) == 2:
            owner = fields[0]
            if not _NAME.fullmatch(owner):
                raise TokenFileError(
                    f"{where}: tenant name {owner!r} must be 1-128 of A-Z a-z 0-9 . _ @ : + - (not starting with one "
                    "of the symbols)"
                )
        else:
            owner = token_owner(token)
        digest = _digest(token)
        if digest in lines_of_digest:
            raise TokenFileError(f"{where}: duplicate token (first on line {lines_of_digest[digest]})")
        if owner in lines_of_owner:
            raise TokenFileError(f"{where}: duplicate tenant name {owner!r} (first on line {lines_of_owner[owner]})")
        lines_of_digest[digest] = lines_of_owner[owner] = number
        tenants.append(Tenant(owner, digest))
    if not tenants:
        raise TokenFileError(f"token file {path} has no tokens; every call would be refused")
    return tenants


class _RefusalLog:
    """Logs refused calls at most once per ``interval`` seconds, counting the ones it left out.

    A count left over when refusals stop is never logged; the next refusal reports it.
    """

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()  # calls are identified on the servicer's worker threads
        self._last: float | None = None  # when the last line was logged, on ``clock``
        self._suppressed = 0

    def refused(self, peer: str) -> None:
        now = self._clock()
        with self._lock:
            if self._last is not None and now - self._last < self._interval:
                self._suppressed += 1
                return
            suppressed, since = self._suppressed, self._last
            self._last, self._suppressed = now, 0
        # Logged outside the lock, so a slow handler never holds other calls up.
        if since is None or not suppressed:
            log.warning("refused a call with an unknown bearer token from %s", peer, extra={"peer": peer})
        else:
            log.warning(
                "refused %d calls with an unknown bearer token in the last %.0f s (the latest from %s); "
                "at most one such line is logged every %g s",
                suppressed + 1,
                now - since,
                peer,
                self._interval,
                extra={"peer": peer, "refused_calls": suppressed + 1},
            )


class BearerAuth:
    """Identify: the tenant whose token the call's ``authorization: Bearer`` metadata carries."""

    def __init__(self, tenants: list[Tenant]) -> None:
        self._tenants = tuple(tenants)
        self._refusals = _RefusalLog(REFUSAL_LOG_SECONDS)

    @property
    def tenants(self) -> int:
        return len(self._tenants)

    def __call__(self, context: aio.ServicerContext) -> str:
        values = [value for key, value in context.invocation_metadata() or () if key == "authorization"]
        if not values:
            raise UnauthenticatedError(
                "this server requires a bearer token: pass lossd.Client(token=...) or set LOSSD_TOKEN "
                "(other clients: metadata 'authorization: Bearer <token>')"
            )
        if len(values) > 1:
            raise UnauthenticatedError("more than one authorization metadata entry")
        value = values[0]
        if isinstance(value, bytes):  # only '-bin' keys carry bytes, but never trust the peer
            value = value.decode("latin-1")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer":  # the scheme is case-insensitive (RFC 7235)
            raise UnauthenticatedError("the authorization metadata must use the Bearer scheme")
        return self.owner_of(token.strip(), context)

    def owner_of(self, token: str, context: aio.ServicerContext | None = None) -> str:
        presented = _digest(token)
        owner: str | None = None
        # Every tenant is compared, in constant time over equal-length digests, so the
        # time taken tells nothing about which token, or how much of one, matched.
        for tenant in self._tenants:
            if hmac.compare_digest(tenant.digest, presented):
                owner = tenant.owner
        if owner is None:
            self._refusals.refused(context.peer() if context is not None else "?")
            raise UnauthenticatedError("unknown bearer token")
        return owner


def identify_from(settings: Settings) -> Identify:
    """Anonymous without a token file; else bearer-token authentication against it."""
    if settings.token_file is None:
        return anonymous
    return BearerAuth(load_tokens(settings.token_file))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def log_exposure(settings: Settings, identify: Identify) -> None:
    """Say who can reach the server; logged after the "serving on" line, which tools read first."""
    host = settings.bind_host
    tls = "mutual TLS" if settings.tls_client_ca else "TLS" if settings.tls_cert else "plaintext"
    if isinstance(identify, BearerAuth):
        log.info("bearer tokens required: %d tenant(s) from %s; %s", identify.tenants, settings.token_file, tls)
        if tls == "plaintext" and not _is_loopback(host):
            log.warning(
                "bearer tokens travel unencrypted to %s: set --tls-cert and --tls-key unless a TLS proxy or a "
                "trusted network carries them",
                host,
            )
    elif settings.host is None:
        log.info(
            "no --token-file, so listening on loopback only (%s); to accept remote trainers set --token-file "
            "(then every interface is bound by default), or --host 0.0.0.0 on a trusted network",
            host,
        )
    elif not _is_loopback(host):
        log.warning(
            "listening on %s without --token-file: anyone who can reach this port can read, change and delete "
            "every session; set --token-file (see docs/security.md)",
            host,
        )


def _read_pem(path: Path, flag: str, marker: bytes) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise OSError(f"cannot read {flag} {path}: {error.strerror or error}") from None
    # gRPC only parses the PEM at the first handshake; check now so a swapped or empty file fails at startup.
    if b"-----BEGIN " not in data or marker not in data:
        raise ValueError(f"{flag} {path} is not a PEM file with a {marker.decode().strip('- ')} block")
    return data


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from --tls-cert/--tls-key (and --tls-client-ca for mTLS); None to serve plaintext."""
    cert, key, client_ca = settings.tls_cert, settings.tls_key, settings.tls_client_ca
    if cert is None and key is None:
        if client_ca is not None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key: client certificates only work over TLS")
        return None
    if cert is None or key is None:
        given, missing = ("--tls-cert", "--tls-key") if key is None else ("--tls-key", "--tls-cert")
        raise ValueError(f"{given} needs {missing} too: TLS takes a certificate and its private key")
    chain = _read_pem(cert, "--tls-cert", b"CERTIFICATE-----")
    private = _read_pem(key, "--tls-key", b"PRIVATE KEY-----")
    roots = None if client_ca is None else _read_pem(client_ca, "--tls-client-ca", b"CERTIFICATE-----")
    return grpc.ssl_server_credentials(
        [(private, chain)], root_certificates=roots, require_client_auth=roots is not None
    )
