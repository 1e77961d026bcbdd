"""The shape every part of the running agent has, and what the parts tell each other.

The daemon holds a list of parts (identity, bundle, maintenance, sidecar, and a health and a registry
part for each app) and drives them all the same way, from the loop's one thread:

    part.start(now)               bring up what the part can before the first bundle
    part.handle(event, now)       every event goes to every part; True when it was the part's own
    part.tick(now) -> deadline    timers; the loop sleeps until the earliest deadline
    part.reconfigure(old, new)    SIGHUP with a valid agent.yaml: apply this part's section
    part.stop()                   end the part's threads (the draining stop is the daemon's, in order)
    part.status() -> snapshot     typed; status.json is assembled from the parts' snapshots

Parts never call each other. What one part learns that another needs travels as an event on the loop's
queue (the events below), so every hand-over is visible in one place and in the journal at debug level.
Threads (fetches, probes, the API worker, file watches, the proxy's waiter, package installs) only post.
"""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from agent import config
from agent.metrics import Metrics
from agent.paths import Layout

if TYPE_CHECKING:
    from agent.bundle.model import Bundle
    from agent.kube.client import Kube

log = logging.getLogger("agent.part")


class FatalError(Exception):
    """Something the agent cannot fix by itself: exit non-zero (1: systemd restarts it; 78: a
    configuration problem, which a restart cannot fix)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Snapshot(Protocol):
    def as_dict(self) -> dict[str, Any]: ...


class Part(Protocol):
    name: str

    def start(self, now: float) -> None: ...

    def handle(self, event: object, now: float) -> bool: ...

    def tick(self, now: float) -> float | None: ...

    def reconfigure(self, old: config.Config, new: config.Config) -> None: ...

    def stop(self) -> None: ...

    def status(self) -> Snapshot: ...


# --- what the parts tell each other ---------------------------------------------------------------


@dataclass(frozen=True)
class Wake:
    """Put on the queue by a signal handler so the loop looks at the flags now."""


@dataclass(frozen=True)
class BundleInUse:
    """A bundle is installed and in use: restored at start, or newly installed. The first one brings up
    the sidecar, the app monitor and the registry."""

    bundle: Bundle
    changed: frozenset[str] = frozenset()  # files that differ from the bundle before; empty when restored
    first: bool = False


@dataclass(frozen=True)
class BundleWaiting:
    """A valid first bundle waits for the sidecar package, whose install creates the user owning its files."""

    bundle: Bundle


@dataclass(frozen=True)
class PackageReady:
    """The sidecar package is as the config or bundle asks (or none is asked for): bundles may install."""


@dataclass(frozen=True)
class SidecarReadiness:
    ready: bool


@dataclass(frozen=True)
class MaintenanceChanged:
    on: bool
    app: str | None = None  # None: the whole VM


@dataclass(frozen=True)
class ForApp:
    """An event of one app's own threads (its monitor, its API worker and group watch), tagged with the
    app's name so that only that app's parts take it (agent.apps: a VM may run several)."""

    app: str
    event: object


# --- what the parts share ------------------------------------------------------------------------


@dataclass
class Context:
    """What every part may use: the config, the paths, the queue, the record of errors and metrics, and
    the two facts several parts need once decided (this VM's address; the API client)."""

    cfg: config.Config
    layout: Layout
    events: queue.SimpleQueue[object]
    metrics: Metrics
    errors: list[dict[str, Any]] = field(default_factory=list)
    stopping: bool = False
    address: str | None = None  # decided and followed by the address part (agent.registry.address_part)
    instance_key: str | None = None  # the cloud instance, from the identity part's token
    _kube: Kube | None = None

    def post(self, event: object) -> None:
        self.events.put(event)

    def record_error(self, where: str, message: str) -> None:
        self.errors.append({"at": time.time(), "where": where, "message": message})
        del self.errors[:-self.cfg.status.recent_errors or None]
        self.metrics.inc("errors", where)

    @property
    def file_owner(self) -> str | None:
        """Who owns the installed bundle files: the proxy's user (istio), or nobody special (envoy)."""
        return self.cfg.sidecar.user if self.cfg.sidecar.profile == "istio" else None

    def shipped_kubeconfig(self) -> str | None:
        from agent.bundle import store

        shipped = store.last_good_file(self.layout, "kubeconfig")
        return str(shipped) if shipped.exists() else None

    def identity_token(self) -> str | None:
        """The file the identity part keeps the cloud's token in, when an identity provider is set."""
        from agent.identity.refresh import token_file

        return token_file(self.cfg)

    def api(self) -> Kube:
        """The API client of the parts that read the cluster (the `kubernetes` bundle source)."""
        if self._kube is None:
            from agent.kube.client import Kube
            from agent.registry import service

            try:
                creds = service.credentials(self.cfg.registry, self.shipped_kubeconfig(), self.identity_token())
                self._kube = Kube.from_credentials(creds, timeout=self.cfg.registry.timeout,
                                                   deadline=self.cfg.registry.request_deadline)
            except service.PlanError as exc:
                raise FatalError(str(exc), config.EX_CONFIG) from exc
            except (ValueError, OSError) as exc:
                raise FatalError(f"Kubernetes credentials: {exc}") from exc
        return self._kube
