"""The sidecar part: the istio-sidecar package (once per start, in a worker), then the supervised proxy.

The package install (a download with retries, dpkg with a long timeout) and a proxy restart (drain,
stop grace, kill wait) run off the loop, which keeps feeding systemd's watchdog meanwhile; while the
package installs before READY=1, the start timeout is extended so a slow mirror is not a failed start.
"""

from __future__ import annotations

import enum
import logging
import socket

from agent import config, systemd
from agent.bundle.model import Bundle
from agent.part import BundleInUse, BundleWaiting, Context, FatalError, PackageReady, SidecarReadiness
from agent.registry.address_part import AddressChanged
from agent.sidecar import package as sidecar_package
from agent.sidecar.machine import SidecarStateChanged, State
from agent.sidecar.profiles import NoAddress, ProfileError, describe, read_spec
from agent.sidecar.supervisor import SidecarSnapshot, Supervisor

log = logging.getLogger("agent.sidecar")

EXTEND_EVERY = 30.0  # while the package installs: ask systemd for more start time this often
EXTEND_BY = 90.0



class Package(enum.Enum):
    """The istio-sidecar package, as far as this run knows: checked once, at the first bundle."""

    UNCHECKED = "unchecked"
    INSTALLING = "installing"  # a PackageJob thread runs
    READY = "ready"  # installed as asked, or nothing asked


# cluster.env and mesh.yaml are read by pilot-agent only when it starts.
RESTART_ON = frozenset({"cluster.env", "mesh.yaml"})


class SidecarPart:
    name = "sidecar"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.supervisor: Supervisor | None = None
        self.bundle: Bundle | None = None
        self.package = Package.UNCHECKED
        self.package_job: sidecar_package.PackageJob | None = None
        self.extend_at: float | None = None
        self.last_ready = False
        self.last_restarts = 0

    def start(self, now: float) -> None:
        pass  # the first bundle brings the sidecar up

    def stop(self) -> None:
        # The proxy is stopped by drain() in the daemon's stop, or left running for the next agent;
        # a package install under way is left to finish (dpkg must not be cut short).
        if self.package_job is not None:
            self.package_job.join(timeout=1.0)

    def drain(self, drain: bool) -> None:
        """The draining stop (blocking; the daemon has extended systemd's stop timeout)."""
        if self.supervisor is not None:
            self.supervisor.stop(drain=drain)
            self.changed()

    def reconfigure(self, old: config.Config, new: config.Config) -> None:
        if new.sidecar != old.sidecar:
            log.warning("sidecar settings changed: they take effect at the next restart of mesh-agent")

    @property
    def ready(self) -> bool:
        return self.supervisor is not None and self.supervisor.ready

    def status(self) -> SidecarSnapshot:
        sup = self.supervisor
        if sup is None:
            state = "installing-package" if self.package is Package.INSTALLING else "stopped"
            return SidecarSnapshot(state=state)
        return sup.snapshot()

    # --- events and timers ---

    def handle(self, event: object, now: float) -> bool:
        if isinstance(event, AddressChanged):
            self.address_changed(event.new)
            return False
        if isinstance(event, BundleWaiting | BundleInUse):
            self.bundle_seen(event, now)
            return False  # other parts' news too
        if isinstance(event, sidecar_package.PackageInstalled | sidecar_package.PackageFailed):
            self.package_done(event, now)
            return True
        if self.supervisor is not None and self.supervisor.handle(event):
            self.changed()
            return True
        return isinstance(event, SidecarStateChanged)  # read from the supervisor itself

    def tick(self, now: float) -> float | None:
        if self.package is Package.INSTALLING and self.extend_at is not None:
            if now >= self.extend_at:
                systemd.extend_timeout(EXTEND_BY)
                self.extend_at = now + EXTEND_EVERY
            return self.extend_at
        if self.supervisor is None:
            return None
        deadline = self.supervisor.tick(now)
        self.changed()
        return deadline

    def bundle_seen(self, event: BundleWaiting | BundleInUse, now: float) -> None:
        if self.package is Package.UNCHECKED:
            self.install_package(event.bundle, now)
        if isinstance(event, BundleInUse):
            self.bundle = event.bundle
            if self.supervisor is None:
                if self.package is Package.READY:
                    self.start_proxy(event.bundle)
            elif event.changed & RESTART_ON and self.ctx.cfg.sidecar.profile == "istio" and not event.first:
                log.info("cluster.env or mesh.yaml changed: restarting the proxy to use them")
                self.supervisor.restart(drain=True)  # in a worker: the loop goes on meanwhile
                self.changed()

    # --- the package ---

    def install_package(self, bundle: Bundle, now: float) -> None:
        """Install the istio-sidecar package named by the config or the bundle, in a worker."""
        pkg = bundle.sidecar
        source = sidecar_package.choose_source(
            self.ctx.cfg.sidecar.package,
            {"url": pkg.url, "version": pkg.version, "sha256": pkg.sha256} if pkg else None)
        if source is None:
            self.package = Package.READY
            self.ctx.post(PackageReady())
            return
        self.package = Package.INSTALLING
        self.extend_at = now
        self.package_job = sidecar_package.PackageJob(sidecar_package.Installer(self.ctx.layout), source,
                                                      self.ctx.post)
        self.package_job.start()

    def package_done(self, event: sidecar_package.PackageInstalled | sidecar_package.PackageFailed,
                     now: float) -> None:
        self.extend_at = None
        if isinstance(event, sidecar_package.PackageFailed):
            raise FatalError(f"sidecar package: {event.error}")
        self.package = Package.READY
        self.ctx.post(PackageReady())
        if self.bundle is not None and self.supervisor is None:
            self.start_proxy(self.bundle)

    # --- the proxy ---

    def start_proxy(self, bundle: Bundle) -> None:
        try:
            spec = read_spec(self.ctx.cfg.sidecar, self.ctx.layout, cluster_env=bundle.env_map,
                             hostname=socket.gethostname().split(".")[0], address=self.ctx.address)
        except NoAddress as exc:
            if self.ctx.address is None:  # the address part looks for one; its AddressChanged starts us
                log.info("sidecar: waiting for this VM's address: %s", exc)
                return
            raise FatalError(f"sidecar: {exc}") from exc
        except ProfileError as exc:
            raise FatalError(f"sidecar: {exc}") from exc
        log.info("sidecar: %s", describe(spec))
        self.supervisor = Supervisor(spec, self.ctx.layout, self.ctx.post)
        self.supervisor.start()
        self.changed()

    def address_changed(self, address: str) -> None:
        """The istio profile gives the proxy the address as INSTANCE_IP (unless cluster.env fixes it as
        ISTIO_SVC_IP): istiod knows the proxy by it, so the proxy restarts with the new one. A spec the
        address does not enter (envoy) leaves the proxy be."""
        if self.supervisor is None and self.bundle is not None and self.package is Package.READY:
            self.start_proxy(self.bundle)  # it was waiting for an address
            return
        if self.supervisor is None or self.bundle is None:
            return
        try:
            spec = read_spec(self.ctx.cfg.sidecar, self.ctx.layout, cluster_env=self.bundle.env_map,
                             hostname=socket.gethostname().split(".")[0], address=address)
        except ProfileError as exc:
            self.ctx.record_error("sidecar", f"address {address}: {exc}")
            return
        if spec.env.get("INSTANCE_IP") == self.supervisor.spec.env.get("INSTANCE_IP"):
            return
        log.info("the address changed to %s: restarting the proxy with it", address)
        self.supervisor.restart(drain=True, spec=spec)  # in a worker: the loop goes on meanwhile
        self.changed()

    def changed(self) -> None:
        sup = self.supervisor
        if sup is None:
            return
        if sup.restarts > self.last_restarts:
            self.ctx.metrics.inc("sidecar_restarts", amount=sup.restarts - self.last_restarts)
            self.last_restarts = sup.restarts
        self.ctx.metrics.set("sidecar_ready", 1 if sup.ready else 0)
        if sup.ready != self.last_ready:
            self.last_ready = sup.ready
            self.ctx.post(SidecarReadiness(sup.ready))
        if sup.state is State.FATAL and not self.ctx.stopping:
            raise FatalError(f"sidecar failed: {sup.reason}")

