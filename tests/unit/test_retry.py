"""Backoff: exponential ceiling, full jitter, Retry-After as a floor, reset on success."""

from __future__ import annotations

import random

import pytest

from agent.retry import Backoff, RetryableError, call_with_retries


def test_ceiling_doubles_up_to_max() -> None:
    b = Backoff(initial=0.2, max=30.0, rng=random.Random(1))
    ceilings = []
    for _ in range(10):
        ceilings.append(b.ceiling())
        b.next_delay()
    assert ceilings == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0]


def test_full_jitter_spreads_delays_below_the_ceiling() -> None:
    delays = []
    for seed in range(200):
        b = Backoff(initial=1.0, max=30.0, rng=random.Random(seed))
        b.attempts = 3
        delays.append(b.next_delay())
    assert all(0 <= d <= 8.0 for d in delays)
    assert min(delays) < 1.0 and max(delays) > 7.0  # spread across the whole range


def test_retry_after_is_a_floor_capped_at_max() -> None:
    b = Backoff(initial=0.1, max=30.0, rng=random.Random(0))
    assert b.next_delay(retry_after=7) >= 7
    assert b.next_delay(retry_after=600) == 30.0


def test_call_with_retries_retries_then_succeeds_and_resets() -> None:
    calls, sleeps = [], []
    b = Backoff(initial=0.5, max=4.0, rng=random.Random(0))

    def op() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise RetryableError("503", retry_after=1.0 if len(calls) == 2 else None)
        return "ok"

    assert call_with_retries(op, b, tries=5, sleep=sleeps.append) == "ok"
    assert len(calls) == 3 and len(sleeps) == 2 and sleeps[1] >= 1.0
    assert b.attempts == 0


def test_call_with_retries_gives_up() -> None:
    def op() -> None:
        raise RetryableError("down")

    with pytest.raises(RetryableError, match="down"):
        call_with_retries(op, Backoff(rng=random.Random(0)), tries=3, sleep=lambda _s: None)
