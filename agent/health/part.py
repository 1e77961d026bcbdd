"""The health part of one app: its monitor, fed with the probe and ports agent.health.inputs decides,
and told when the sidecar is ready (the app counts as healthy only behind a ready proxy). A VM with
several apps (agent.apps) has one health part each; their monitors' events come back tagged (ForApp)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from agent import apps, config
from agent.bundle.model import Bundle
from agent.health import inputs
from agent.health.monitor import HealthChanged, Monitor, probe_host
from agent.health.state import Health
from agent.part import BundleInUse, Context, FatalError, ForApp, SidecarReadiness
from agent.registry.address_part import AddressChanged
from agent.registry.group import GroupSeen

log = logging.getLogger("agent.health")


@dataclass(frozen=True)
class AppSnapshot:
    monitor: dict[str, Any] = field(default_factory=dict)  # HealthSnapshot.to_dict()

    def as_dict(self) -> dict[str, Any]:
        if not self.monitor:
            return {}
        return {**self.monitor, "healthy": {"healthy": True, "unhealthy": False}.get(str(self.monitor.get("state")))}


class HealthPart:
    def __init__(self, ctx: Context, app: str = apps.SINGLE) -> None:
        self.ctx = ctx
        self.app = app
        self.name = f"health:{app}"
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

    @property
    def app_config(self) -> apps.App:
        found = apps.find(self.ctx.cfg, self.app)
        assert found is not None, self.app  # the daemon makes the parts from the configuration
        return found

    def post(self, event: object) -> None:
        self.ctx.post(ForApp(self.app, event))

    def handle(self, event: object, now: float) -> bool:
        if isinstance(event, ForApp):
            if event.app != self.app:
                return False
            event = event.event
            if isinstance(event, GroupSeen):
                self.group = event.group  # it may carry a new probe or ports
                self.follow_inputs()
            elif isinstance(event, HealthChanged):
                self.ctx.metrics.set("app_healthy", 1 if event.state is Health.HEALTHY else 0, self.app)
                return True
            return False
        if isinstance(event, BundleInUse):
            self.bundle = event.bundle
            if self.monitor is None:
                self.start_monitor(event.bundle)
            else:
                self.follow_inputs()
        elif isinstance(event, SidecarReadiness):
            self.sidecar_ready = event.ready
            if self.monitor is not None:
                self.monitor.set_sidecar_ready(event.ready)
        elif isinstance(event, AddressChanged) and self.app_config.health.probe_host == "instance":
            self.watching = None  # probes that connect to the instance address use the new one
            self.follow_inputs()
        return False

    def reconfigure(self, old: config.Config, new: config.Config) -> None:
        before = apps.find(old, self.app)
        if before is None or before.health != self.app_config.health:
            self.watching = None  # the flap settings or probe host may have changed too
            self.follow_inputs()

    def decide(self) -> inputs.HealthInputs:
        cfg, bundle, app = self.ctx.cfg, self.bundle, self.app_config
        # The bundle's group, probe and inbound ports are the app's only if the bundle was made for its group.
        own = bundle is not None and apps.owns_bundle_group(app, apps.bundle_group(bundle.env_map))
        group = self.group or (dict(bundle.workload_group) if own and bundle and bundle.workload_group else None)
        decided = inputs.resolve(app.health, group=group, mesh_readiness=bundle.probe if own and bundle else None,
                                 inbound_ports=bundle.env_map.get("ISTIO_INBOUND_PORTS") if own and bundle else None,
                                 allow_exec=cfg.bundle.allow_exec_probe, user=cfg.sidecar.user)
        for problem in decided.problems:
            log.error("%s", problem)
            self.ctx.record_error("health", problem)
        return decided

    def start_monitor(self, bundle: Bundle) -> None:
        decided = self.decide()
        if not decided.usable:
            where = "app" if self.app == apps.SINGLE else f"apps: {self.app}"
            raise FatalError(f"{where}: no probe and no app port to check: set its ports or probe, or give its "
                             "WorkloadGroup a probe or ports", config.EX_CONFIG)
        app = self.app_config.health
        self.monitor = Monitor(decided.probe, ports=decided.ports, post=self.post, flap=app.flap,
                               probe_host=probe_host(app, self.ctx.address),
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
        app = self.app_config.health
        self.monitor.reconfigure(decided.probe, ports=decided.ports, flap=app.flap,
                                 probe_host=probe_host(app, self.ctx.address))

