"""Kubernetes Events that explain the entry: why the VM joined or left the mesh, readable with
`kubectl describe workloadentry` and `kubectl get events` without logging in to the VM. Pure: no
threads, no I/O; the writer (agent.registry.recorder) sends what this decides.

Two steps:
- `notice(change)`: the registrar's confirmed changes (agent.registry.states.Change) to a Notice
  (reason, type, action, note, the object it is about). The reasons are listed in docs/registry.md.
- `Aggregator`: what Kubernetes' own recorders do before writing (client-go tools/events and
  tools/record): an event whose regarding object, type, action, reason and reporting controller and
  instance match one observed less than SERIES_WINDOW ago is not a new object but the next of a series:
  a PATCH of `series.count` and `series.lastObservedTime` (the note of the first stays, as the API
  keeps it immutable). Each repeat is patched at once, so `kubectl describe` shows the count as it
  is; tools/events patches only the second at once and sends later counts every 30 minutes or when the
  series ends. The registry's changes are rare, and the spam filter bounds them. A token bucket per
  regarding object (burst SPAM_BURST, one token every SPAM_REFILL seconds, as tools/record's spam
  filter) drops the excess.
"""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from agent.registry import entry as E
from agent.registry.converge import Want
from agent.registry.states import Change, State

API_VERSION = "events.k8s.io/v1"
# Validated as a qualified name by the API server ([prefix/]name).
REPORTING_CONTROLLER = "mesh-agent.io/registry"
NOTE_LIMIT = 1024          # bytes, as the API server counts them
SERIES_WINDOW = 360.0      # seconds since the last observation after which a series ends (client-go: 6 min)
SPAM_BURST = 25            # client-go tools/record defaults
SPAM_REFILL = 300.0
CACHE_SIZE = 256

NORMAL, WARNING = "Normal", "Warning"

# The health part's causes (agent.health.tracker.Cause values) as event reasons.
_HEALTH_REASONS = {
    "process-exited": "AppExited",
    "port-closed": "AppPortClosed",
    "probe-failed": "AppProbeFailed",
    "sidecar-not-ready": "SidecarNotReady",
}


@dataclass(frozen=True)
class Ref:
    """The object an event is about (events.k8s.io/v1 ObjectReference)."""

    kind: str
    namespace: str
    name: str
    uid: str | None = None
    api_version: str = E.API_VERSION

    def as_dict(self) -> dict[str, str]:
        out = {"apiVersion": self.api_version, "kind": self.kind, "namespace": self.namespace, "name": self.name}
        if self.uid:
            out["uid"] = self.uid
        return out


@dataclass(frozen=True)
class Notice:
    """One event to record: what happened (reason, action), how bad (type), the operator's text (note)."""

    regarding: Ref
    reason: str
    action: str
    note: str
    type: str = NORMAL


def _unhealthy_reason(cause: str) -> str:
    return _HEALTH_REASONS.get(cause, "AppUnhealthy")


def _entry_ref(c: Change) -> Ref:
    return Ref("WorkloadEntry", c.namespace, c.entry or c.group, c.entry_uid)


def _group_ref(c: Change) -> Ref:
    return Ref("WorkloadGroup", c.namespace, c.group, c.group_uid)


def notice(c: Change) -> Notice | None:
    """The event for one change, or None when it is not worth one (decided from the change alone)."""
    if c.maintenance_changed is not None:
        ref = _entry_ref(c) if c.entry_uid and c.after in (State.REGISTERED, State.UNHEALTHY) else _group_ref(c)
        if c.maintenance_changed:
            return Notice(ref, "MaintenanceStarted", "Maintenance",
                          "maintenance started on the VM (mesh-agent deregister): the entry is withdrawn until "
                          "`mesh-agent register`")
        return Notice(ref, "MaintenanceEnded", "Maintenance",
                      "maintenance ended on the VM (mesh-agent register): the entry is registered again once "
                      "the app is healthy")
    if c.after is State.CONFLICT and c.fenced:
        return Notice(_entry_ref(c), "EntryHeldByAnotherInstance", "Refuse",
                      f"entry {c.entry} belongs to {c.holder}, and the API server refuses instance {c.instance}'s "
                      "credential to touch it: left to the reaper (a clone, or a reused address?)", WARNING)
    if c.after is State.CONFLICT:
        until = f" until {E.format_time(c.holder_until)}" if c.holder_until is not None else ""
        return Notice(_entry_ref(c), "EntryHeldByAnotherInstance", "Refuse",
                      f"entry {c.entry} is held by instance {c.holder}, whose lease is live{until}: instance "
                      f"{c.instance} does not touch it (two VMs claim the same address?)", WARNING)
    if c.after is State.REGISTERED:
        if c.adopted_from is not None and c.before in (None, State.WITHDRAWN, State.CONFLICT):
            if c.adopted_from == c.instance:
                note = f"instance {c.instance} took over the entry left by its previous run"
            elif c.adopted_from:
                note = (f"instance {c.instance} took over the entry from instance {c.adopted_from}, "
                        "whose lease had expired")
            else:
                note = f"instance {c.instance} took over the entry written by someone else (no live lease)"
            return Notice(_entry_ref(c), "Adopted", "Adopt", f"{note}; address {c.address}".strip())
        if c.before is State.UNHEALTHY:
            return Notice(_entry_ref(c), "Healthy", "Register",
                          f"the app is healthy again: entry marked Healthy=True (instance {c.instance})")
        return Notice(_entry_ref(c), "Registered", "Register",
                      f"the app is healthy: entry registered for {c.address} (instance {c.instance})")
    if c.after is State.UNHEALTHY:
        why = c.health_reason or "unhealthy"
        return Notice(_entry_ref(c), _unhealthy_reason(c.health_cause), "MarkUnhealthy",
                      f"{why}; entry kept with Healthy=False", WARNING)
    if c.after is State.WITHDRAWN:
        if not c.deleted and c.before not in (State.REGISTERED, State.UNHEALTHY):
            return None  # there was no entry (or another instance's) and nothing was done
        return _withdrawal(c)
    return None


def _withdrawal(c: Change) -> Notice:
    # The entry is gone: the event is about the group, which outlives it.
    ref = _group_ref(c)
    entry = f"entry {c.entry} withdrawn"
    if c.want is not Want.WITHDRAW:
        return Notice(ref, "Withdrawn", "Withdraw", f"{entry}", WARNING)
    if c.shutting_down:
        return Notice(ref, "Shutdown", "Withdraw", f"the agent is stopping: {entry}")
    if c.maintenance:
        return Notice(ref, "Maintenance", "Withdraw", f"maintenance (mesh-agent deregister): {entry}")
    if c.group_deleted:
        return Notice(ref, "GroupDeleted", "Withdraw",
                      f"the WorkloadGroup {c.namespace}/{c.group} was deleted: {entry}", WARNING)
    why = c.health_reason or "the app is unhealthy"
    return Notice(ref, _unhealthy_reason(c.health_cause), "Withdraw", f"{why}; {entry}", WARNING)


def truncate_note(note: str, limit: int = NOTE_LIMIT) -> str:
    """At most `limit` bytes of UTF-8, cut on a character boundary."""
    data = note.encode()
    if len(data) <= limit:
        return note
    return data[:limit - 3].decode(errors="ignore") + "..."


def event_body(n: Notice, name: str, instance: str, when: dt.datetime) -> dict[str, Any]:
    """The events.k8s.io/v1 Event as created (a series, when it has one, is added by the caller)."""
    return {"apiVersion": API_VERSION, "kind": "Event",
            "metadata": {"name": name, "namespace": n.regarding.namespace},
            "eventTime": E.format_micro_time(when), "reportingController": REPORTING_CONTROLLER,
            "reportingInstance": instance, "action": n.action, "reason": n.reason,
            "regarding": n.regarding.as_dict(), "note": truncate_note(n.note), "type": n.type}


def event_name(regarding: str, when: dt.datetime) -> str:
    """As client-go names them: the object's name and the time in hexadecimal nanoseconds."""
    nanos = int(when.timestamp()) * 1_000_000_000 + when.microsecond * 1000
    return f"{regarding}.{nanos:x}"


# --- aggregation ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Write:
    """One API write for the writer: create `body`, or patch the series of the event `body` names (and
    create `body`, series included, if that event is gone)."""

    op: str                     # "create" | "patch"
    body: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])

    @property
    def namespace(self) -> str:
        return str(self.body["metadata"]["namespace"])

    def series_patch(self) -> dict[str, Any]:
        return {"series": self.body["series"]}


@dataclass
class _Cached:
    body: dict[str, Any]
    count: int
    last: dt.datetime


@dataclass
class _Bucket:
    tokens: float
    at: dt.datetime


@dataclass
class Aggregator:
    """Series and the spam filter. Loop-thread only; `now` is wall-clock time (UTC)."""

    instance: str
    window: float = SERIES_WINDOW
    burst: int = SPAM_BURST
    refill: float = SPAM_REFILL
    size: int = CACHE_SIZE
    filtered: int = 0
    _cache: OrderedDict[tuple[Any, ...], _Cached] = field(default_factory=OrderedDict)
    _buckets: OrderedDict[tuple[Any, ...], _Bucket] = field(default_factory=OrderedDict)

    def record(self, n: Notice, now: dt.datetime) -> Write | None:
        """The write for this notice, or None when the spam filter drops it."""
        if not self._take(n.regarding, now):
            self.filtered += 1
            return None
        key = (n.regarding, n.type, n.action, n.reason, REPORTING_CONTROLLER, self.instance)
        cached = self._cache.get(key)
        if cached is not None and (now - cached.last).total_seconds() <= self.window:
            cached.count += 1
            cached.last = now
            self._cache.move_to_end(key)
            body = {**cached.body, "series": {"count": cached.count, "lastObservedTime": E.format_micro_time(now)}}
            return Write("patch", body)
        body = event_body(n, event_name(n.regarding.name, now), self.instance, now)
        self._cache[key] = _Cached(body, 1, now)
        self._cache.move_to_end(key)
        while len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return Write("create", body)

    def _take(self, ref: Ref, now: dt.datetime) -> bool:
        key = (ref.kind, ref.namespace, ref.name, ref.uid)
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket(float(self.burst), now)
            while len(self._buckets) > self.size:
                self._buckets.popitem(last=False)
        elapsed = max(0.0, (now - b.at).total_seconds())
        b.tokens = min(float(self.burst), b.tokens + elapsed / self.refill)
        b.at = now
        if b.tokens < 1.0:
            return False
        b.tokens -= 1.0
        return True
