"""The sidecar's supervision decisions as a pure state machine, and the events around it.

No I/O, no threads, no clock of its own: every input carries `now`. agent.sidecar.supervisor
carries the decisions out.

States: STOPPED -> STARTING -> RUNNING (ready); an exit -> BACKOFF (exponential with full jitter,
agent.retry.Backoff; none for the first exit after STABLE_AFTER seconds ready) -> STARTING; more
than `max_exits` exits within `window` -> FATAL; not ready within `ready_timeout` -> the proxy is
killed, which counts as an exit.

Once ready, the proxy's readiness keeps being asked (Policy.liveness_period): `failure_threshold`
failed answers in a row take it RUNNING -> UNRESPONSIVE (not ready: the entries are withdrawn), an
answer again takes it back; `restart_threshold` failures in a row kill it, which counts as an exit.

A restart the agent asks for (Supervisor.restart) goes STARTING / RUNNING / BACKOFF -> RESTARTING
while the old proxy is stopped, then -> STARTING. It is not a crash: the old proxy's exit is not an
exit, `restarts` (crash restarts) does not grow, the backoff is neither advanced nor reset, and a
second request while one runs is folded into it.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from agent.retry import Backoff
from agent.sidecar.profiles import Policy

# A proxy that stayed ready this long has recovered: its next exit starts the backoff from the bottom.
STABLE_AFTER = 10.0


class State(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    UNRESPONSIVE = "unresponsive"  # running, but not answering its readiness check
    BACKOFF = "backoff"
    RESTARTING = "restarting"
    STOPPING = "stopping"
    FATAL = "fatal"


class Action(enum.Enum):
    NONE = "none"
    SPAWN = "spawn"
    KILL = "kill"


# --- events (posted to the daemon's queue) ---------------------------------------------------------

@dataclass(frozen=True)
class ProxyReady:
    generation: int
    pid: int


@dataclass(frozen=True)
class ProxyExited:
    generation: int
    pid: int
    returncode: int | None     # None: an adopted proxy, whose status we cannot read


@dataclass(frozen=True)
class ProxyLiveness:
    """Posted by the watch thread when the count of failed readiness answers in a row changes (0: it
    answered again)."""
    generation: int
    failures: int


@dataclass(frozen=True)
class RestartStopped:
    """Posted by the worker of Supervisor.restart(): the old proxy is gone and the new start prepared
    (ports checked, pre-start commands run)."""
    restart: int                       # which restart; stale once a stop or another restart began
    conflict: str | None = None        # another process holds a port we need: FATAL
    failed: str | None = None          # why the new proxy cannot start (a pre-start command failed):
                                       # counts as an exit, like a failed spawn


@dataclass(frozen=True)
class SidecarStateChanged:
    state: State
    previous: State
    reason: str
    pid: int | None


# --- the state machine ---------------------------------------------------------------------------

@dataclass
class Machine:
    """The supervision decisions, without any I/O: every transition is a method here."""
    policy: Policy
    backoff: Backoff
    state: State = State.STOPPED
    deadline: float | None = None    # BACKOFF: when to spawn; STARTING: when to give up waiting
    restarts: int = 0                # restarts after an exit (crash restarts)
    requested_restarts: int = 0      # restarts the agent asked for
    reason: str = ""
    ready_since: float | None = None
    exits: deque[float] = field(default_factory=deque)
    killed_because: str | None = None   # why we killed the proxy, told again when its exit arrives

    def _go(self, state: State, reason: str = "", deadline: float | None = None) -> None:
        self.state, self.reason, self.deadline = state, reason, deadline

    def start(self, now: float) -> Action:
        if self.state not in (State.STOPPED, State.FATAL):
            return Action.NONE
        self.exits.clear()
        self.backoff.reset()
        self._go(State.STARTING, "starting", now + self.policy.ready_timeout)
        return Action.SPAWN

    def adopted(self, now: float) -> None:
        self.ready_since = now
        self._go(State.RUNNING, "adopted the running proxy")

    def ready(self, now: float) -> None:
        if self.state is State.STARTING and self.killed_because is None:   # not one we just killed
            self.ready_since = now
            self._go(State.RUNNING, "ready")

    def liveness(self, now: float, failures: int) -> Action:
        """The readiness answers of a ready proxy: `failures` failed in a row (0: it answered)."""
        p = self.policy
        if self.state is State.RUNNING and failures >= p.failure_threshold:
            self._go(State.UNRESPONSIVE, f"not answering its readiness check ({failures} times in a row)")
        elif self.state is State.UNRESPONSIVE and failures == 0:
            self._go(State.RUNNING, "ready again")
        elif self.state is State.UNRESPONSIVE:
            self.reason = f"not answering its readiness check ({failures} times in a row)"
        if self.state is State.UNRESPONSIVE and p.restart_threshold and failures >= p.restart_threshold \
                and self.killed_because is None:
            self.killed_because = f"not answering its readiness check {failures} times in a row"
            return Action.KILL
        return Action.NONE

    def exited(self, now: float, what: str) -> Action:
        if self.state not in (State.STARTING, State.RUNNING, State.UNRESPONSIVE):
            return Action.NONE
        if self.killed_because:
            what, self.killed_because = f"{self.killed_because}: {what}", None
        # A first exit after a stable run is restarted at once: waiting would only lengthen the
        # outage. The next exits (a crash loop) back off as usual, from the bottom.
        stable = self.ready_since is not None and now - self.ready_since >= STABLE_AFTER
        if stable:
            self.backoff.reset()
        self.ready_since = None
        self.exits.append(now)
        while self.exits and self.exits[0] < now - self.policy.window:
            self.exits.popleft()
        if len(self.exits) > self.policy.max_exits:
            self._go(State.FATAL, f"{what}; {len(self.exits)} exits within {self.policy.window:g}s "
                                  "(crash loop), giving up")
            return Action.NONE
        delay = 0.0 if stable else self.backoff.next_delay()
        self._go(State.BACKOFF, f"{what}; restarting in {delay:.2f}s", now + delay)
        return Action.NONE

    def tick(self, now: float) -> Action:
        if self.deadline is None or now < self.deadline:
            return Action.NONE
        if self.state is State.BACKOFF:
            self.restarts += 1
            self._go(State.STARTING, f"restart {self.restarts}", now + self.policy.ready_timeout)
            return Action.SPAWN
        if self.state is State.STARTING:
            # The kill makes the proxy exit; that exit counts towards the crash loop.
            self.killed_because = f"not ready within {self.policy.ready_timeout:g}s"
            self._go(State.STARTING, self.killed_because)
            return Action.KILL
        return Action.NONE

    def hot_restarting(self, now: float, epoch: int) -> None:
        """RUNNING -> STARTING: the next Envoy epoch takes over from the running one."""
        self.ready_since = None
        self._go(State.STARTING, f"hot restart to epoch {epoch}", now + self.policy.ready_timeout)

    def restarting(self, now: float, why: str = "asked") -> bool:
        """STARTING / RUNNING / UNRESPONSIVE / BACKOFF -> RESTARTING: stop the proxy and start it again.

        False when there is nothing to do: a restart already runs (this one is folded into it), or
        no proxy is meant to run (STOPPED, STOPPING, FATAL: start() starts one)."""
        if self.state not in (State.STARTING, State.RUNNING, State.UNRESPONSIVE, State.BACKOFF):
            return False
        self.ready_since = None
        self.killed_because = None   # a proxy killed for being slow is being replaced anyway
        self.requested_restarts += 1
        self._go(State.RESTARTING, f"restarting ({why})")
        return True

    def restart_stopped(self, now: float) -> Action:
        """RESTARTING -> STARTING once the old proxy is gone: spawn the new one."""
        if self.state is not State.RESTARTING:
            return Action.NONE
        self._go(State.STARTING, f"starting after a restart ({self.requested_restarts} asked)",
                 now + self.policy.ready_timeout)
        return Action.SPAWN

    def spawn_failed(self, now: float, what: str) -> Action:
        """A start that failed before a process existed (pre-start command, exec error): an exit."""
        return self.exited(now, what)

    def fatal(self, reason: str) -> None:
        self._go(State.FATAL, reason)

    def stopping(self) -> None:
        self._go(State.STOPPING, "stopping")

    def stopped(self) -> None:
        self.ready_since = None
        self._go(State.STOPPED, "stopped")
