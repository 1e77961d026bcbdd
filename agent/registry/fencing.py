"""What the registrar does when the entry at its address is someone else's: how long it waits and what it
says. Pure, but for the backoff's random draw.

Two kinds, both shown as the CONFLICT state:
- held: another instance holds the entry with a live lease (entry.ownership). Nothing is written; the
  registrar looks again when that lease would expire (at the latest at the next resync).
- fenced: the entry or its lease records another API username (entry.OWNER_ANNOTATION) and the API
  server refused this credential the write (the per-VM admission policy, 422), even though the lease
  expired: a clone, or a reused address whose previous VM died without withdrawing. Only the reaper
  (wider rights) may remove that entry, so the registrar backs off (agent.retry, full jitter, at least
  half a renewal period, at most max(backoff.max, the lease's duration)) instead of retrying at the
  lease's expiry, and registers once the entry is gone.
"""

from __future__ import annotations

import datetime as dt
import random

from agent.registry import entry as E
from agent.registry.converge import Outcome
from agent.registry.states import Settings
from agent.retry import Backoff


class Fence:
    """The wait before looking again at an entry that is not ours, and the status message."""

    def __init__(self, settings: Settings, rng: random.Random) -> None:
        self.s = settings
        self._backoff = Backoff(settings.lease_renew, max(settings.backoff_max, settings.lease_duration), rng)

    def clear(self) -> None:
        """The entry is ours again (or gone): the next refusal starts the backoff afresh."""
        self._backoff.reset()

    def wait(self, out: Outcome, name: str, wall_now: dt.datetime) -> tuple[float, str]:
        """(seconds until the next convergence, the state's message) for a conflict outcome."""
        holder, until = out.conflict_holder, out.conflict_until
        if not out.fenced:
            wait = self.s.resync
            if until is not None:
                wait = min(wait, max(1.0, (until - wall_now).total_seconds() + 1.0))
            return wait, f"entry {name} belongs to instance {holder}, whose lease is live: not touching it"
        delay = max(self.s.lease_renew / 2, self._backoff.next_delay())
        if until is None:
            lease = "it has no lease"
        elif until > wall_now:
            lease = f"its lease is live until {E.format_time(until)}"
        else:
            lease = f"its lease expired at {E.format_time(until)}"
        return delay, (f"entry {name} belongs to {holder} ({lease}) and the API server refuses this "
                       f"credential to touch it; waiting for the reaper to remove it, next look in {delay:.1f}s "
                       f"({out.fenced})")
