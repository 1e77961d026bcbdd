"""Keeps the VM's WorkloadEntry as it should be: the registration state machine. Pure: no threads, no
I/O, no clock of its own; the daemon's loop owns it.

The loop calls it (set_* inputs, handle(event), tick(now)); it hands each API operation (a closure over
agent.registry.converge) to `submit`, which runs it in the worker thread (agent.registry.worker) and
posts the Outcome back as RegistryResult. The loop therefore never blocks on the API (a slow or dead API
server cannot starve probes or the watchdog), and since one operation runs at a time there is no race
between a renewal and a withdrawal of the same entry. The WorkloadGroup comes in as GroupSeen /
GroupGone (agent.registry.group).

The decisions:
- what we want (decide_want): register when healthy, withdraw (or mark Healthy=False in condition
  mode) when unhealthy, withdraw in maintenance, when the group is deleted and at shutdown; HOLD while
  health or the group is not known yet, which keeps (and keeps leasing) an entry we already own, so a
  restart or upgrade never drops the VM from the mesh;
- who owns the entry (entry.ownership): never touch one another instance holds with a live lease, or
  that the API server refuses this credential (agent.registry.fencing: back off, the reaper removes it);
- failures: never delete on uncertainty; retry with agent.retry's backoff (Retry-After honoured, 30 s
  cap) and converge with a full read when the API answers again; resync every `resync` seconds. A
  renewal not answered (unreachable, timeout, 5xx, 429) is retried as a renewal, one write (a lease
  changed, gone or created anew converges in full: converge.renew): after an outage, one request;
- a new address (move): the entry at the new address is converged first, then the one at the old
  address is withdrawn with its lease (make before break: the VM stays in the mesh throughout). The
  withdrawal is an ordinary convergence to WITHDRAW, so the old entry is left alone if another instance
  now holds it with a live lease (its address went to another VM); failing, it is retried with backoff,
  and an old entry never withdrawn loses its lease, which expires, and the reaper removes it.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from agent.health.state import Health
from agent.kube.client import Kube
from agent.kube.errors import ApiError, Conflict, Invalid, Unauthorized, Unavailable
from agent.registry import entry as E
from agent.registry.converge import Outcome, Spec, Want, converge, renew
from agent.registry.fencing import Fence
from agent.registry.group import GroupGone, GroupSeen, GroupUnavailable
from agent.registry.states import Change, Inputs, RegistrationStatus, Settings, State, decide_want, why_withdrawn
from agent.registry.worker import RegistryResult
from agent.retry import Backoff

log = logging.getLogger(__name__)


# --- the state machine (runs in the loop) ---------------------------------------------------------

MAX_CHANGES = 64

class Registrar:
    """The registration state machine. Loop-thread only; see the module docstring.

    `build(group) -> entry dict` makes the desired entry (entry.build_entry with this VM's inputs);
    an EntryError from it is a configuration problem, reported as REFUSED.
    """

    def __init__(self, settings: Settings, build: Callable[[dict[str, Any]], dict[str, Any]],
                 submit: Callable[[int, Callable[[Kube], Outcome]], None],
                 rng: random.Random | None = None) -> None:
        self.s = settings
        self.build = build
        self.submit = submit
        self.rng = rng or random.Random()
        self.inputs = Inputs()
        self.state = State.STARTING
        self.message = "not reconciled yet"
        self.conflict_holder: str | None = None
        self._backoff = Backoff(settings.backoff_initial, settings.backoff_max, self.rng)
        self._fence = Fence(settings, self.rng)   # an entry that is not ours: agent.registry.fencing
        self._seq = 0
        self._in_flight: int | None = None
        self._in_flight_want: Want | None = None
        self._converged: Want | None = None      # the want the last full convergence achieved
        self._lease: dict[str, Any] | None = None
        self._next_converge: float = 0.0          # 0: as soon as possible
        self._next_renew: float | None = None
        self._dirty = True                        # inputs changed since the last convergence
        self._conflicts_in_row = 0
        self.finished = False                     # after shutdown(): withdrawn, or gave up
        self._shutdown_deadline: float | None = None
        self._entry_name: str | None = None
        self._known: State | None = None           # the state the API last confirmed
        self._confirmed_at: float | None = None
        self._unknown_since: float | None = None   # first failure since that confirmation
        self._changes: list[Change] = []
        self._entry_uid: str | None = None
        self._address = ""
        self._retiring: list[dict[str, Any]] = []  # entries at earlier addresses, to withdraw in turn
        self._retire_ready = False                # the entry at the new address was converged
        self._retire_seq: int | None = None
        self._retire_at = 0.0
        self._finish_pending: str | None = None   # shutdown done but for the old entry
        self._renew_retry: tuple[State, str] | None = None  # retrying a renewal: the state it had

    # inputs ----------------------------------------------------------------------------------------
    def set_health(self, health: Health, message: str = "", cause: str = "") -> None:
        """The app's health (agent.health.state) and why (the tracker's cause and reason); UNKNOWN holds
        what we have."""
        if health is not self.inputs.health:
            self.inputs.health, self.inputs.message, self.inputs.cause = health, message, cause
            self._dirty = True

    def set_maintenance(self, on: bool) -> None:
        if on != self.inputs.maintenance:
            self.inputs.maintenance = on
            self._dirty = True
            if self._seq:  # a switch while running, not the state found at start
                self._note(self._change(self._known, self._known, maintenance_changed=on))

    def _note(self, change: Change) -> None:
        # Bounded, for a caller that never takes them: the newest matter most.
        self._changes = [*self._changes[-(MAX_CHANGES - 1):], change]

    def take_changes(self) -> list[Change]:
        """The changes since the last call (for agent.registry.events), oldest first."""
        out, self._changes = self._changes, []
        return out

    def _change(self, before: State | None, after: State | None, want: Want | None = None, **kw: Any) -> Change:
        i = self.inputs
        return Change(before, after, want or self.want, self.s.namespace, self.s.group, self.s.instance,
                      self._entry_name, self._entry_uid, (_meta_of(i.group) if i.group else None), self._address,
                      i.cause, i.message, i.maintenance, i.group_deleted, i.shutting_down, **kw)

    def set_group(self, group: dict[str, Any] | None) -> None:
        """The WorkloadGroup as read or watched; None when it was deleted."""
        if group is None:
            if not self.inputs.group_deleted:
                self.inputs.group_deleted, self._dirty = True, True
            return
        old = self.inputs.group
        self.inputs.group, self.inputs.group_deleted = group, False
        if old is None or old.get("spec") != group.get("spec") or _meta_of(old) != _meta_of(group):
            self._dirty = True

    def move(self, build: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        """This VM's address changed: `build` now makes the entry (at the new address). The entry at
        the old address is withdrawn once the new one is converged (see the module docstring)."""
        group = self.inputs.group if self.inputs.group is not None else self._stub_group()
        try:
            old: dict[str, Any] | None = self.build(group)
        except ValueError:
            old = None
        self.build = build
        try:
            new_name = build(group)["metadata"]["name"]
        except ValueError:
            new_name = None
        # Back at an earlier address: that entry is wanted again. Several moves in a row: each earlier
        # entry is withdrawn in turn.
        self._retiring = [e for e in self._retiring if e["metadata"]["name"] != new_name]
        if old is not None and old["metadata"]["name"] != new_name and \
                all(e["metadata"]["name"] != old["metadata"]["name"] for e in self._retiring):
            self._retiring.append(old)
        self._retire_ready = False
        # The lease is named after the old entry: renewing it would keep the old entry alive.
        self._lease, self._next_renew = None, None
        # An operation in flight concerns the old entry: its answer is ignored (the worker runs one
        # operation at a time, so the next one waits for it anyway).
        self._in_flight = self._in_flight_want = None
        self._retire_seq = None
        self._dirty, self._next_converge = True, 0.0
        self._entry_name = new_name

    def shutdown(self, now: float, timeout: float, withdraw: bool = True) -> None:
        """Begin the stop: withdraw (unless `withdraw` is False, e.g. for an upgrade re-exec) and set
        `finished` when done or when `timeout` passed (the lease then expires and the reaper cleans)."""
        self.inputs.shutting_down = True
        self.s = replace(self.s, withdraw_on_shutdown=withdraw)
        self._shutdown_deadline = now + timeout
        self._dirty = True
        self._next_converge = 0.0

    def handle(self, event: object, now: float) -> bool:
        """Feed an event from the loop's queue; False when it is not the registry's."""
        if isinstance(event, RegistryResult):
            self._on_result(event, now)
        elif isinstance(event, GroupSeen):
            self.set_group(event.group)
        elif isinstance(event, GroupGone):
            self.set_group(None)
        elif isinstance(event, GroupUnavailable):
            log.warning("cannot read the WorkloadGroup: %s", event.error)
        else:
            return False
        return True

    @property
    def want(self) -> Want:
        i = self.inputs
        return decide_want(i.health, i.maintenance, i.group is not None, i.group_deleted,
                           self.s.condition_mode, i.shutting_down, self.s.withdraw_on_shutdown)

    # the clock -------------------------------------------------------------------------------------
    def tick(self, now: float) -> float:
        """Start what is due; returns the monotonic time by which tick wants to be called again."""
        if self.finished:
            return now + 3600.0
        if self._shutdown_deadline is not None and now >= self._shutdown_deadline:
            self._finish("shutdown timed out; the entry's lease will expire and the reaper removes it")
            return now + 3600.0
        if self._in_flight is not None:
            later = now + self.s.lease_renew
            return min(later, self._shutdown_deadline) if self._shutdown_deadline is not None else later
        if self._retiring and self._retire_ready and now >= self._retire_at:
            self._start_retire()
            return now + self.s.lease_renew
        if self._dirty and self._next_converge > now and self.state not in (State.RETRYING, State.REFUSED,
                                                                             State.CONFLICT):
            self._next_converge = now
        elif self._dirty and self._renew_retry is not None and self._next_renew is not None:
            self._next_converge = min(self._next_converge, self._next_renew)  # converge at the next try
        if now >= self._next_converge:
            self._start_converge(now)
            return now + self.s.lease_renew
        if self._next_renew is not None and now >= self._next_renew and self._lease is not None:
            self._start_renew()
            return now + self.s.lease_renew
        deadlines = [self._next_converge]
        if self._next_renew is not None and self._lease is not None:
            deadlines.append(self._next_renew)
        if self._shutdown_deadline is not None:
            deadlines.append(self._shutdown_deadline)
        if self._retiring and self._retire_ready:
            deadlines.append(self._retire_at)
        return min(deadlines)

    def _start_converge(self, now: float) -> None:
        want = self.want
        group = self.inputs.group
        if group is None and want in (Want.REGISTER, Want.MARK_UNHEALTHY):
            want = Want.HOLD  # cannot write an entry without its group; keep what we own
        try:
            # Holding or withdrawing needs only the entry's name, which the group's name gives.
            desired = self.build(group if group is not None else self._stub_group())
        except ValueError as exc:
            self._set(State.REFUSED, f"cannot build the WorkloadEntry: {exc}")
            self._next_converge = now + self.s.backoff_max
            self._dirty = False
            return
        self._entry_name, self._renew_retry = desired["metadata"]["name"], None
        self._address = str((desired.get("spec") or {}).get("address") or "")
        spec = Spec(desired, self.s.instance, self.s.lease_duration, self.s.condition_mode,
                    self.inputs.message)
        self._dirty = False
        self._dispatch(want, lambda kube: converge(kube, want, spec))

    def _stub_group(self) -> dict[str, Any]:
        return {"apiVersion": E.API_VERSION, "kind": "WorkloadGroup",
                "metadata": {"name": self.s.group, "namespace": self.s.namespace}, "spec": {}}

    def _start_retire(self) -> None:
        old = self._retiring[0]
        spec = Spec(old, self.s.instance, self.s.lease_duration, self.s.condition_mode)
        self._dispatch(Want.WITHDRAW, lambda kube: converge(kube, Want.WITHDRAW, spec))
        self._retire_seq = self._seq

    def _on_retired(self, out: Outcome, now: float) -> None:
        name = self._retiring[0]["metadata"]["name"] if self._retiring else "?"
        if out.error is not None:
            delay = self._backoff.next_delay(getattr(out.error, "retry_after", None))
            log.warning("registry: withdrawing %s (the old address) failed: %s; retrying in %.1fs",
                        name, out.error, delay)
            self._retire_at = now + delay
            return
        if out.conflict_holder is not None:
            log.info("registry: %s (the old address) is now instance %s's: left alone", name, out.conflict_holder)
        else:
            log.info("registry: moved; %s (the old address) %s", name,
                     "withdrawn (" + ", ".join(out.wrote) + ")" if out.wrote else "was already gone")
        self._retiring, self._retire_at = self._retiring[1:], 0.0
        if not self._retiring and self._finish_pending is not None:
            self._finish(self._finish_pending)

    def _start_renew(self) -> None:
        lease = self._lease
        assert lease is not None
        spec = Spec({}, self.s.instance, self.s.lease_duration, self.s.condition_mode)
        self._dispatch(None, lambda kube: renew(kube, lease, spec))

    def _dispatch(self, want: Want | None, op: Callable[[Kube], Outcome]) -> None:
        self._seq += 1
        self._in_flight, self._in_flight_want = self._seq, want
        self.submit(self._seq, op)

    # results ---------------------------------------------------------------------------------------
    def _on_result(self, ev: RegistryResult, now: float) -> None:
        if ev.seq != self._in_flight:
            return
        want, self._in_flight, self._in_flight_want = self._in_flight_want, None, None
        out = ev.outcome
        if ev.seq == self._retire_seq:
            self._retire_seq = None
            self._on_retired(out, now)
            return
        if want is not None and (out.error is None or out.conflict_holder is not None):
            self._retire_ready = True  # the entry at the new address is as wanted: the old one may go
        if out.error is not None:
            self._on_error(out.error, now, want)
            return
        self._backoff.reset()
        if want is None:  # a renewal
            if out.lost_lease:
                log.warning("the lease of %s changed behind our back; reconciling", self._name())
                self._lease, self._next_renew, self._next_converge = None, None, now
                self._unconfirmed(now)
            else:
                self._lease = out.lease
                self._schedule_renew(now)
                self._confirmed(self._known, now)
                if self._renew_retry is not None:
                    self._set(*self._renew_retry)
            self._renew_retry = None
            return
        if out.conflict_holder is not None:
            self._conflicts_in_row += 1
            self.conflict_holder = out.conflict_holder
            self._lease, self._next_renew = None, None
            wait, message = self._fence.wait(out, self._name(), dt.datetime.now(dt.UTC))
            self._next_converge = now + wait
            self._set(State.CONFLICT, message)
            self._entry_uid = out.entry_uid
            if self._known is not State.CONFLICT:
                self._note(self._change(self._known, State.CONFLICT, holder=out.conflict_holder,
                                        holder_until=out.conflict_until, fenced=out.fenced))
            self._confirmed(State.CONFLICT, now)
            if self.inputs.shutting_down:
                self._finish_or_retire("the entry is another instance's")
            return
        self.conflict_holder = None
        self._fence.clear()
        self._converged = want
        self._next_converge = now + self.s.resync * self.rng.uniform(0.9, 1.0)
        self._lease = out.lease if out.present else None
        if out.present:
            self._schedule_renew(now)
        else:
            self._next_renew = None
        if out.wrote:
            log.info("registry: %s (%s)", ", ".join(out.wrote), self._name())
        if not out.present:
            reason = why_withdrawn(self.inputs, self.s) if want is not Want.HOLD else (
                "not registered; waiting for " + ("the WorkloadGroup" if self.inputs.group is None
                                                  else "the app's health"))
            self._set(State.WITHDRAWN if want is not Want.HOLD else State.HELD, reason)
            if self.inputs.shutting_down:
                self._finish_or_retire("withdrawn")
        elif want is Want.HOLD:
            self._set(State.HELD, "keeping our entry leased until "
                      + ("the WorkloadGroup can be read" if self.inputs.group is None else "health is known"))
            if self.inputs.shutting_down:
                self._finish_or_retire("left registered for the restart")
        elif want is Want.MARK_UNHEALTHY:
            self._set(State.UNHEALTHY, "registered with Healthy=False")
        else:
            self._set(State.REGISTERED, "registered")
        # What the mesh sees: an entry (kept while held, too), one marked unhealthy, or none.
        known = State.WITHDRAWN if not out.present else \
            State.UNHEALTHY if out.healthy is False or want is Want.MARK_UNHEALTHY else State.REGISTERED
        deleted = "delete entry" in out.wrote
        if known is not self._known or deleted:
            if out.present:
                self._entry_uid = out.entry_uid
            self._note(self._change(self._known, known, want, deleted=deleted,
                                              adopted_from=out.adopted_from))
        if not out.present:
            self._entry_uid = None
        self._confirmed(known, now)
        if self.want is not want:
            self._dirty = True

    def _confirmed(self, known: State | None, now: float) -> None:
        self._known, self._confirmed_at, self._unknown_since = known, now, None

    def _unconfirmed(self, now: float) -> None:
        if self._unknown_since is None:
            self._unknown_since = now

    def _on_error(self, err: ApiError, now: float, want: Want | None) -> None:
        if isinstance(err, Conflict) and self._conflicts_in_row < 3:
            # A stale resourceVersion: someone wrote between our read and our write. Read again now.
            self._conflicts_in_row += 1
            self._next_converge = now
            self._lease = None
            log.info("registry: %s; reading again", err)
            return
        self._conflicts_in_row = 0
        self._unconfirmed(now)
        if want is None and isinstance(err, Unavailable) and self._lease is not None:
            # A renewal not answered: renew again (the resync stays as it was).
            if self._renew_retry is None:
                self._renew_retry = (self.state, self.message)
            self._next_renew = now + self._backoff.next_delay(err.retry_after)
            self._set(State.RETRYING, f"{err}; renewing in {self._next_renew - now:.1f}s (nothing is deleted)")
            return
        self._renew_retry = None
        if isinstance(err, Unavailable):
            delay = self._backoff.next_delay(err.retry_after)
            self._set(State.RETRYING, f"{err}; retrying in {delay:.1f}s (nothing is deleted meanwhile)")
        elif isinstance(err, (Unauthorized, Invalid)):
            delay = max(self._backoff.next_delay(), self.s.backoff_max / 2)
            self._set(State.REFUSED, str(err))
        else:
            delay = self._backoff.next_delay()
            self._set(State.RETRYING, str(err))
        self._next_converge = now + delay
        # Any other failed renewal is retried as a full convergence, which renews too.
        self._next_renew = None

    def _schedule_renew(self, now: float) -> None:
        self._conflicts_in_row = 0
        self._next_renew = now + self.s.lease_renew * self.rng.uniform(0.8, 1.0)

    def _finish_or_retire(self, why: str) -> None:
        """Shutdown is done with the entry; withdraw the one at an old address first, if any."""
        if self._retiring:
            self._finish_pending = why
            return
        self._finish(why)

    def _finish(self, why: str) -> None:
        self.finished = True
        self._set(State.STOPPED, why)

    def _set(self, state: State, message: str) -> None:
        if state is not self.state or message != self.message:
            level = logging.ERROR if state in (State.CONFLICT, State.REFUSED) else logging.INFO
            if state is not self.state or level == logging.INFO:
                log.log(level, "registry %s -> %s: %s", self.state.value, state.value, message)
        self.state, self.message = state, message

    def _name(self) -> str:
        if self._lease is not None:
            return self._lease["metadata"]["name"]
        return self._entry_name or f"of group {self.s.group}"

    def status(self) -> RegistrationStatus:
        name = self._lease["metadata"]["name"] if self._lease else None
        return RegistrationStatus(self.state, self.want, name or self._entry_name, self.s.namespace,
                                  self.message, self.conflict_holder, self._known, self._confirmed_at,
                                  self._unknown_since)


def _meta_of(group: dict[str, Any]) -> Any:
    return (group.get("metadata") or {}).get("uid")

