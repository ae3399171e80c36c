"""``python -m lossd_server.healthcheck``: exit 0 when the local server answers grpc.health.v1 SERVING, else 1.

The Docker image's HEALTHCHECK (also usable as a Kubernetes exec probe or from systemd). It reads the
same ``LOSSD_*`` variables as ``lossd serve``, through :class:`~lossd_server.config.Settings`, so the port,
the bind address and TLS cannot drift from what the server uses. Flags given to ``lossd serve`` are
invisible to it: configure a container through the environment. It imports neither torch nor the
servicer, so it is quick.

- Target: ``LOSSD_HOST``/``LOSSD_PORT`` as the server binds them; a wildcard host (0.0.0.0, ::) is
  checked on loopback. ``--target`` overrides.
- TLS: when ``LOSSD_TLS_CERT`` is set the check speaks TLS and trusts that certificate (right for a
  self-signed one); for a certificate a CA issued, pass ``--tls-ca``. The name verified is the
  certificate's first DNS name (the check connects to loopback, whose address a certificate rarely
  names), or ``--tls-server-name``. Under mutual TLS (``LOSSD_TLS_CLIENT_CA``) pass
  ``--tls-client-cert`` and ``--tls-client-key``.
- Health checking needs no bearer token: the server leaves it open.

Exit status 1 for every failure (Docker reserves 2), with the reason on stderr.
"""

from __future__ import annotations

import argparse
import ssl
import sys
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from lossd_server.config import Settings

UNHEALTHY = 1
_WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}


def _target(settings: Settings) -> str:
    host = _WILDCARDS.get(settings.bind_host, settings.bind_host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal
    return f"{host}:{settings.port}"


def _first_dns_name(cert: Path) -> str | None:
    """The first DNS subjectAltName of the first certificate in a PEM file, if CPython can decode it."""
    decode: Any = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return None
    try:
        info = decode(str(cert))
    except (OSError, ssl.SSLError, ValueError):
        return None
    for kind, value in info.get("subjectAltName", ()):
        if kind == "DNS" and "*" not in value:
            return str(value)
    return None


def _channel(settings: Settings, args: argparse.Namespace, target: str) -> Any:
    roots_path: Path | None = args.tls_ca or settings.tls_cert
    if roots_path is None:
        return grpc.insecure_channel(target)
    if settings.tls_client_ca is not None and args.tls_client_cert is None:
        print(
            "warning: the server requires client certificates (LOSSD_TLS_CLIENT_CA); "
            "pass --tls-client-cert and --tls-client-key",
            file=sys.stderr,
        )
    roots = roots_path.read_bytes()
    key = args.tls_client_key.read_bytes() if args.tls_client_key else None
    chain = args.tls_client_cert.read_bytes() if args.tls_client_cert else None
    credentials = grpc.ssl_channel_credentials(roots, key, chain)
    name = args.tls_server_name or (_first_dns_name(settings.tls_cert) if settings.tls_cert else None)
    options = [("grpc.ssl_target_name_override", name)] if name else []
    return grpc.secure_channel(target, credentials, options=options)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lossd_server.healthcheck",
        description="Exit 0 if the lossd server configured by the LOSSD_* environment answers SERVING.",
    )
    parser.add_argument("--target", help="host:port to check (default: LOSSD_HOST:LOSSD_PORT, wildcards on loopback)")
    parser.add_argument("--service", default="", help="health service name (default: '', the whole server)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer (default 5)")
    parser.add_argument("--tls-ca", type=Path, help="PEM roots to verify the server (default: LOSSD_TLS_CERT)")
    parser.add_argument("--tls-server-name", help="name to verify (default: the certificate's first DNS name)")
    parser.add_argument("--tls-client-cert", type=Path, help="PEM client certificate, for mutual TLS")
    parser.add_argument("--tls-client-key", type=Path, help="PEM private key of --tls-client-cert")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if (args.tls_client_cert is None) != (args.tls_client_key is None):
        print("unhealthy: --tls-client-cert and --tls-client-key go together", file=sys.stderr)
        return UNHEALTHY
    try:
        settings = Settings()
    except ValidationError as error:
        print(f"unhealthy: invalid LOSSD_* settings:\n{error}", file=sys.stderr)
        return UNHEALTHY
    if args.target is None and settings.port == 0:
        print("unhealthy: LOSSD_PORT=0 (a random port); pass --target", file=sys.stderr)
        return UNHEALTHY
    target = args.target or _target(settings)
    try:
        with _channel(settings, args, target) as channel:
            request = health_pb2.HealthCheckRequest(service=args.service)
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=args.timeout)
    except grpc.RpcError as error:
        print(f"unhealthy: {target}: {error.code().name}: {error.details()}", file=sys.stderr)
        return UNHEALTHY
    except OSError as error:
        print(f"unhealthy: {error}", file=sys.stderr)
        return UNHEALTHY
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"unhealthy: {target}: {status}", file=sys.stderr)
        return UNHEALTHY
    print(f"{target}: {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
