"""The registry part of one app: its WorkloadEntry, registered while the app is healthy behind a ready
sidecar and not in maintenance (the VM's or the app's), withdrawn otherwise. The registrar (a pure state
machine) decides; its API worker and group watch run in threads and post back, tagged with the app
(ForApp), since a VM may run several apps (agent.apps), each with a registry part of its own."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from agent import apps, clock, config
from agent.bundle.model import Bundle
from agent.health.monitor import HealthChanged
from agent.health.state import Health
from agent.part import BundleInUse, Context, FatalError, ForApp, MaintenanceChanged
from agent.registry import registrar as reg
from agent.registry import service
from agent.registry.address_part import AddressChanged
from agent.registry.converge import Outcome
from agent.registry.group import GroupSeen
from agent.registry.states import RegistrationStatus, State
from agent.registry.worker import RegistryResult

log = logging.getLogger("agent.registry")


@dataclass(frozen=True)
class RegistrationSnapshot:
    registrar: RegistrationStatus | None = None
    wall_offset: float = 0.0  # wall clock minus the loop's monotonic clock, for the times below
    last_write: dict[str, Any] = field(default_factory=dict)
    lease: dict[str, Any] = field(default_factory=dict)

    @property
    def registered(self) -> bool:
        return self.registrar is not None and self.registrar.known is State.REGISTERED

    def as_dict(self) -> dict[str, Any]:
        st = self.registrar
        if st is None:
            return {}

        def wall(t: float | None) -> float | None:
            return t + self.wall_offset if t is not None else None

        # What is known, not the last attempt: an outage leaves the entry as the API last showed it.
        d: dict[str, Any] = {"state": st.state.value, "want": st.want.value, "entry": st.entry,
                             "namespace": st.namespace, "message": st.message, "registered": self.registered,
                             "known": st.known.value if st.known is not None else None,
                             "confirmed_at": wall(st.confirmed_at), "unknown_since": wall(st.unknown_since)}
        if st.conflict_holder:
            d["conflict"] = f"entry held by instance {st.conflict_holder}"
        if st.state is State.RETRYING:
            d["error"] = st.message
        return {**d, **self.last_write, **self.lease}


class RegistryPart:
    def __init__(self, ctx: Context, app: str = apps.SINGLE) -> None:
        self.ctx = ctx
        self.app = app
        self.name = f"registry:{app}"
        self.service: service.RegistryService | None = None
        self.registrar: reg.Registrar | None = None
        self.bundle: Bundle | None = None
        self.health = Health.UNKNOWN
        self.vm_maintenance = False
        self.app_maintenance = False
        self.last_write: dict[str, Any] = {}
        self.lease: dict[str, Any] = {}

    def start(self, now: float) -> None:
        pass  # the first bundle names the group and the API

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()

    @property
    def finished(self) -> bool:
        return self.registrar is None or self.registrar.finished

    def withdraw(self, now: float, timeout: float) -> None:
        """The draining stop: withdraw the entry and release the lease (the loop pumps until finished)."""
        if self.registrar is not None:
            self.registrar.shutdown(now, timeout=timeout)

    def status(self) -> RegistrationSnapshot:
        return RegistrationSnapshot(self.registrar.status() if self.registrar is not None else None,
                                    clock.wall_offset(), self.last_write, self.lease)

    @property
    def maintenance(self) -> bool:
        return self.vm_maintenance or self.app_maintenance

    def app_config(self, cfg: config.Config) -> apps.App:
        found = apps.find(cfg, self.app)
        assert found is not None, self.app  # the daemon makes the parts from the configuration
        return found

    def reconfigure(self, old: config.Config, new: config.Config) -> None:
        was = apps.find(old, self.app)
        before = apps.registry_config(old, was) if was is not None else None
        if before != apps.registry_config(new, self.app_config(new)) and self.registrar is not None \
                and self.bundle is not None:
            log.info("registry settings changed: re-applying the entry")
            # A new registrar takes over; the old one does not withdraw.
            self.stop()
            self.service = self.registrar = None
            self.start_registrar(self.bundle)

    # --- events and timers ---

    def handle(self, event: object, now: float) -> bool:
        if isinstance(event, BundleInUse):
            self.bundle = event.bundle
            # Without an address yet, the address part looks for one; its AddressChanged starts us.
            if self.registrar is None and self.ctx.cfg.registry.enabled and self.ctx.address is not None:
                self.start_registrar(event.bundle)
            return False
        if isinstance(event, MaintenanceChanged):
            if event.app is None:
                self.vm_maintenance = event.on
            elif event.app == self.app:
                self.app_maintenance = event.on
            if self.registrar is not None:
                self.registrar.set_maintenance(self.maintenance)
            return False
        if isinstance(event, AddressChanged):  # the VM's: every app's entry moves
            if self.registrar is None and self.bundle is not None and self.ctx.cfg.registry.enabled:
                self.start_registrar(self.bundle)  # the first address, after a start without one
            else:
                self.address_changed(event.new)
            return False
        if not isinstance(event, ForApp) or event.app != self.app:
            return False
        event = event.event
        if isinstance(event, HealthChanged):
            self.health = event.state
            if self.registrar is not None:
                self.registrar.set_health(event.state, event.reason, event.cause.value)
            return False
        if self.registrar is None or not self.registrar.handle(event, now):
            return False
        if isinstance(event, RegistryResult):
            self.result(event.outcome)
        return not isinstance(event, GroupSeen)  # the health part follows the group too

    def tick(self, now: float) -> float | None:
        if self.registrar is None:
            return None
        due = self.registrar.tick(now)  # retries, lease renewal, resync
        if self.service is not None:
            self.service.report()  # what changed, as Kubernetes Events
        self.ctx.metrics.set("registered", 1 if self.status().registered else 0, self.app)
        return due

    # --- the registrar ---

    def start_registrar(self, bundle: Bundle) -> None:
        address = self.ctx.address
        assert address is not None  # started only once the address part has one
        try:
            plan = self.plan(bundle, address)
        except OSError as exc:
            raise FatalError(f"registry: {self.ctx.layout.machine_id}: {exc.strerror}") from exc
        except service.PlanError as exc:
            raise FatalError(str(exc), config.EX_CONFIG) from exc
        try:
            self.service = service.RegistryService.start(
                plan, lambda ev: self.ctx.post(ForApp(self.app, ev)),
                lambda result: self.ctx.metrics.inc("events", self.app, result))
        except service.PlanError as exc:
            raise FatalError(str(exc), config.EX_CONFIG) from exc
        self.registrar = self.service.registrar
        app = self.app_config(self.ctx.cfg)
        if bundle.workload_group and apps.owns_bundle_group(app, apps.bundle_group(bundle.env_map)):
            self.registrar.set_group(dict(bundle.workload_group))
        self.registrar.set_health(self.health)
        self.registrar.set_maintenance(self.maintenance)
        s = plan.settings
        log.info("registering as %s in %s/%s (instance %s)", address, s.namespace, s.group, s.instance)

    def plan(self, bundle: Bundle, address: str) -> service.Plan:
        """This app's entry at `address`: the one place its plan is made (at start and on a move).
        Raises OSError (the machine-id) or service.PlanError."""
        machine_id = self.ctx.layout.machine_id.read_text()
        # A cloud instance tells clones of one image apart better than their machine-id.
        machine_id = self.ctx.instance_key or machine_id
        app = self.app_config(self.ctx.cfg)
        return service.make_plan(apps.registry_config(self.ctx.cfg, app), bundle.env_map, machine_id=machine_id,
                                 address=address, bundle_kubeconfig=self.ctx.shipped_kubeconfig(),
                                 identity_token=self.ctx.identity_token(), several_apps=app.several)

    def address_changed(self, address: str) -> None:
        """The VM's address changed (agent.registry.address_part): the registrar moves the entry."""
        if self.registrar is None or self.bundle is None:
            return
        try:
            plan = self.plan(self.bundle, address)
        except (OSError, service.PlanError) as exc:
            self.ctx.record_error("registry", f"cannot move the entry to {address}: {exc}")
            return
        log.info("moving the entry to %s", address)
        self.registrar.move(plan.build)

    def result(self, outcome: Outcome) -> None:
        """Remember the last write and the lease, for status and metrics."""
        if outcome.wrote:
            self.last_write = {"last_write": time.time(), "last_action": ", ".join(outcome.wrote)}
            for action in outcome.wrote:
                self.ctx.metrics.inc("writes", action, "error" if outcome.error else "ok")
        if outcome.error is None:
            self.ctx.metrics.set("api_contact", time.time())
        else:
            self.ctx.metrics.inc("errors", "registry")
        if outcome.lease is not None:
            meta, spec = outcome.lease.get("metadata", {}), outcome.lease.get("spec", {})
            self.lease = {"lease": meta.get("name"), "lease_renewed_text": spec.get("renewTime"),
                          "lease_renewed": time.time()}

