"""The one place for retries: exponential backoff with full jitter, honouring Retry-After.

Full jitter (sleep a random time between 0 and the exponential cap) spreads a fleet of agents that
lost the same server at the same moment, so they do not come back in lock-step.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


@dataclass
class Backoff:
    """Delays for successive failures: attempt n waits uniform(0, min(max, initial * 2**n))."""

    initial: float = 0.2
    max: float = 30.0
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0

    def ceiling(self) -> float:
        return min(self.max, self.initial * (2 ** min(self.attempts, 62)))

    def next_delay(self, retry_after: float | None = None) -> float:
        """The delay before the next try. A server's Retry-After is a floor, still capped at max."""
        delay = self.rng.uniform(0, self.ceiling())
        self.attempts += 1
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max))
        return delay

    def reset(self) -> None:
        self.attempts = 0


class RetryableError(Exception):
    """Raised by an operation that may succeed when tried again; retry_after in seconds if known."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def call_with_retries(op: Callable[[], T], backoff: Backoff, tries: int,
                      sleep: Callable[[float], None] = time.sleep,
                      on_retry: Callable[[int, Exception, float], None] | None = None) -> T:
    """Run op until it returns, retrying RetryableError up to `tries` times in all."""
    for attempt in range(1, tries + 1):
        try:
            result = op()
        except RetryableError as exc:
            if attempt == tries:
                raise
            delay = backoff.next_delay(exc.retry_after)
            if on_retry is not None:
                on_retry(attempt, exc, delay)
            sleep(delay)
        else:
            backoff.reset()
            return result
    raise AssertionError("unreachable")
