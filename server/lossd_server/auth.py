"""Who is calling: the tenant that owns the sessions a call may see.

Sessions are keyed by (owner, name), so one tenant never sees, reads or
overwrites another's. Without tokens every caller is the anonymous owner "".
"""

from __future__ import annotations

from collections.abc import Callable

from grpc import aio

Identify = Callable[[aio.ServicerContext], str]


def anonymous(context: aio.ServicerContext) -> str:
    return ""
