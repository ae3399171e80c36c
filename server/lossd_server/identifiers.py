"""The identifiers a client sends, their limits, and how errors quote them.

Checked before anything else, so a long or odd identifier is refused with
INVALID_ARGUMENT before it is stored, logged or echoed. Error messages quote a
client's strings through :func:`quoted`, so no status message can outgrow gRPC's
metadata limit (8 KiB soft, 16 KiB hard), which would turn the status into
RESOURCE_EXHAUSTED on the client.
"""

from __future__ import annotations

import re

from lossd._exceptions import InvalidArgumentError

MAX_SESSION_NAME = 256
MAX_REQUEST_ID = 128
MAX_TENANT_NAME = 128  # lossd_server.auth checks tenant names in the token file against the same rule
QUOTE_LIMIT = 80

SESSION_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._:/@+=-]{{0,{MAX_SESSION_NAME - 1}}}")
REQUEST_ID = re.compile(rf"[\x21-\x7e]{{1,{MAX_REQUEST_ID}}}")  # printable ASCII, no spaces


def quoted(value: str, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)``, cut to ``limit`` characters with the full length said, for error messages."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def check_session_name(name: str) -> None:
    if not SESSION_NAME.fullmatch(name):
        raise InvalidArgumentError(
            f"name: expected 1-{MAX_SESSION_NAME} letters, digits and ._:/@+=- starting with a letter or digit, "
            f"got {quoted(name)}"
        )


def check_request_id(request_id: str) -> None:
    """An empty id is allowed (no exactly-once for that request); else 1-128 printable ASCII characters."""
    if request_id and not REQUEST_ID.fullmatch(request_id):
        raise InvalidArgumentError(
            f"request_id: expected 1-{MAX_REQUEST_ID} printable ASCII characters without spaces, "
            f"got {quoted(request_id)}"
        )
