"""The registration state machine's (agent.registry.registrar) settings, the pure decision of what it
wants, and what it reports: its states, its status for `mesh-agent status`, and the changes the API
confirmed, which agent.registry.events turns into Events."""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass
from typing import Any

from agent.health.state import Health
from agent.registry.converge import Want


class State(enum.Enum):
    STARTING = "starting"        # not reconciled with the API yet
    REGISTERED = "registered"    # entry present and ours (Healthy=True in condition mode)
    UNHEALTHY = "unhealthy"      # entry present with Healthy=False (condition mode)
    WITHDRAWN = "withdrawn"      # no entry
    HELD = "held"                # waiting for health/group; an entry we own is kept leased
    CONFLICT = "conflict"        # another live instance owns the entry: hands off
    RETRYING = "retrying"        # the API failed; backing off, nothing deleted
    REFUSED = "refused"          # 401/403/422: needs an admin; retried slowly
    STOPPED = "stopped"


# --- what it reports -------------------------------------------------------------------------------

@dataclass(frozen=True)
class RegistrationStatus:
    """For `mesh-agent status` and metrics."""

    state: State
    want: Want
    entry: str | None
    namespace: str | None
    message: str
    conflict_holder: str | None = None
    # What the API last confirmed, when, and since when nothing is confirmed (clock times of the loop):
    # during an outage the entry stays as it was last seen, so that is what status reports.
    known: State | None = None
    confirmed_at: float | None = None
    unknown_since: float | None = None


@dataclass(frozen=True)
class Change:
    """A change the API confirmed (or an input an operator set), with what explains it; taken with
    take_changes() and turned into a Kubernetes Event by agent.registry.events."""

    before: State | None                 # what the API had confirmed before (None: nothing yet)
    after: State | None                  # REGISTERED, UNHEALTHY, WITHDRAWN or CONFLICT: confirmed now
    want: Want
    namespace: str
    group: str
    instance: str
    entry: str | None = None
    entry_uid: str | None = None
    group_uid: str | None = None
    address: str = ""
    health_cause: str = ""               # agent.health.tracker.Cause value
    health_reason: str = ""
    maintenance: bool = False
    group_deleted: bool = False
    shutting_down: bool = False
    deleted: bool = False                # this convergence deleted the entry
    adopted_from: str | None = None      # Outcome.adopted_from
    holder: str | None = None            # CONFLICT: the instance holding the entry
    holder_until: dt.datetime | None = None
    maintenance_changed: bool | None = None  # set for a maintenance switch: on (True) or off (False)
    fenced: str = ""                     # CONFLICT: the API server refused this credential (Outcome.fenced)


@dataclass
class Settings:
    namespace: str
    group: str
    instance: str
    lease_duration: float = 40.0
    lease_renew: float = 20.0
    resync: float = 900.0
    condition_mode: bool = False
    backoff_initial: float = 0.5
    backoff_max: float = 18.0
    withdraw_on_shutdown: bool = True


# --- inputs and the wanted outcome ----------------------------------------------------------------

@dataclass
class Inputs:
    """What the registrar is told: the app's health (and why), maintenance, the group, the stop."""

    health: Health = Health.UNKNOWN
    message: str = ""
    cause: str = ""
    maintenance: bool = False
    group: dict[str, Any] | None = None
    group_deleted: bool = False
    shutting_down: bool = False


def why_withdrawn(i: Inputs, s: Settings) -> str:
    if i.shutting_down:
        return "withdrawn for shutdown"
    if i.maintenance:
        return "withdrawn: maintenance (mesh-agent register ends it)"
    if i.group_deleted:
        return f"withdrawn: the WorkloadGroup {s.namespace}/{s.group} was deleted"
    if i.health is Health.UNHEALTHY:
        return f"withdrawn: the app is unhealthy{': ' + i.message if i.message else ''}"
    return "not registered"


def decide_want(health: Health, maintenance: bool, group_known: bool, group_deleted: bool,
                condition_mode: bool, shutting_down: bool, withdraw_on_shutdown: bool = True) -> Want:
    if shutting_down:
        return Want.WITHDRAW if withdraw_on_shutdown else Want.HOLD
    if maintenance or group_deleted:
        return Want.WITHDRAW
    if not group_known or health is Health.UNKNOWN:
        return Want.HOLD
    if health is Health.HEALTHY:
        return Want.REGISTER
    return Want.MARK_UNHEALTHY if condition_mode else Want.WITHDRAW
