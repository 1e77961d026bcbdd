"""`mesh-agent run`: the main loop that joins bundle, sidecar, health and registry.

Reading order: `main` loads the config (exit 78 when it is bad) and runs `Agent.run`: start, then the
loop, then the draining stop, top to bottom. The loop owns all state. Threads (the bundle fetch, the
sidecar's waiter, probes and the port watch, file watches, the API worker and group watch) only post
events to `self.events`; signal handlers only record.

What the loop decides, on every pass:
- a fetched bundle is validated and installed here (never in a thread), so the tamper watch never
  sees half an install; a bad one is refused and the last good bundle keeps running;
- the first bundle brings the rest up: sidecar package, proxy, app monitor, registrar;
- the registrar is told the app's health (which already includes the sidecar's readiness) and
  whether the VM is in maintenance; it registers or withdraws on its own worker thread.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import queue
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

from agent import __version__, config, logs, systemd
from agent import reload as reload_verb
from agent.bundle import install as bundle_install
from agent.bundle import model as bundle_model
from agent.bundle import update as bundle_update
from agent.bundle import watch as bundle_watch
from agent.health import probes
from agent.health.monitor import HealthChanged, Monitor
from agent.health.state import Health
from agent.kube.client import Kube
from agent.maintenance import maintenance_requested
from agent.metrics import Metrics
from agent.paths import Layout
from agent.registry import registrar as reg
from agent.registry import service as registry_service
from agent.registry.address import AddressError, detect_address
from agent.sidecar import package as sidecar_package
from agent.sidecar import process as sidecar_process
from agent.sidecar.profiles import ProfileError, describe, read_spec
from agent.state import Phase, PhaseMachine, Status, StatusWriter, summarize

log = logging.getLogger("agent.daemon")

MAX_WAIT = 5.0  # the loop wakes at least this often (maintenance file, timers)


class FatalError(Exception):
    """Something the agent cannot fix by itself: exit non-zero (1: systemd restarts it; 78: a
    configuration problem, which a restart cannot fix)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Wake:
    """Put on the queue by a signal handler so the loop looks at the flags now."""


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
        self.cfg = cfg
        self.config_path = config_path
        self.layout = Layout.from_config(cfg)
        self.events: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.signals = Signals(self.events)
        self.phase = PhaseMachine()
        self.status = Status(version=__version__)
        self.status_writer = StatusWriter(self.layout.status_file)
        self.metrics = Metrics()
        self.ready_sent = False
        self.last_summary = ""
        self.reloads = 0  # generation of the last reload, for `mesh-agent reload`
        self.watchdog_every = systemd.watchdog_interval()
        self.last_watchdog = 0.0
        # The parts; None until the first bundle brings them up.
        self.bundle: bundle_model.Bundle | None = None
        self.installed: bundle_install.InstalledBundle | None = None
        self.last_fetch_attempt: float | None = None
        self.fetcher: Any = None  # bundle_update.Refresher, or the cluster source's refresher
        self.tamper_watch: bundle_watch.InstalledFilesWatcher | None = None
        self.address: str | None = None
        self.package_checked = False
        self.sidecar: sidecar_process.Supervisor | None = None
        self.monitor: Monitor | None = None
        self.monitor_inputs: tuple[config.ProbeConfig | None, tuple[int, ...]] | None = None
        self.group: dict[str, Any] | None = None  # the WorkloadGroup as the API last showed it
        self.kube: Kube | None = None  # for the `kubernetes` bundle source
        self.registry: registry_service.RegistryService | None = None
        self.registrar: reg.Registrar | None = None  # self.registry.registrar, the part the loop drives
        self.registry_due = 0.0  # when the registrar wants its next tick (monotonic)
        self.last_write: dict[str, Any] = {}
        self.lease_info: dict[str, Any] = {}
        self.identity: Any = None  # agent.identity.refresh.IdentityRefresher, with an identity provider

    @property
    def file_owner(self) -> str | None:
        """Who owns the installed bundle files: the proxy's user (istio), or nobody special (envoy)."""
        return self.cfg.sidecar.user if self.cfg.sidecar.profile == "istio" else None

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
            self.record_error("agent", str(exc))
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
        """Restore the last good bundle (the VM stays in the mesh across restarts), then fetch."""
        try:
            restored = bundle_install.restore_last_good(self.layout, user=self.file_owner)
        except bundle_install.InstallError as exc:
            self.bundle_error(f"cannot restore the last good bundle: {exc}")
            restored = None
        if restored is not None:
            log.info("last good bundle %s from %s", restored.version, restored.source)
            self.use_bundle(self.parse_stored())
        self.start_identity()
        self.fetcher = self.make_fetcher()
        self.fetcher.start()
        if self.cfg.bundle.restore_tampered:
            self.tamper_watch = bundle_watch.InstalledFilesWatcher(self.layout, self.events.put)
            self.tamper_watch.start()
        self.publish()

    def one_pass(self) -> None:
        """Wait for one event or the next deadline, handle everything pending, then decide."""
        now = time.monotonic()
        timeout = max(0.0, min(self.next_deadline(now) - now, MAX_WAIT))
        try:
            event: object | None = self.events.get(timeout=timeout)
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
        s = self.cfg.shutdown
        deadline = time.monotonic() + s.timeout
        restarting = self.phase.phase is not Phase.FAILED and systemd.pending_job() == "restart" \
            and self.next_config_valid()
        if restarting:
            log.info("systemd is restarting mesh-agent: the entry stays registered")
            systemd.stopping("restarting: staying in the mesh")
            self.stop_threads()
            return
        systemd.stopping("withdrawing from the mesh")
        self.publish()
        if self.registrar is not None:
            self.registrar.shutdown(time.monotonic(), timeout=max(1.0, s.timeout / 3))
            self.pump_until(lambda: self.registrar is None or self.registrar.finished, deadline)
            if self.status.registration.get("registered") is False or self.registrar.finished:
                log.info("entry withdrawn; waiting %.1fs for the mesh to stop sending traffic", s.propagation)
                self.pump_until(lambda: False, min(deadline, time.monotonic() + s.propagation))
        if self.sidecar is not None:
            remaining = deadline - time.monotonic()
            systemd.extend_timeout(max(remaining, 1.0) + 5)
            self.sidecar.stop(drain=self.signals.terminate < 2)
            self.sidecar_changed()
        self.stop_threads()
        self.publish()

    def next_config_valid(self) -> bool:
        """Whether the agent systemd starts next can run: agent.yaml as it is on disk now is valid."""
        try:
            config.load(self.config_path)
        except config.ConfigError as exc:
            log.error("systemd is restarting mesh-agent, but the next agent would refuse %s (%s): "
                      "withdrawing the entry as on a stop", self.config_path, exc.errors[0])
            self.record_error("agent", f"restart into a bad configuration: {exc.errors[0]}")
            return False
        return True

    def stop_threads(self) -> None:
        for part in (self.monitor, self.fetcher, self.tamper_watch, self.registry, self.identity):
            if part is not None:
                with contextlib.suppress(Exception):
                    part.stop()

    # --- events ----------------------------------------------------------------------------------

    def handle(self, event: object) -> None:
        now = time.monotonic()
        if isinstance(event, Wake):
            return
        if isinstance(event, bundle_update.BundleFetched):
            self.last_fetch_attempt = time.time()
            self.install_bundle(event.files, event.source, event.validators)
        elif isinstance(event, bundle_update.BundleNotModified):
            self.last_fetch_attempt = time.time()
            self.schedule_refresh()
        elif isinstance(event, bundle_update.BundleFetchFailed):
            self.last_fetch_attempt = time.time()
            self.bundle_error(f"fetch failed (retry in {event.retry_in:.0f}s): {event.error}")
        elif isinstance(event, bundle_watch.BundleFilesChanged):
            try:
                restored = bundle_watch.restore_tampered(self.layout, user=self.file_owner)
            except bundle_install.InstallError as exc:
                self.bundle_error(f"cannot restore the installed bundle: {exc}")
                restored = []
            if restored:
                self.record_error("bundle", f"restored {', '.join(restored)}: edited outside the agent")
            if self.tamper_watch is not None:
                self.tamper_watch.rewatch()
        elif self.sidecar is not None and self.sidecar.handle(event):
            self.sidecar_changed()
        elif isinstance(event, sidecar_process.SidecarStateChanged):
            pass  # the snapshot is read from the supervisor itself
        elif isinstance(event, HealthChanged):
            self.health_changed(event)
        elif self.registrar is not None and self.registrar.handle(event, now):
            if isinstance(event, reg.RegistryResult):
                self.registry_result(event.outcome)
            if isinstance(event, reg.GroupSeen):
                self.group_seen(event.group)
        elif self.identity is not None and self.identity_event(event):
            pass
        else:
            self.handle_cluster_event(event)

    def handle_cluster_event(self, event: object) -> None:
        """Events of the `kubernetes` bundle source, when it is used."""
        try:
            from agent.bundle import cluster_source
        except ImportError:
            log.debug("unhandled event %r", event)
            return
        if isinstance(event, cluster_source.ClusterBundleFetched):
            self.last_fetch_attempt = time.time()
            self.install_bundle(dict(event.files), cluster_source.SOURCE_NAME, None)
        elif isinstance(event, cluster_source.ClusterFetchFailed):
            self.bundle_error(f"building the bundle from the cluster failed "
                              f"(retry in {event.retry_in:.0f}s): {event.error}")
        else:
            log.debug("unhandled event %r", event)
            return
        cluster_source.observe(self.metrics, event)
        self.status.bundle.update({k: v for k, v in self.fetcher.status().items() if v is not None})

    def tick(self, now: float) -> None:
        if self.sidecar is not None:
            self.sidecar.tick(now)
            self.sidecar_changed()
        self.status.maintenance = maintenance_requested(self.layout)
        if self.registrar is not None:
            self.registrar.set_maintenance(self.status.maintenance)
            self.registry_due = self.registrar.tick(now)
            self.registration_changed()

    def next_deadline(self, now: float) -> float:
        deadlines = [now + MAX_WAIT]
        if self.watchdog_every:
            deadlines.append(self.last_watchdog + self.watchdog_every)
        if self.sidecar is not None and self.sidecar.machine.deadline is not None:
            deadlines.append(self.sidecar.machine.deadline)
        if self.registrar is not None:
            deadlines.append(self.registry_due)  # retries, lease renewal, resync
        return min(deadlines)

    def pump_until(self, done: Any, deadline: float) -> None:
        """Keep handling events (API answers, a second SIGTERM) until done() or the deadline."""
        while not done() and time.monotonic() < deadline and self.signals.terminate < 2:
            try:
                event = self.events.get(timeout=min(0.1, max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                event = None
            if event is not None:
                self.handle(event)
            if self.registrar is not None:
                self.registrar.tick(time.monotonic())
                self.registration_changed()
            self.publish()
            self.ping_watchdog()

    # --- bundle ----------------------------------------------------------------------------------

    def make_fetcher(self) -> Any:
        if self.cfg.bundle.source.strip() == "kubernetes":
            return self.make_cluster_fetcher()

        def validators() -> bundle_update.Validators | None:
            i = self.installed
            return bundle_update.Validators(i.etag, i.last_modified) if i else None

        return bundle_update.Refresher(self.cfg.bundle, self.events.put, validators)

    def make_cluster_fetcher(self) -> Any:
        from agent.bundle import cluster_source

        settings = cluster_source.settings_from_config(self.cfg.bundle, svc_ip=self.cfg.registry.address.value)
        return cluster_source.ClusterRefresher(cluster_source.ClusterSource(self.api(), settings), self.events.put,
                                               refresh_fraction=self.cfg.bundle.refresh_fraction)

    def parse_stored(self) -> bundle_model.Bundle:
        """The last good bundle as a Bundle, validated as of when it was fetched (its token may have
        expired since; the proxy renews its certificate with the one it holds)."""
        loaded = bundle_install.load_last_good(self.layout)
        assert loaded is not None
        self.installed, files = loaded
        return bundle_model.parse_bundle(files, self.installed.fetched_at, self.cfg.bundle)

    def install_bundle(self, files: dict[str, bytes], source: str,
                       validators: bundle_update.Validators | None) -> None:
        """Validate, then install, a fetched bundle. Anything wrong: refused, nothing live touched."""
        wall = time.time()
        try:
            bundle = bundle_model.parse_bundle(files, wall, self.cfg.bundle)
            if self.installed is not None and self.installed.digest == bundle.digest \
                    and not bundle_install.drifted(self.layout):
                self.schedule_refresh()
                return
            for w in bundle.warnings:
                log.warning("bundle %s: %s", bundle.version, w)
            if self.sidecar is None:
                # The sidecar package creates the user (istio-proxy) that owns the bundle's files.
                self.ensure_sidecar_package(bundle)
            result = bundle_install.install(
                bundle, self.layout, source=source, fetched_at=wall, user=self.file_owner,
                etag=validators.etag if validators else None,
                last_modified=validators.last_modified if validators else None)
        except bundle_install.MissingUser as exc:
            if self.sidecar is None:  # nothing will create the user while we wait: say so and stop
                raise FatalError(f"bundle from {source} cannot be installed: {exc}; or name the package in "
                                 "sidecar.package", config.EX_CONFIG) from exc
            self.bundle_error(f"bundle from {source} refused, keeping the last good one: {exc}")
            self.schedule_refresh()
            return
        except (bundle_model.BundleError, bundle_install.InstallError) as exc:
            self.bundle_error(f"bundle from {source} refused, keeping the last good one: {exc}")
            self.schedule_refresh()
            return
        self.installed = result.installed
        self.status.bundle.pop("error", None)
        self.metrics.set("bundle_fetched", wall)
        changed = set(result.changed)
        first = self.bundle is None
        if self.tamper_watch is not None:
            self.tamper_watch.rewatch()  # the first install creates the directories it watches
        self.use_bundle(bundle)
        if not first and self.sidecar is not None and changed & {"cluster.env", "mesh.yaml"} \
                and self.cfg.sidecar.profile == "istio":
            log.info("cluster.env or mesh.yaml changed: restarting the proxy to use them")
            self.sidecar.stop(drain=True)
            self.sidecar.start()
        self.schedule_refresh()

    def schedule_refresh(self) -> None:
        i = self.installed
        if i is None or not isinstance(self.fetcher, bundle_update.Refresher):
            return  # the cluster source schedules itself
        delay = bundle_watch.refresh_delay(i.token_expiry, i.token_issued_at, i.fetched_at, self.cfg.bundle,
                                           time.time(), self.last_fetch_attempt)
        self.fetcher.schedule(delay)

    def bundle_error(self, message: str) -> None:
        log.error("%s", message)
        self.status.bundle["error"] = message
        self.record_error("bundle", message)

    def use_bundle(self, bundle: bundle_model.Bundle) -> None:
        """Take a (new) bundle into use; the first one brings up the sidecar, monitor and registrar."""
        self.bundle = bundle
        if self.installed is not None:
            self.status.bundle = {**self.installed.status(), "warnings": list(bundle.warnings)}
            if self.installed.token_expiry:
                self.metrics.set("expiry", self.installed.token_expiry, "token")
            if self.installed.cert_expiry:
                self.metrics.set("expiry", self.installed.cert_expiry, "root_cert")
        if self.address is None:
            self.address = self.detect_address(bundle)
        if self.sidecar is None:
            self.start_sidecar(bundle)
        if self.monitor is None:
            self.start_monitor()
        if self.registrar is None and self.cfg.registry.enabled:
            self.start_registrar(bundle)

    # --- sidecar ---------------------------------------------------------------------------------

    def ensure_sidecar_package(self, bundle: bundle_model.Bundle) -> None:
        """Install the istio-sidecar package named by the config or the bundle (once per start)."""
        if self.package_checked:
            return
        source = sidecar_package.choose_source(self.cfg.sidecar.package,
                                               _as_mapping(bundle.sidecar) if bundle.sidecar else None)
        if source is not None:
            try:
                sidecar_package.Installer(self.layout).ensure(source)
            except sidecar_package.PackageError as exc:
                raise FatalError(f"sidecar package: {exc}") from exc
        self.package_checked = True

    def start_sidecar(self, bundle: bundle_model.Bundle) -> None:
        self.ensure_sidecar_package(bundle)
        try:
            spec = read_spec(self.cfg.sidecar, self.layout, cluster_env=bundle.env_map,
                             hostname=socket.gethostname().split(".")[0], address=self.address)
        except ProfileError as exc:
            raise FatalError(f"sidecar: {exc}") from exc
        log.info("sidecar: %s", describe(spec))
        self.sidecar = sidecar_process.Supervisor(spec, self.layout, self.events.put)
        self.sidecar.start()
        self.sidecar_changed()

    def sidecar_changed(self) -> None:
        sup = self.sidecar
        if sup is None:
            return
        before = self.status.sidecar.get("restarts", 0)
        self.status.sidecar = {"state": sup.state.value,
                               "pid": sup.pid, "restarts": sup.restarts, "ready": sup.ready,
                               "reason": sup.reason}
        if sup.restarts > before:
            self.metrics.inc("sidecar_restarts", amount=sup.restarts - before)
        self.metrics.set("sidecar_ready", 1 if sup.ready else 0)
        if self.monitor is not None:
            self.monitor.set_sidecar_ready(sup.ready)
        if sup.state is sidecar_process.State.FATAL and self.phase.phase in (Phase.STARTING, Phase.RUNNING,
                                                                             Phase.RELOADING):
            raise FatalError(f"sidecar failed: {sup.reason}")

    # --- app health ------------------------------------------------------------------------------

    def start_monitor(self) -> None:
        probe, ports = self.health_inputs()
        self.monitor = Monitor.from_config(self.cfg.app, bundle_probe=probe, ports=ports,
                                           instance_address=self.address, post=self.events.put,
                                           sidecar_ready=bool(self.sidecar and self.sidecar.ready))
        self.monitor_inputs = (probe, ports)
        self.monitor.start()
        self.health_snapshot()

    def health_inputs(self) -> tuple[config.ProbeConfig | None, tuple[int, ...]]:
        """The app's probe and ports: agent.yaml's, else the WorkloadGroup's (as the API last showed it,
        else the bundle's copy), else mesh.yaml's readinessProbe and cluster.env's ISTIO_INBOUND_PORTS."""
        bundle = self.bundle
        group = self.group or (dict(bundle.workload_group) if bundle and bundle.workload_group else {})
        template_ports = ((group.get("spec") or {}).get("template") or {}).get("ports")
        inbound = bundle.env_map.get("ISTIO_INBOUND_PORTS") if bundle else None
        ports = probes.app_ports(self.cfg.app.ports, template_ports, inbound)
        probe = self.cfg.app.probe or self.group_probe(group) or \
            self.mesh_probe(bundle.probe if bundle else None, "mesh.yaml: defaultConfig.readinessProbe")
        return probe, ports

    def reconfigure_monitor(self) -> None:
        """A new probe or ports (reload, a changed group) take effect; unchanged ones leave it be."""
        inputs = self.health_inputs()
        if self.monitor is None or inputs == self.monitor_inputs:
            return
        self.monitor_inputs = inputs
        self.monitor.reconfigure(inputs[0], ports=inputs[1], flap=self.cfg.app.flap, probe_host=self.probe_host())

    def group_probe(self, group: dict[str, Any]) -> config.ProbeConfig | None:
        spec = group.get("spec") or {}
        if not spec.get("probe"):
            return None
        try:
            return self.mesh_probe(probes.probe_from_istio(spec["probe"], "WorkloadGroup spec.probe"),
                                   "WorkloadGroup spec.probe")
        except probes.ProbeSpecError as exc:
            self.record_error("health", str(exc))
            return None

    def mesh_probe(self, probe: config.ProbeConfig | None, where: str) -> config.ProbeConfig | None:
        """A probe from the mesh as it may run here: an exec probe is refused, or run as sidecar.user."""
        try:
            return probes.mesh_probe(probe, where, allow_exec=self.cfg.bundle.allow_exec_probe,
                                     user=self.cfg.sidecar.user)
        except probes.ProbeSpecError as exc:
            log.error("%s", exc)
            self.record_error("health", str(exc))
            return None

    def health_changed(self, event: HealthChanged) -> None:
        if self.registrar is not None:
            self.registrar.set_health(event.state, event.reason)
        self.metrics.set("app_healthy", 1 if event.state is Health.HEALTHY else 0)
        self.health_snapshot()

    def health_snapshot(self) -> None:
        if self.monitor is None:
            return
        snap = self.monitor.snapshot().to_dict()
        state = snap.get("state")
        snap["healthy"] = {"healthy": True, "unhealthy": False}.get(str(state))
        self.status.app = snap

    def group_seen(self, group: dict[str, Any]) -> None:
        """A changed WorkloadGroup may carry a new probe; the registrar re-applies the entry itself."""
        self.group = group
        self.reconfigure_monitor()

    def probe_host(self) -> str:
        from agent.health.monitor import probe_host

        return probe_host(self.cfg.app, self.address)

    # --- registration ----------------------------------------------------------------------------

    def detect_address(self, bundle: bundle_model.Bundle) -> str | None:
        a = self.cfg.registry.address
        try:
            return detect_address(svc_ip=bundle.env_map.get("ISTIO_SVC_IP") or None, value=a.value,
                                  interface=a.interface, cidr=a.cidr, family=a.family)
        except AddressError as exc:
            self.record_error("registry", str(exc))
            return None

    def shipped_kubeconfig(self) -> str | None:
        shipped = bundle_install.last_good_file(self.layout, "kubeconfig")
        return str(shipped) if shipped.exists() else None

    def api(self) -> Kube:
        if self.kube is None:
            try:
                creds = registry_service.credentials(self.cfg.registry, self.shipped_kubeconfig(),
                                                     self.identity_token())
                self.kube = Kube.from_credentials(creds, timeout=self.cfg.registry.timeout)
            except registry_service.PlanError as exc:
                raise FatalError(str(exc), config.EX_CONFIG) from exc
            except (ValueError, OSError) as exc:
                raise FatalError(f"Kubernetes credentials: {exc}") from exc
        return self.kube

    # --- identity (agent.identity): the cloud's token as the API credential -------------------------

    def identity_token(self) -> str | None:
        from agent.identity.refresh import token_file

        return token_file(self.cfg)

    def start_identity(self) -> None:
        """Fetch the first identity token before anything talks to the API, then keep it fresh. A failure
        is reported, not fatal: the refresher retries, and the API calls fail as unauthorised until then."""
        if self.cfg.identity.provider == "none":
            return
        from agent.identity.refresh import IdentityRefresher, make_provider

        ic = self.cfg.identity
        self.identity = IdentityRefresher(make_provider(ic), self.identity_token(), self.events.put,
                                          fraction=ic.refresh_fraction)
        try:
            self.identity.refresh_once()
            self.identity_status()
        except Exception as exc:  # reported; the refresher retries
            log.error("identity token from %s: %s", ic.provider, exc)
            self.record_error("identity", str(exc))
            self.identity_status(str(exc))
        self.identity.start()

    def identity_status(self, error: str | None = None) -> None:
        from agent.identity.refresh import describe

        token = self.identity.current if self.identity is not None else None
        self.status.identity = {"provider": self.cfg.identity.provider,
                                "who": describe(token) if token else "",
                                "expiry": token.expiry if token else None}
        if error:
            self.status.identity["error"] = error

    def identity_event(self, event: object) -> bool:
        from agent.identity.refresh import IdentityRefreshed, IdentityRefreshFailed

        if isinstance(event, IdentityRefreshFailed):
            self.record_error("identity", f"{event.error} (retry in {event.retry_in:.0f}s)")
            self.identity_status(event.error)
            return True
        if isinstance(event, IdentityRefreshed):
            self.identity_status()
            return True
        return False

    def start_registrar(self, bundle: bundle_model.Bundle) -> None:
        if self.address is None:
            raise FatalError("registry: no address for this VM: set registry.address", config.EX_CONFIG)
        try:
            machine_id = self.layout.machine_id.read_text()
        except OSError as exc:
            raise FatalError(f"registry: {self.layout.machine_id}: {exc.strerror}") from exc
        if self.identity is not None and self.identity.current is not None:
            from agent.identity.refresh import instance_key

            # The cloud's instance, not the image's machine-id, tells clones apart.
            machine_id = instance_key(self.identity.current, self.cfg.identity.provider) or machine_id
        try:
            plan = registry_service.make_plan(self.cfg.registry, bundle.env_map, machine_id=machine_id,
                                              address=self.address, bundle_kubeconfig=self.shipped_kubeconfig(),
                                              identity_token=self.identity_token())
            self.registry = registry_service.RegistryService.start(plan, self.events.put)
        except registry_service.PlanError as exc:
            raise FatalError(str(exc), config.EX_CONFIG) from exc
        self.registrar = self.registry.registrar
        if bundle.workload_group:
            self.registrar.set_group(dict(bundle.workload_group))
        if self.monitor is not None:
            state = self.monitor.snapshot().state
            self.registrar.set_health(state)
        s = plan.settings
        log.info("registering as %s in %s/%s (instance %s)", self.address, s.namespace, s.group, s.instance)

    def registry_result(self, outcome: reg.Outcome) -> None:
        """Remember the last write and the lease, for status and metrics."""
        r = self.status.registration
        if outcome.wrote:
            self.last_write = {"last_write": time.time(), "last_action": ", ".join(outcome.wrote)}
            for action in outcome.wrote:
                self.metrics.inc("writes", action, "error" if outcome.error else "ok")
        if outcome.error is None:
            self.metrics.set("api_contact", time.time())
        else:
            self.metrics.inc("errors", "registry")
        if outcome.lease is not None:
            meta, spec = outcome.lease.get("metadata", {}), outcome.lease.get("spec", {})
            self.lease_info = {"lease": meta.get("name"), "lease_renewed_text": spec.get("renewTime"),
                               "lease_renewed": time.time()}
        r.update(self.last_write)
        r.update(self.lease_info)

    def registration_changed(self) -> None:
        if self.registrar is None:
            return
        st = self.registrar.status()
        # What is known, not the last attempt: an outage leaves the entry as the API last showed it.
        to_wall = time.time() - time.monotonic()  # the registrar's clock is the loop's monotonic one
        reg_status = {"state": st.state.value, "want": st.want.value, "entry": st.entry,
                      "namespace": st.namespace, "message": st.message,
                      "registered": st.known is reg.State.REGISTERED,
                      "known": st.known.value if st.known is not None else None,
                      "confirmed_at": st.confirmed_at + to_wall if st.confirmed_at is not None else None,
                      "unknown_since": st.unknown_since + to_wall if st.unknown_since is not None else None}
        if st.conflict_holder:
            reg_status["conflict"] = f"entry held by instance {st.conflict_holder}"
        if st.state in (reg.State.RETRYING,):
            reg_status["error"] = st.message
        reg_status.update(self.last_write)
        reg_status.update(self.lease_info)
        self.status.registration = reg_status
        self.metrics.set("registered", 1 if reg_status["registered"] else 0)
        self.maybe_ready()

    def maybe_ready(self) -> None:
        """READY=1 once registered, or once the app is known unhealthy (so `systemctl start` ends)."""
        if self.ready_sent:
            return
        r, a = self.status.registration, self.status.app
        known_sick = a.get("healthy") is False and a.get("cause") != "sidecar-not-ready" \
            and self.cfg.status.ready_when_unhealthy
        maintenance = self.status.maintenance
        if r.get("registered") or known_sick or maintenance or (not self.cfg.registry.enabled and self.sidecar
                                                                and self.sidecar.ready):
            systemd.ready(self.status.summary)
            self.ready_sent = True
            log.info("ready")

    # --- reload ----------------------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: re-read the config and the bundle, and apply only what changed."""
        systemd.reloading()
        self.enter(Phase.RELOADING)
        self.reloads += 1
        started = time.monotonic()  # `mesh-agent reload` waits for a reload that began after its signal
        try:
            new = config.load(self.config_path)
        except config.ConfigError as exc:
            log.error("reload refused, keeping the running configuration:\n%s", exc)
            self.record_error("reload", str(exc.errors[0]))
            self.status.reload = reload_verb.record(self.reloads, started, str(exc))
        else:
            old, self.cfg = self.cfg, new
            logs.setup(new.logging.level, new.logging.target)
            if new.registry != old.registry and self.registrar is not None and self.bundle is not None:
                log.info("registry settings changed: re-applying the entry")
                self.restart_registrar(self.bundle)
            if new.app != old.app:
                self.monitor_inputs = None  # the flap settings or probe host may have changed too
                self.reconfigure_monitor()
            if new.identity != old.identity:
                log.warning("identity settings changed: they take effect at the next restart of mesh-agent")
            if new.sidecar != old.sidecar:
                log.warning("sidecar settings changed: they take effect at the next restart of mesh-agent")
            if new.bundle != old.bundle and self.fetcher is not None:
                self.fetcher.stop()
                self.fetcher = self.make_fetcher()
                self.fetcher.start()
            log.info("configuration reloaded")
            self.status.reload = reload_verb.record(self.reloads, started, None)
        if isinstance(self.fetcher, bundle_update.Refresher):
            self.fetcher.refresh_now()
        elif self.fetcher is not None:
            self.fetcher.refresh_now("reload")
        self.enter(Phase.RUNNING)
        systemd.ready(self.status.summary)

    def restart_registrar(self, bundle: bundle_model.Bundle) -> None:
        """New registry settings: a new registrar takes over; the old one does not withdraw."""
        if self.registry is not None:
            self.registry.stop()
        self.registry = self.registrar = None
        self.start_registrar(bundle)

    # --- reporting -------------------------------------------------------------------------------

    def enter(self, phase: Phase) -> None:
        self.phase.to(phase)
        self.status.phase = phase.value
        self.metrics.set_phase(phase.value)
        log.info("phase: %s", phase.value)

    def publish(self) -> None:
        s = self.status
        self.health_snapshot()
        s.summary = summarize(self.phase.phase, s.sidecar, s.app, s.registration, s.maintenance)
        self.status_writer.write(s)
        if s.summary != self.last_summary:
            self.last_summary = s.summary
            systemd.status(s.summary)
            log.info("status: %s", s.summary)

    def record_error(self, where: str, message: str) -> None:
        self.status.errors.append({"at": time.time(), "where": where, "message": message})
        del self.status.errors[:-self.cfg.status.recent_errors or None]
        self.metrics.inc("errors", where)

    def ping_watchdog(self) -> None:
        now = time.monotonic()
        if self.watchdog_every and now - self.last_watchdog >= self.watchdog_every:
            systemd.watchdog_ping()
            self.last_watchdog = now

    def serve_metrics(self) -> None:
        try:
            self.metrics.serve(self.cfg.metrics.address, self.cfg.metrics.port)
        except OSError as exc:
            log.warning("metrics off: cannot listen on %s:%d: %s", self.cfg.metrics.address,
                        self.cfg.metrics.port, exc.strerror)


def _as_mapping(pkg: Any) -> dict[str, object]:
    return {"url": pkg.url, "version": pkg.version, "sha256": pkg.sha256}
