"""Start-up warnings about files whose permissions let other local users read secrets or replace state.

They warn rather than refuse: Kubernetes and compose mount secrets 0444/0644 by
default, and a refusal there would only teach people to work around it
(docs/security.md, "File permissions").
"""

from __future__ import annotations

import logging
import stat
from pathlib import Path

log = logging.getLogger("lossd_server")


def _st_mode(path: Path) -> int | None:
    try:
        return path.stat().st_mode
    except OSError:
        return None  # missing or unreadable: whoever opens it reports that


def warn_if_token_file_readable(path: Path) -> None:
    """Whoever can read the bearer tokens can call as any tenant in the file."""
    st_mode = _st_mode(path)
    mode = stat.S_IMODE(st_mode or 0)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "token file %s has mode %04o: group or other local users can read or change the bearer tokens; "
            "run `chmod 600 %s`",
            path,
            mode,
            path,
            extra={"token_file": str(path), "mode": f"{mode:04o}"},
        )


def warn_if_state_dir_writable(path: Path) -> None:
    """Anyone who can write the state directory can replace or delete the store file under the server."""
    st_mode = _st_mode(path)
    mode = stat.S_IMODE(st_mode or 0)
    if st_mode is not None and stat.S_ISDIR(st_mode) and mode & (stat.S_IWGRP | stat.S_IWOTH):
        log.warning(
            "state directory %s has mode %04o: other local users can replace or delete the session store; "
            "run `chmod 700 %s`",
            path,
            mode,
            path,
            extra={"state_dir": str(path), "mode": f"{mode:04o}"},
        )
