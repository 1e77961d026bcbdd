"""`mesh-agent run`: the main loop that drives the agent's parts.

Reading order: `main` loads the config (exit 78 when it is bad) and runs `Agent.run`: start, then the
loop, then the draining stop, top to bottom. The parts (agent.part: identity, bundle, maintenance,
address, sidecar, health, registry) hold the state and share one shape; the loop hands every event to
every part, runs their timers, and writes status.json from their snapshots. What one part learns that
another needs travels as an event (agent.part), so the loop itself decides nothing about the mesh.
Threads (the bundle fetch, the package install, the proxy's waiter and its restarts, probes and the
port watch, file watches, the API worker and group watch, the identity refresh, the address watch)
only post events to `self.events`; signal handlers only record. Nothing on the loop waits on the
network, a child process or dpkg, so WATCHDOG=1 keeps coming.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import queue
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from agent import __version__, apps, config, logs, systemd
from agent import reload as reload_verb
from agent.bundle.part import BundlePart
from agent.health.part import HealthPart
from agent.identity.part import IdentityPart
from agent.maintenance import MaintenancePart
from agent.metrics import Metrics
from agent.part import Context, FatalError, Part, Wake
from agent.paths import Layout
from agent.registry.address_part import AddressPart
from agent.registry.part import RegistryPart
from agent.sidecar.part import SidecarPart
from agent.state import Phase, PhaseMachine, Status, StatusWriter, summarize

log = logging.getLogger("agent.daemon")

MAX_WAIT = 5.0  # the loop wakes at least this often (maintenance file, timers)

__all__ = ["Agent", "FatalError", "main"]


class Signals:
    """Signal handlers that only record. SimpleQueue.put is safe to call from a signal handler."""

    def __init__(self, events: queue.SimpleQueue[object]) -> None:
        self.events = events
        self.terminate = 0
        self.reload = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        signal.signal(signal.SIGHUP, self._on_hup)

    def _on_term(self, _signo: int, _frame: Any) -> None:
        self.terminate += 1
        self.events.put(Wake())

    def _on_hup(self, _signo: int, _frame: Any) -> None:
        self.reload = True
        self.events.put(Wake())


def add_arguments(p: argparse.ArgumentParser, _verb: str) -> None:
    p.add_argument("--config", help=f"agent.yaml (default: ${config.ENV_VAR} or {config.DEFAULT_PATH})")


def main(args: argparse.Namespace) -> int:
    path = config.config_path(args.config)
    try:
        cfg = config.load(path)
    except config.ConfigError as exc:
        # To stderr (the journal under systemd) and as STATUS=, so `systemctl status` shows why.
        print(exc, file=sys.stderr)
        systemd.status(f"bad configuration: {exc.errors[0]}")
        return config.EX_CONFIG
    logs.setup(cfg.logging.level, cfg.logging.target)
    return Agent(cfg, path).run()


class Agent:
    def __init__(self, cfg: config.Config, config_path: str) -> None:
        self.config_path = config_path
        self.layout = Layout.from_config(cfg)
        self.events: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.signals = Signals(self.events)
        self.phase = PhaseMachine()
        self.ctx = Context(cfg, self.layout, self.events, Metrics(on=cfg.metrics.enabled))
        self.status = Status(version=__version__, errors=self.ctx.errors)
        self.status_writer = StatusWriter(self.layout.status_file)
        self.ready_sent = False
        self.last_summary = ""
        self.reloads = 0  # generation of the last reload, for `mesh-agent reload`
        self.watchdog_every = systemd.watchdog_interval()
        self.last_watchdog = 0.0
        self.due = 0.0  # the parts' earliest deadline (monotonic)
        # The parts, in the order they start and see each event: the identity token before anything
        # talks to the API; the bundle before what it brings up; the sidecar before the app's health.
        self.identity = IdentityPart(self.ctx)
        self.bundle = BundlePart(self.ctx)
        self.maintenance = MaintenancePart(self.ctx)
        self.sidecar = SidecarPart(self.ctx)
        # A health and a registry part for each app (agent.apps): one, or several sharing the sidecar.
        self.app_names = [a.name for a in apps.apps(cfg)]
        self.health = {name: HealthPart(self.ctx, name) for name in self.app_names}
        self.registry = {name: RegistryPart(self.ctx, name) for name in self.app_names}
        # The address part before the parts that use the address: it has ctx.address current for them.
        self.address = AddressPart(self.ctx)
        self.parts: list[Part] = [self.identity, self.bundle, self.maintenance, self.address, self.sidecar,
                                  *self.health.values(), *self.registry.values()]

    @property
    def cfg(self) -> config.Config:
        return self.ctx.cfg

    # --- the whole life, top to bottom ---------------------------------------------------------

    def run(self) -> int:
        self.signals.install()
        self.layout.run.mkdir(parents=True, exist_ok=True)
        log.info("mesh-agent %s starting (config %s)", __version__, self.config_path)
        if self.cfg.metrics.enabled:
            self.serve_metrics()
        try:
            self.start()
            self.enter(Phase.RUNNING)
            while not self.signals.terminate:
                self.one_pass()
        except FatalError as exc:
            log.error("giving up: %s", exc)
            self.ctx.record_error("agent", str(exc))
            self.enter(Phase.FAILED)
            self.stop()
            return exc.exit_code
        self.enter(Phase.STOPPING)
        self.stop()
        self.enter(Phase.STOPPED)
        self.publish()
        self.status_writer.remove()
        log.info("mesh-agent stopped")
        return 0

    def start(self) -> None:
        now = time.monotonic()
        for part in self.parts:
            part.start(now)
        self.publish()

    def one_pass(self) -> None:
        """Wait for one event or the next deadline, hand everything pending to the parts, run their timers."""
        now = time.monotonic()
        event: object | None
        try:
            event = self.events.get(timeout=max(0.0, min(self.due, self.watchdog_due(), now + MAX_WAIT) - now))
        except queue.Empty:
            event = None
        while event is not None:
            self.handle(event)
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                event = None
        if self.signals.reload:
            self.signals.reload = False
            self.reload()
        self.tick(time.monotonic())
        self.publish()
        self.ping_watchdog()

    def stop(self) -> None:
        """The draining stop: withdraw, wait for the mesh to notice, drain, stop, release the lease.

        When systemd is restarting the unit (a package upgrade), the agent is back in seconds: the
        entry and its lease stay, so the VM never leaves the mesh, and the proxy is left running for
        the next agent to adopt where it survives us (pilot-agent does; a plain Envoy exits with us).
        Only if the configuration on disk is valid, though: the next agent would exit 78 on a bad one
        and nobody would withdraw the entry, so then this agent withdraws as on a stop."""
        self.ctx.stopping = True
        s = self.cfg.shutdown
        deadline = time.monotonic() + s.timeout
        restarting = self.phase.phase is not Phase.FAILED and systemd.pending_job() == "restart" \
            and self.next_config_valid()
        if restarting:
            log.info("systemd is restarting mesh-agent: the entry stays registered")
            systemd.stopping("restarting: staying in the mesh")
            self.stop_parts()
            return
        systemd.stopping("withdrawing from the mesh")
        self.publish()
        registries = [r for r in self.registry.values() if r.registrar is not None]
        for r in registries:
            r.withdraw(time.monotonic(), timeout=max(1.0, s.timeout / 3))
        if registries:
            self.pump_until(lambda: all(r.finished for r in registries), deadline)
            if all(r.finished or not r.status().registered for r in registries):
                log.info("withdrawn; waiting %.1fs for the mesh to stop sending traffic", s.propagation)
                self.pump_until(lambda: False, min(deadline, time.monotonic() + s.propagation))
        if self.sidecar.supervisor is not None:
            systemd.extend_timeout(max(deadline - time.monotonic(), 1.0) + 5)
        self.sidecar.drain(drain=self.signals.terminate < 2)
        self.stop_parts()
        self.publish()

    def next_config_valid(self) -> bool:
        """Whether the agent systemd starts next can run: agent.yaml as it is on disk now is valid."""
        try:
            config.load(self.config_path)
        except config.ConfigError as exc:
            log.error("systemd is restarting mesh-agent, but the next agent would refuse %s (%s): "
                      "withdrawing the entry as on a stop", self.config_path, exc.errors[0])
            self.ctx.record_error("agent", f"restart into a bad configuration: {exc.errors[0]}")
            return False
        return True

    def stop_parts(self) -> None:
        for part in reversed(self.parts):
            with contextlib.suppress(Exception):
                part.stop()

    # --- the parts, driven alike -----------------------------------------------------------------

    def handle(self, event: object) -> None:
        if isinstance(event, Wake):
            return
        now = time.monotonic()
        taken = [part.handle(event, now) for part in self.parts]
        if not any(taken):
            # The name only: an event may carry a whole bundle (and its token).
            log.debug("event %s", type(event).__name__)

    def tick(self, now: float) -> None:
        deadlines = [d for d in (part.tick(now) for part in self.parts) if d is not None]
        self.due = min(deadlines, default=now + MAX_WAIT)

    def pump_until(self, done: Callable[[], bool], deadline: float) -> None:
        """Keep handling events (API answers, a second SIGTERM) until done() or the deadline."""
        while not done() and time.monotonic() < deadline and self.signals.terminate < 2:
            try:
                event = self.events.get(timeout=min(0.1, max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                event = None
            if event is not None:
                self.handle(event)
            self.tick(time.monotonic())
            self.publish()
            self.ping_watchdog()

    # --- reload ----------------------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: re-read the config and the bundle; each part applies what changed in its section."""
        systemd.reloading()
        self.enter(Phase.RELOADING)
        self.reloads += 1
        started = time.monotonic()  # `mesh-agent reload` waits for a reload that began after its signal
        try:
            new = config.load(self.config_path)
        except config.ConfigError as exc:
            log.error("reload refused, keeping the running configuration:\n%s", exc)
            self.ctx.record_error("reload", str(exc.errors[0]))
            self.status.reload = reload_verb.record(self.reloads, started, str(exc))
            self.bundle.refresh_now()
        else:
            old, self.ctx.cfg = self.cfg, new
            logs.setup(new.logging.level, new.logging.target)
            if [a.name for a in apps.apps(new)] != self.app_names:
                log.warning("apps added, removed or renamed: that takes effect at the next restart of mesh-agent")
                new = _keep_apps(new, old)
                self.ctx.cfg = new
            for part in self.parts:
                part.reconfigure(old, new)
            log.info("configuration reloaded")
            self.status.reload = reload_verb.record(self.reloads, started, None)
        self.enter(Phase.RUNNING)
        systemd.ready(self.status.summary)

    # --- reporting -------------------------------------------------------------------------------

    def enter(self, phase: Phase) -> None:
        self.phase.to(phase)
        self.status.phase = phase.value
        self.ctx.metrics.set_phase(phase.value)
        log.info("phase: %s", phase.value)

    def publish(self) -> None:
        """status.json and STATUS= from the parts' snapshots; READY=1 once there is something to say."""
        s = self.status
        s.bundle = self.bundle.status().as_dict()
        s.sidecar = self.sidecar.status().as_dict()
        maintenance = self.maintenance.status()
        s.maintenance = maintenance.on
        s.identity = self.identity.status().as_dict()
        per_app: dict[str, dict[str, Any]] = {name: {"app": self.health[name].status().as_dict(),
                                                     "registration": self.registry[name].status().as_dict(),
                                                     "maintenance": maintenance.on or name in maintenance.apps}
                                              for name in self.app_names}
        where = self.address.status()
        address = where.as_dict()  # the address registered, how often it changed
        for one in per_app.values():
            if one["registration"]:
                one["registration"].update(address)
            elif where.waiting and self.cfg.registry.enabled:
                one["registration"] = {"state": "waiting", "registered": False,
                                       "message": f"no address for this VM yet: {where.waiting}"}
        first = per_app[self.app_names[0]]
        s.app, s.registration = first["app"], first["registration"]  # the one app's (the first of several)
        s.apps = per_app if len(per_app) > 1 else {}
        s.summary = summarize(self.phase.phase, s.sidecar, per_app)
        self.maybe_ready()
        self.status_writer.write(s)
        if s.summary != self.last_summary:
            self.last_summary = s.summary
            systemd.status(s.summary)
            log.info("status: %s", s.summary)

    def maybe_ready(self) -> None:
        """READY=1 once every app is registered, known unhealthy or in maintenance (so `systemctl start`
        ends)."""
        if self.ready_sent or self.phase.phase is not Phase.RUNNING:
            return
        maintenance = self.maintenance.status()

        def settled(name: str) -> bool:  # registered, known sick, or withdrawn on purpose
            a, r = self.health[name].status().as_dict(), self.registry[name].status()
            known_sick = a.get("healthy") is False and a.get("cause") != "sidecar-not-ready" \
                and self.cfg.status.ready_when_unhealthy
            # No address yet is, like a sick app, something the agent waits out without holding the start.
            no_address = self.address.status().waiting is not None and self.cfg.status.ready_when_unhealthy
            return r.registered or known_sick or no_address or maintenance.on or name in maintenance.apps

        without_registry = not self.cfg.registry.enabled and self.sidecar.ready
        if without_registry or all(settled(name) for name in self.app_names):
            systemd.ready(self.status.summary)
            self.ready_sent = True
            log.info("ready")

    def watchdog_due(self) -> float:
        return self.last_watchdog + self.watchdog_every if self.watchdog_every else float("inf")

    def ping_watchdog(self) -> None:
        now = time.monotonic()
        if self.watchdog_every and now - self.last_watchdog >= self.watchdog_every:
            systemd.watchdog_ping()
            self.last_watchdog = now

    def serve_metrics(self) -> None:
        try:
            self.ctx.metrics.serve(self.cfg.metrics.address, self.cfg.metrics.port)
        except OSError as exc:
            log.warning("metrics off: cannot listen on %s:%d: %s", self.cfg.metrics.address,
                        self.cfg.metrics.port, exc.strerror)


def _keep_apps(new: config.Config, old: config.Config) -> config.Config:
    """A reload keeps the running set of apps (their parts are made at start); the rest applies."""
    import dataclasses

    return dataclasses.replace(new, app=old.app, apps=old.apps)
