"""The one conversion of monotonic times (the loop's clock) to wall-clock times, for status.json.

The offset between the two clocks is read once and kept while it holds to within `STEP`: the same
monotonic moment then always gives the same wall time, so status.json is rewritten when something in
it changed, not because two reads of the clocks a few microseconds apart disagree in the last digits.
A clock step (NTP, a resumed VM) moves the offset.
"""

from __future__ import annotations

import time

STEP = 0.01  # seconds the clocks may drift apart (NTP slews at most 0.5 ms/s) before the offset is read again

_offset: float | None = None


def wall_offset() -> float:
    """Wall-clock time minus monotonic time, stable between clock steps."""
    global _offset
    now = time.time() - time.monotonic()
    if _offset is None or abs(now - _offset) > STEP:
        _offset = now
    return _offset


def to_wall(monotonic: float) -> float:
    return monotonic + wall_offset()
