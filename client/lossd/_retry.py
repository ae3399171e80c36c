"""Transparent retries of calls that failed with UNAVAILABLE (a restart, a dropped connection).

Every call lossd retries is safe to repeat: loss requests keep their id, so the
server applies each at most once and answers a resend with the original
response; next_epoch names its epoch; the other RPCs are idempotent.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from lossd._exceptions import UnavailableError

R = TypeVar("R")
log = logging.getLogger("lossd")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, for up to ``deadline`` seconds after the first failure (0: never retry)."""

    deadline: float = 60.0
    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.deadline < 0 or self.initial_backoff <= 0 or self.max_backoff < self.initial_backoff:
            raise ValueError(f"invalid retry policy: {self}")

    def run(self, attempt: Callable[[], R], target: str, sleep: Callable[[float], None] = time.sleep) -> R:
        """``attempt()`` until it succeeds, fails otherwise, or UNAVAILABLE outlasts the deadline."""
        started = time.monotonic()
        backoff = self.initial_backoff
        attempts = 0
        while True:
            attempts += 1
            try:
                return attempt()
            except UnavailableError as error:
                elapsed = time.monotonic() - started
                if elapsed >= self.deadline:
                    raise UnavailableError(
                        f"lossd server {target} still unavailable after retrying for {elapsed:.1f} s "
                        f"({attempts} attempts, retry deadline {self.deadline:g} s): {error.message}"
                    ) from error
                pause = min(backoff * random.uniform(0.5, 1.0), self.deadline - elapsed)
                log.warning("lossd server %s unavailable (%s); retrying in %.2f s", target, error.message, pause)
                sleep(pause)
                backoff = min(backoff * self.multiplier, self.max_backoff)
