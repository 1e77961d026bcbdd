"""The app's health as an explicit state machine: Unknown -> Healthy / Unhealthy, with a reason.

Pure: no threads, no I/O, no clock of its own. Every input carries `now` (time.monotonic() in the
agent, a fake clock in tests) and returns the transition it caused, if any, for the main loop.

Inputs and their rules:
- probe results: `success_threshold` consecutive successes make the app ok; `failure_threshold`
  consecutive failures make it failed. Before the first verdict the app is not ready anyway (as a
  Kubernetes readiness probe starts "not ready"), so from Unknown the first failure is a verdict.
- the app's process exited, or its port stopped listening: failed at once, whatever the thresholds.
  The port stays "down" until a listener is seen again, and successes only count from then on; a
  probe that started before the exit is stale and ignored (the dying process may have answered it).
- the sidecar's readiness: Healthy needs both the app and the sidecar.

Flap damping never delays a failure: an app that fails must leave the mesh at once. It only holds
the way back to Healthy: not before `min_dwell` after the previous transition, and only while fewer
than `max_transitions - 1` transitions happened within `window` (keeping room for the failure that a
flapping app will produce next), so an alternating probe yields at most `max_transitions` per
window. A sidecar restart is not an app flap: an Unhealthy caused by the proxy alone (the app stayed
ok) is neither counted nor damped, so the app is Healthy again as soon as the proxy is ready (a proxy
that keeps crashing is stopped by the supervisor's crash-loop budget, not here); if the app fails too
while the proxy is down, that failure counts and its return is damped as any other.

A held return is not lost: `next_deadline()` says when to call `tick()`, which then emits it
if the inputs still call for it, so the final state is right once the inputs settle.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from agent.health.state import Health
from agent.proc import describe_exit


class Cause(enum.Enum):
    """Why the state is what it is (for status, logs and metrics)."""
    STARTING = "starting"                    # no verdict yet
    PROBE_SUCCEEDED = "probe-succeeded"
    PROBE_FAILED = "probe-failed"
    PROCESS_EXITED = "process-exited"
    PORT_CLOSED = "port-closed"
    SIDECAR_NOT_READY = "sidecar-not-ready"


@dataclass(frozen=True)
class Transition:
    previous: Health
    state: Health
    cause: Cause
    reason: str
    at: float


@dataclass(frozen=True)
class Damping:
    """The flap-damping knobs (mirrors agent.health.config.FlapConfig)."""
    min_dwell: float = 5.0
    max_transitions: int = 6
    window: float = 300.0


class Tracker:
    def __init__(self, *, success_threshold: int = 1, failure_threshold: int = 3,
                 damping: Damping | None = None, now: float, sidecar_ready: bool = True) -> None:
        self.success_threshold = success_threshold
        self.failure_threshold = failure_threshold
        self.damping = damping or Damping()
        # The emitted state.
        self.state = Health.UNKNOWN
        self.cause = Cause.STARTING
        self.reason = "no probe result yet"
        self.since = now
        # The app's own verdict from the thresholds (None: none yet) and why.
        self._app_ok: bool | None = None
        self._app_cause = Cause.STARTING
        self._app_reason = "no probe result yet"
        self._successes = 0
        self._failures = 0
        self._ports_down: dict[int, str] = {}  # port -> why it is down
        self._hard_failure_at = float("-inf")  # probes started before this are stale
        self._sidecar_ready = sidecar_ready
        self._history: deque[float] = deque()  # times of emitted transitions within the window
        self._last_transition_at: float | None = None
        self._sidecar_outage = False  # the emitted Unhealthy is the proxy's alone: not damped

    # --- inputs ---------------------------------------------------------------------------------

    def probe_result(self, ok: bool, reason: str, *, started: float, now: float) -> Transition | None:
        if started < self._hard_failure_at:
            return None
        if ok and self._ports_down:
            self._successes = 0  # cannot be ok while a port is down; count only after it is back
        elif ok:
            self._successes += 1
            self._failures = 0
            if self._successes >= self.success_threshold and not self._app_ok:
                self._set_app(True, Cause.PROBE_SUCCEEDED, reason or "probe succeeded")
        else:
            self._failures += 1
            self._successes = 0
            first_verdict = self._app_ok is None
            if self._app_ok is not False and (first_verdict or self._failures >= self.failure_threshold):
                self._set_app(False, Cause.PROBE_FAILED, f"probe failed: {reason}")
            elif self._app_ok is False and self._app_cause is Cause.PROBE_FAILED:
                self._app_reason = f"probe failed: {reason}"  # keep the latest cause visible
        return self._evaluate(now)

    def process_exited(self, pid: int, name: str, returncode: int | None, ports: tuple[int, ...],
                       *, now: float) -> Transition | None:
        why = describe_exit(pid, name, returncode)
        for port in ports:
            self._ports_down[port] = why
        self._hard_failure(Cause.PROCESS_EXITED, why, now)
        return self._evaluate(now)

    def port_closed(self, port: int, *, now: float) -> Transition | None:
        why = f"port {port} is not listening"
        self._ports_down[port] = why
        self._hard_failure(Cause.PORT_CLOSED, why, now)
        return self._evaluate(now)

    def listener_up(self, port: int, *, now: float) -> Transition | None:
        """A listener is back on the port: the next successful probes may make the app ok again."""
        self._ports_down.pop(port, None)
        return self._evaluate(now)

    def watch_only(self, ports: Iterable[int], *, now: float) -> Transition | None:
        """The app's ports changed (a reload, a new WorkloadGroup): a port no longer watched says nothing
        of the app any more, so its old 'not listening' verdict goes."""
        keep = set(ports)
        for port in [p for p in self._ports_down if p not in keep]:
            del self._ports_down[port]
        return self._evaluate(now)

    def sidecar(self, ready: bool, *, now: float) -> Transition | None:
        self._sidecar_ready = ready
        return self._evaluate(now)

    def tick(self, now: float) -> Transition | None:
        """Emit a transition that damping held back, if it is due and still wanted."""
        return self._evaluate(now)

    def set_thresholds(self, success_threshold: int, failure_threshold: int, damping: Damping) -> None:
        self.success_threshold = success_threshold
        self.failure_threshold = failure_threshold
        self.damping = damping
        self._successes = self._failures = 0

    # --- outputs --------------------------------------------------------------------------------

    def desired(self) -> tuple[Health, Cause, str]:
        """What the inputs call for now, before damping."""
        if self._ports_down:
            port = min(self._ports_down)
            cause = (Cause.PROCESS_EXITED if self._app_cause is Cause.PROCESS_EXITED
                     else Cause.PORT_CLOSED)
            reason = self._app_reason if cause is Cause.PROCESS_EXITED else self._ports_down[port]
            return Health.UNHEALTHY, cause, reason
        if self._app_ok is None:
            return Health.UNKNOWN, self._app_cause, self._app_reason
        if not self._app_ok:
            return Health.UNHEALTHY, self._app_cause, self._app_reason
        if not self._sidecar_ready:
            # At start the proxy is simply not up yet: no verdict, so that the first Healthy is not
            # a return from Unhealthy (which damping would hold back for min_dwell).
            state = Health.UNKNOWN if self.state is Health.UNKNOWN else Health.UNHEALTHY
            return state, Cause.SIDECAR_NOT_READY, "sidecar not ready"
        return Health.HEALTHY, self._app_cause, self._app_reason

    def next_deadline(self) -> float | None:
        """When a held transition may be emitted (call tick() then), or None."""
        state, _, _ = self.desired()
        if state is not Health.HEALTHY or self.state is Health.HEALTHY:
            return None
        return self._healthy_allowed_at()

    def transitions_in_window(self, now: float) -> int:
        self._expire(now)
        return len(self._history)

    def held(self, now: float) -> bool:
        """True while damping keeps the state from following the inputs."""
        return (self.desired()[0] is Health.HEALTHY and self.state is not Health.HEALTHY
                and self._healthy_allowed_at() > now)

    # --- internals ------------------------------------------------------------------------------

    def _set_app(self, ok: bool, cause: Cause, reason: str) -> None:
        self._app_ok, self._app_cause, self._app_reason = ok, cause, reason

    def _hard_failure(self, cause: Cause, reason: str, now: float) -> None:
        self._hard_failure_at = now
        self._successes = self._failures = 0
        self._set_app(False, cause, reason)

    def _expire(self, now: float) -> None:
        while self._history and self._history[0] <= now - self.damping.window:
            self._history.popleft()

    def _healthy_allowed_at(self) -> float:
        """Earliest time a return to Healthy respects both the dwell time and the window cap."""
        at = float("-inf")
        if self._sidecar_outage:
            return at
        if self._last_transition_at is not None:
            at = self._last_transition_at + self.damping.min_dwell
        # Room must be left for one more transition (the next failure) within the cap.
        room = self.damping.max_transitions - 1
        if len(self._history) >= room:
            at = max(at, self._history[len(self._history) - room] + self.damping.window)
        return at

    def _evaluate(self, now: float) -> Transition | None:
        self._expire(now)
        state, cause, reason = self.desired()
        if state is self.state:
            if (cause, reason) != (self.cause, self.reason) and state is not Health.HEALTHY:
                if self._sidecar_outage and cause is not Cause.SIDECAR_NOT_READY:
                    # The app failed too while the proxy was down: from here on it is the app's flap.
                    self._sidecar_outage = False
                    self._record(now)
                self.cause, self.reason = cause, reason  # same state, fresher explanation
            return None
        if state is Health.HEALTHY and now < self._healthy_allowed_at():
            return None  # damped: next_deadline() tells when to look again
        if state is Health.UNKNOWN:
            return None  # never go back to "no verdict"
        previous = self.state
        self.state, self.cause, self.reason, self.since = state, cause, reason, now
        returning = self._sidecar_outage
        self._sidecar_outage = state is Health.UNHEALTHY and cause is Cause.SIDECAR_NOT_READY
        if not (returning or self._sidecar_outage):
            self._record(now)
        return Transition(previous, state, cause, reason, now)

    def _record(self, now: float) -> None:
        self._history.append(now)
        self._last_transition_at = now
