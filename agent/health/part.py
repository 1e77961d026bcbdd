"""The health part: the app monitor, fed with the probe and ports agent.health.inputs decides, and told
when the sidecar is ready (the app counts as healthy only behind a ready proxy)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from agent import config
from agent.bundle.model import Bundle
from agent.health import inputs
from agent.health.monitor import HealthChanged, Monitor, probe_host
from agent.health.state import Health
from agent.part import BundleInUse, Context, FatalError, SidecarReadiness
from agent.registry.address_part import AddressChanged

log = logging.getLogger("agent.health")


@dataclass(frozen=True)
class AppSnapshot:
    monitor: dict[str, Any] = field(default_factory=dict)  # HealthSnapshot.to_dict()

    def as_dict(self) -> dict[str, Any]:
        if not self.monitor:
            return {}
        return {**self.monitor, "healthy": {"healthy": True, "unhealthy": False}.get(str(self.monitor.get("state")))}


class HealthPart:
    name = "health"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.monitor: Monitor | None = None
        self.bundle: Bundle | None = None
        self.group: dict[str, Any] | None = None  # the WorkloadGroup as the API last showed it
        self.watching: inputs.HealthInputs | None = None
        self.sidecar_ready = False

    def start(self, now: float) -> None:
        pass  # the first bundle says what to watch

    def stop(self) -> None:
        if self.monitor is not None:
            self.monitor.stop()

    def tick(self, now: float) -> float | None:
        return None  # the monitor's threads keep their own time

    @property
    def health(self) -> Health:
        return self.monitor.snapshot().state if self.monitor is not None else Health.UNKNOWN

    def status(self) -> AppSnapshot:
        return AppSnapshot(self.monitor.snapshot().to_dict() if self.monitor is not None else {})

    def handle(self, event: object, now: float) -> bool:
        from agent.registry.group import GroupSeen

        if isinstance(event, BundleInUse):
            self.bundle = event.bundle
            if self.monitor is None:
                self.start_monitor(event.bundle)
            else:
                self.follow_inputs()
        elif isinstance(event, GroupSeen):
            self.group = event.group  # it may carry a new probe or ports
            self.follow_inputs()
        elif isinstance(event, SidecarReadiness):
            self.sidecar_ready = event.ready
            if self.monitor is not None:
                self.monitor.set_sidecar_ready(event.ready)
        elif isinstance(event, AddressChanged):
            if self.ctx.cfg.app.probe_host == "instance":
                self.watching = None  # probes that connect to the instance address use the new one
                self.follow_inputs()
        elif isinstance(event, HealthChanged):
            self.ctx.metrics.set("app_healthy", 1 if event.state is Health.HEALTHY else 0)
            return True
        return False

    def reconfigure(self, old: config.Config, new: config.Config) -> None:
        if new.app != old.app:
            self.watching = None  # the flap settings or probe host may have changed too
            self.follow_inputs()

    def decide(self) -> inputs.HealthInputs:
        cfg, bundle = self.ctx.cfg, self.bundle
        group = self.group or (dict(bundle.workload_group) if bundle and bundle.workload_group else None)
        decided = inputs.resolve(cfg.app, group=group, mesh_readiness=bundle.probe if bundle else None,
                                 inbound_ports=bundle.env_map.get("ISTIO_INBOUND_PORTS") if bundle else None,
                                 allow_exec=cfg.bundle.allow_exec_probe, user=cfg.sidecar.user)
        for problem in decided.problems:
            log.error("%s", problem)
            self.ctx.record_error("health", problem)
        return decided

    def start_monitor(self, bundle: Bundle) -> None:
        decided = self.decide()
        if not decided.usable:
            raise FatalError("app: no probe and no app port to check: set app.ports or app.probe",
                             config.EX_CONFIG)
        app = self.ctx.cfg.app
        self.monitor = Monitor(decided.probe, ports=decided.ports, post=self.ctx.post, flap=app.flap,
                               probe_host=probe_host(app, self.ctx.address_for(bundle)),
                               watch_process=app.watch_process, sidecar_ready=self.sidecar_ready)
        self.watching = decided
        self.monitor.start()

    def follow_inputs(self) -> None:
        """A new probe or ports take effect; unchanged ones leave the monitor be."""
        if self.monitor is None or self.bundle is None:
            return
        decided = self.decide()
        if decided == self.watching:
            return
        if not decided.usable:
            self.ctx.record_error("health", "no probe and no app port to check: keeping the running checks; "
                                            "set app.ports or app.probe")
            return
        self.watching = decided
        app = self.ctx.cfg.app
        self.monitor.reconfigure(decided.probe, ports=decided.ports, flap=app.flap,
                                 probe_host=probe_host(app, self.ctx.address_for(self.bundle)))
