"""The app's health, watched in the background: probes on their schedule, the port watch, the tracker.

What the health part (agent.health.part) calls (all methods are safe from any thread):

    monitor = Monitor(probe_or_None, ports=ports, post=queue.put, flap=..., probe_host=...)
    monitor.start()                       # starts the probe thread and the port watch
    monitor.set_sidecar_ready(True)       # on each sidecar readiness change (starts False)
    monitor.reconfigure(probe, ports=..., flap=..., probe_host=...)  # after SIGHUP or a group change
    snap = monitor.snapshot()             # HealthSnapshot; snap.to_dict() for status.json
    monitor.stop()                        # joins the threads (bounded)

The constructor and reconfigure() raise ValueError when there is neither a probe nor an app port to
check; reconfigure() then keeps the running setup. The state survives reconfigure(): only the probe
counters start afresh.

`post` receives HealthChanged events, one per transition of the health state (Unknown -> Healthy or
Unhealthy, then between those two), from the monitor's threads. Which probe and ports is decided once,
by agent.health.inputs.resolve (agent.yaml, else the WorkloadGroup, else the bundle); without a probe
every app port gets a TCP check. The ports watched for a listener and its owner are the app ports,
else the probe's own port.

Timing follows Kubernetes: the first probe runs `initial_delay` after start(), then one starts every
`period` (each bounded by `timeout`). When a listener appears again on a watched port after the
initial delay, a probe runs at once rather than at the next period.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from agent import clock
from agent.health import probes
from agent.health.config import AppConfig, FlapConfig, ProbeConfig
from agent.health.portwatch import ListenerDown, ListenerUp, OwnerExited, PortWatch
from agent.health.state import Health
from agent.health.tracker import Cause, Damping, Tracker, Transition

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HealthChanged:
    """The app's health changed (the event the daemon's loop receives)."""
    state: Health
    previous: Health
    cause: Cause
    reason: str
    at: float  # time.monotonic()


@dataclass(frozen=True)
class HealthSnapshot:
    state: Health
    cause: Cause
    reason: str
    since: float                   # time.monotonic() of the last transition (or of start)
    probe: str                     # what is probed, e.g. "http://127.0.0.1:8080/ready"
    last_result: probes.ProbeResult | None
    last_probe_at: float | None    # time.monotonic() the last probe finished
    sidecar_ready: bool
    damped: bool                   # flap damping holds back a return to Healthy
    transitions_in_window: int
    ports: dict[int, dict[str, object]] = field(default_factory=dict)  # port -> listening, pids

    def to_dict(self, now: float | None = None) -> dict[str, object]:
        # On the monotonic clock, the offset is agent.clock's: the same moment reads the same in every
        # snapshot, so status.json is not rewritten for nothing.
        offset = clock.wall_offset() if now is None else time.time() - now
        last = self.last_result
        return {
            "state": self.state.value,
            "cause": self.cause.value,
            "reason": self.reason,
            "since": self.since + offset,
            "probe": self.probe,
            "last_probe": None if last is None else {
                "ok": last.ok, "reason": last.reason, "latency_ms": round(last.latency * 1000, 1),
                "at": None if self.last_probe_at is None else self.last_probe_at + offset},
            "sidecar_ready": self.sidecar_ready,
            "damped": self.damped,
            "transitions_in_window": self.transitions_in_window,
            "ports": {str(p): v for p, v in self.ports.items()},
        }


class Schedule:
    """When the next probe is due (pure): initial delay, then every period from each start."""

    def __init__(self, start: float, initial_delay: float, period: float) -> None:
        self.first = start + initial_delay
        self.period = period
        self.due = self.first

    def started(self, at: float) -> None:
        self.due = at + self.period

    def now_if_allowed(self, now: float) -> None:
        """Probe as soon as possible, but not before the initial delay is over."""
        self.due = min(self.due, max(now, self.first))


def damping(flap: FlapConfig) -> Damping:
    return Damping(flap.min_dwell, flap.max_transitions, flap.window)


def _watched_ports(ports: Sequence[int], cfg: ProbeConfig | None) -> tuple[int, ...]:
    return tuple(dict.fromkeys(ports)) or probes.probe_ports(cfg)


class Monitor:
    def __init__(self, probe: ProbeConfig | None, *, ports: Sequence[int], post: Callable[[object], None],
                 flap: FlapConfig | None = None, probe_host: str = "127.0.0.1", watch_process: bool = True,
                 sidecar_ready: bool = False, port_interval: float = 1.0, use_pidfd: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._post = post
        self._clock = clock
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._cfg = probe or ProbeConfig()  # timing defaults when the default TCP check is used
        self._probe = self._build(probe, ports, probe_host)
        now = clock()
        self._tracker = Tracker(success_threshold=self._cfg.success_threshold,
                                failure_threshold=self._cfg.failure_threshold,
                                damping=damping(flap or FlapConfig()), now=now, sidecar_ready=sidecar_ready)
        self._schedule = Schedule(now, self._cfg.initial_delay, self._cfg.period)
        self._generation = 0
        self._last: probes.ProbeResult | None = None
        self._last_at: float | None = None
        self._portwatch = PortWatch(_watched_ports(ports, probe), self._on_port_event,
                                    interval=port_interval, watch_process=watch_process,
                                    use_pidfd=use_pidfd)

    @staticmethod
    def _build(cfg: ProbeConfig | None, ports: Sequence[int], host: str) -> probes.Probe:
        if cfg is None:
            return probes.default_probe(ports, host)
        return probes.build_probe(cfg, host)

    # --- the daemon's API -----------------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            now = self._clock()
            self._schedule = Schedule(now, self._cfg.initial_delay, self._cfg.period)
        self._portwatch.start()
        self._thread = threading.Thread(target=self._run, name="health-probe", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._portwatch.stop(timeout)
        if self._thread is not None:
            self._thread.join(timeout + self._cfg.timeout)

    def set_sidecar_ready(self, ready: bool) -> None:
        with self._cond:
            self._emit(self._tracker.sidecar(ready, now=self._clock()))
            self._cond.notify_all()

    def reconfigure(self, probe: ProbeConfig | None, *, ports: Sequence[int], flap: FlapConfig | None = None,
                    probe_host: str = "127.0.0.1") -> None:
        """Use a new probe, ports or damping; the health state is kept and a probe runs soon."""
        new_probe = self._build(probe, ports, probe_host)
        watched = _watched_ports(ports, probe)
        with self._cond:
            self._emit(self._tracker.watch_only(watched, now=self._clock()))
            self._cfg = probe or ProbeConfig()
            self._probe = new_probe
            self._tracker.set_thresholds(self._cfg.success_threshold, self._cfg.failure_threshold,
                                         damping(flap or FlapConfig()))
            first = self._schedule.first
            self._schedule = Schedule(first, 0.0, self._cfg.period)
            self._schedule.now_if_allowed(self._clock())
            self._generation += 1  # a probe of the old setup still running will be ignored
            self._cond.notify_all()
        self._portwatch.set_ports(watched)

    def snapshot(self) -> HealthSnapshot:
        ports = self._portwatch.snapshot()  # outside our lock: the port watch posts under its own
        with self._cond:
            now = self._clock()
            t = self._tracker
            return HealthSnapshot(t.state, t.cause, t.reason, t.since, self._probe.description, self._last,
                                  self._last_at, t._sidecar_ready, t.held(now), t.transitions_in_window(now),
                                  ports)

    # --- internals ------------------------------------------------------------------------------

    def _emit(self, tr: Transition | None) -> None:
        if tr is None:
            return
        level = logging.INFO if tr.state is Health.HEALTHY else logging.WARNING
        log.log(level, "app %s: %s", tr.state.value, tr.reason)
        self._post(HealthChanged(tr.state, tr.previous, tr.cause, tr.reason, tr.at))

    def _on_port_event(self, event: object) -> None:
        with self._cond:
            now = self._clock()
            if isinstance(event, OwnerExited):
                self._emit(self._tracker.process_exited(event.pid, event.name, event.returncode,
                                                        event.ports, now=now))
            elif isinstance(event, ListenerDown):
                self._emit(self._tracker.port_closed(event.port, now=now))
            elif isinstance(event, ListenerUp):
                log.info("port %d is listening (pids %s)", event.port,
                         ",".join(map(str, event.pids)) or "unknown")
                self._emit(self._tracker.listener_up(event.port, now=now))
                self._schedule.now_if_allowed(now)
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                now = self._clock()
                deadline = self._tracker.next_deadline()
                if deadline is not None and deadline <= now:
                    self._emit(self._tracker.tick(now))
                    deadline = self._tracker.next_deadline()
                due = self._schedule.due
                if now < due:
                    wake = min(due, deadline) if deadline is not None else due
                    self._cond.wait(max(0.0, wake - now))
                    continue
                self._schedule.started(now)
                probe, timeout, started, generation = self._probe, self._cfg.timeout, now, self._generation
            try:
                result = probe.check(timeout)
            except Exception as exc:  # a bug in a probe must not stop the watching
                log.exception("probe %s raised", probe.description)
                result = probes.ProbeResult(False, f"probe error: {exc}", 0.0)
            with self._cond:
                if generation != self._generation:
                    continue
                now = self._clock()
                self._last, self._last_at = result, now
                self._emit(self._tracker.probe_result(result.ok, result.reason, started=started, now=now))


def probe_host(app: AppConfig, instance_address: str | None) -> str:
    """Where probes without a host of their own connect: 127.0.0.1, or the instance address."""
    if app.probe_host == "instance" and instance_address:
        return instance_address
    return "127.0.0.1"
