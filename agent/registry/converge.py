"""The registry's operations against the API: converge (read the entry and its lease, decide whose
they are, write what differs) and renew (the lease alone). Each is a short script of calls with a
timeout each, run in the registry's worker thread (agent.registry.worker); each returns an Outcome or
raises ApiError.

Ownership (entry.ownership): never touch an entry held by another instance with a live lease. Nothing
is deleted on uncertainty: a failed call raises, and the registrar retries later. Every entry and lease
written records this credential's API username (entry.OWNER_ANNOTATION, learned once per client with
Kube.whoami); where the admission policy fences per-VM identities, the API server refuses (422) a
write to an entry or lease another VM recorded, even one whose lease expired: that refusal comes back
as an Outcome naming that VM (`fenced`), not as an error, and the entry is left to the reaper.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.kube.client import ENTRIES, LEASES, Kube
from agent.kube.errors import ApiError, Conflict, Invalid, NotFound
from agent.registry import entry as E


class Want(enum.Enum):
    HOLD = "hold"                      # not known yet: keep whatever we own, change nothing
    REGISTER = "register"              # entry present (Healthy=True in condition mode)
    MARK_UNHEALTHY = "mark-unhealthy"  # entry present with Healthy=False (condition mode)
    WITHDRAW = "withdraw"              # entry absent


@dataclass(frozen=True)
class Outcome:
    """What an operation found and did (posted by the worker inside a RegistryResult)."""

    present: bool | None = None            # entry exists and is ours after the operation
    healthy: bool | None = None            # its Healthy condition, in condition mode
    lease: dict[str, Any] | None = None    # the lease as the server returned it
    conflict_holder: str | None = None
    conflict_until: dt.datetime | None = None
    error: ApiError | None = None
    lost_lease: bool = False               # a renewal found the lease changed: converge again
    wrote: tuple[str, ...] = ()            # what was written, for logs and tests
    entry_uid: str | None = None           # the entry's uid, when it is (or was, for a conflict) there
    # When an entry that was already there is kept as ours: its instance annotation ("" when it had
    # none: written by hand). None when the entry was created or is absent.
    adopted_from: str | None = None
    # The API server refused to let this credential write the entry or lease that another credential
    # (conflict_holder, an API username) recorded: its message. Left alone until the reaper removes it.
    fenced: str = ""


@dataclass(frozen=True)
class Spec:
    """What the worker needs to converge: the entry to apply and how to lease it."""

    entry: dict[str, Any]
    instance: str
    lease_duration: float
    condition_mode: bool
    message: str = ""


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _owner_ref(entry_obj: dict[str, Any] | None) -> dict[str, Any] | None:
    """The lease is owned by the entry, so deleting the entry (or its group) takes the lease along."""
    meta = (entry_obj or {}).get("metadata") or {}
    if not meta.get("uid"):
        return None
    return {"apiVersion": E.API_VERSION, "kind": "WorkloadEntry", "name": meta["name"], "uid": meta["uid"]}


def converge(kube: Kube, want: Want, spec: Spec, now: Callable[[], dt.datetime] = now) -> Outcome:
    """Read the entry and its lease, decide, and write what differs. Raises ApiError."""
    desired = spec.entry
    ns, name = desired["metadata"]["namespace"], desired["metadata"]["name"]
    actual = kube.get(ENTRIES, ns, name)
    lease = kube.get(LEASES, ns, name)
    own = E.ownership(actual, lease, spec.instance, now())
    found_uid = _uid(actual)
    if own.conflict:
        return Outcome(present=False, conflict_holder=own.holder, conflict_until=own.expires, entry_uid=found_uid)
    writer = kube.whoami()
    foreign = E.foreign_owner(writer, actual, lease)
    try:
        return _write(kube, want, spec, E.with_owner(desired, writer), writer, actual, lease, own, now)
    except Invalid as exc:
        # The policy's refusal names the recorded owner; any other 422 is an error as ever.
        if foreign is None or foreign not in str(exc):
            raise
        return Outcome(present=False, conflict_holder=foreign, conflict_until=own.expires, entry_uid=found_uid,
                       fenced=exc.detail or str(exc))


def _write(kube: Kube, want: Want, spec: Spec, desired: dict[str, Any], writer: str | None,
           actual: dict[str, Any] | None, lease: dict[str, Any] | None, own: E.Ownership,
           now: Callable[[], dt.datetime]) -> Outcome:
    ns, name = desired["metadata"]["namespace"], desired["metadata"]["name"]
    found_uid = _uid(actual)
    adopted = None if actual is None else str(
        ((actual.get("metadata") or {}).get("annotations") or {}).get(E.INSTANCE_ANNOTATION) or "")
    wrote: list[str] = []

    if want is Want.WITHDRAW or (want is Want.HOLD and (actual is None or not own.mine)):
        if want is Want.HOLD:
            return Outcome(present=False)
        if actual is not None:
            meta = actual["metadata"]
            kube.delete(ENTRIES, ns, name, uid=meta.get("uid"), resource_version=meta.get("resourceVersion"))
            wrote.append("delete entry")
        if lease is not None:
            kube.delete(LEASES, ns, name, uid=(lease.get("metadata") or {}).get("uid"))
            wrote.append("delete lease")
        return Outcome(present=False, wrote=tuple(wrote))

    # The lease first: a live lease is what makes the entry ours before we write the entry.
    new_lease = E.build_lease(name, ns, spec.instance, spec.lease_duration, now(), previous=lease,
                              owner=_owner_ref(actual), writer=writer)
    # A new lease is created, not applied: if another instance created it meanwhile, that is a 409
    # (read again) rather than a silent takeover. An existing one carries its resourceVersion.
    lease = kube.apply(LEASES, new_lease) if lease is not None else kube.create(LEASES, new_lease)
    wrote.append("lease")
    if want is Want.HOLD:
        return Outcome(present=True, healthy=_cond(actual), lease=lease, wrote=tuple(wrote), entry_uid=found_uid,
                       adopted_from=adopted)

    if E.drifted(desired, actual):
        body = desired
        if actual is not None:
            body = {**desired, "metadata": {**desired["metadata"],
                                            "resourceVersion": actual["metadata"].get("resourceVersion")}}
        actual = kube.apply(ENTRIES, body)
        wrote.append("entry")
        if _owner_ref(actual) and not (lease.get("metadata") or {}).get("ownerReferences"):
            lease = kube.apply(LEASES, E.build_lease(name, ns, spec.instance, spec.lease_duration, now(),
                                                     previous=lease, owner=_owner_ref(actual), writer=writer))
    healthy = None
    if spec.condition_mode:
        healthy = want is Want.REGISTER
        if E.condition_of(actual) != ("True" if healthy else "False"):
            cond = E.healthy_condition(healthy, now(), actual, spec.message)
            actual = kube.apply(ENTRIES, E.status_patch(desired, cond), subresource="status")
            wrote.append("status")
    return Outcome(present=True, healthy=healthy, lease=lease, wrote=tuple(wrote), entry_uid=_uid(actual),
                   adopted_from=adopted)


def _uid(entry_obj: dict[str, Any] | None) -> str | None:
    return ((entry_obj or {}).get("metadata") or {}).get("uid") or None


def _cond(entry_obj: dict[str, Any] | None) -> bool | None:
    c = E.condition_of(entry_obj)
    return None if c is None else c == "True"


def renew(kube: Kube, lease: dict[str, Any], spec: Spec, now: Callable[[], dt.datetime] = now) -> Outcome:
    """Renew our lease with its resourceVersion as precondition: one request at steady state. The lease
    changed (409), gone (404), or created anew by the apply (a new uid: a server that creates on apply
    despite the resourceVersion; the reaper deletes the lease before the entry) is a lost lease."""
    meta = lease["metadata"]
    new = E.build_lease(meta["name"], meta["namespace"], spec.instance, spec.lease_duration, now(),
                        previous=lease, owner=(meta.get("ownerReferences") or [None])[0], writer=kube.whoami())
    try:
        renewed = kube.apply(LEASES, new)
    except (Conflict, NotFound):
        return Outcome(lost_lease=True)
    if meta.get("uid") and _uid(renewed) != meta["uid"]:
        return Outcome(lost_lease=True)
    return Outcome(present=True, lease=renewed, wrote=("lease",))
