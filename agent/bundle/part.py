"""The bundle part: restore the last good bundle, fetch from the configured source, validate, install,
and keep the installed files as installed (the tamper watch).

Installing happens here, on the loop's thread (never in the fetch thread), so the tamper watch never
sees half an install. A bad bundle is refused before anything live is touched: the last good one keeps
running. Bundles install only once the sidecar part says the package is ready (`PackageReady`), because
the package creates the user that owns the files; until then the newest valid bundle waits.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent import config
from agent.bundle import accept
from agent.bundle import install as bundle_install
from agent.bundle import model as bundle_model
from agent.bundle import store as bundle_store
from agent.bundle import update as bundle_update
from agent.bundle import watch as bundle_watch
from agent.part import BundleInUse, BundleWaiting, Context, FatalError, PackageReady

if TYPE_CHECKING:
    from agent.bundle.cluster_source import ClusterRefresher

log = logging.getLogger("agent.bundle")

CLUSTER_SOURCE = "agent.bundle.cluster_source"  # the module of the cluster source's events


@dataclass(frozen=True)
class _Pending:
    candidate: accept.Candidate
    validators: bundle_update.Validators | None


@dataclass(frozen=True)
class BundleSnapshot:
    installed: dict[str, Any] = field(default_factory=dict)  # InstalledBundle.status()
    warnings: tuple[str, ...] = ()
    source: dict[str, Any] = field(default_factory=dict)  # the cluster source's own status
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.installed)
        if self.installed:
            d["warnings"] = list(self.warnings)
        d.update({k: v for k, v in self.source.items() if v is not None})
        if self.error:
            d["error"] = self.error
        return d


class BundlePart:
    name = "bundle"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.bundle: bundle_model.Bundle | None = None
        self.installed: bundle_store.InstalledBundle | None = None
        self.fetcher: bundle_update.Refresher | ClusterRefresher | None = None
        self.tamper_watch: bundle_watch.InstalledFilesWatcher | None = None
        self.package_ready = False
        self.pending: _Pending | None = None
        self.last_fetch_attempt: float | None = None
        self.error: str | None = None

    # --- lifecycle ---

    def start(self, now: float) -> None:
        """Restore the last good bundle (the VM stays in the mesh across restarts), then fetch."""
        try:
            restored = bundle_install.restore_last_good(self.ctx.layout, user=self.ctx.file_owner)
        except bundle_install.InstallError as exc:
            self.refused(f"cannot restore the last good bundle: {exc}")
            restored = None
        if restored is not None:
            log.info("last good bundle %s from %s", restored.version, restored.source)
            loaded = bundle_store.load_last_good(self.ctx.layout)
            assert loaded is not None
            self.installed, files = loaded
            # Validated as of when it was fetched: its token may have expired since; the proxy renews its
            # certificate with the one it holds.
            self.use(bundle_model.parse_bundle(files, self.installed.fetched_at, self.ctx.cfg.bundle), frozenset())
        self.fetcher = self.make_fetcher()
        self.fetcher.start()
        if self.ctx.cfg.bundle.restore_tampered:
            self.tamper_watch = bundle_watch.InstalledFilesWatcher(self.ctx.layout, self.ctx.post)
            self.tamper_watch.start()

    def stop(self) -> None:
        for thread in (self.fetcher, self.tamper_watch):
            if thread is not None:
                thread.stop()

    def reconfigure(self, old: config.Config, new: config.Config) -> None:
        if new.bundle != old.bundle and self.fetcher is not None:
            self.fetcher.stop()
            self.fetcher = self.make_fetcher()
            self.fetcher.start()
        self.refresh_now()

    def refresh_now(self) -> None:
        if isinstance(self.fetcher, bundle_update.Refresher):
            self.fetcher.refresh_now()
        elif self.fetcher is not None:
            self.fetcher.refresh_now("reload")

    def tick(self, now: float) -> float | None:
        return None  # the fetch threads keep their own time

    def status(self) -> BundleSnapshot:
        f = self.fetcher
        source = f.status() if f is not None and not isinstance(f, bundle_update.Refresher) else {}
        return BundleSnapshot(installed=self.installed.status() if self.installed else {},
                              warnings=tuple(self.bundle.warnings) if self.bundle else (),
                              source=source, error=self.error)

    # --- events ---

    def handle(self, event: object, now: float) -> bool:
        if type(event).__module__ == CLUSTER_SOURCE:
            return self.cluster_event(event)
        if isinstance(event, bundle_update.BundleFetched):
            self.last_fetch_attempt = time.time()
            self.accept(event.files, event.source, event.validators)
        elif isinstance(event, bundle_update.BundleNotModified):
            self.last_fetch_attempt = time.time()
            self.schedule_refresh()
        elif isinstance(event, bundle_update.BundleFetchFailed):
            self.last_fetch_attempt = time.time()
            self.refused(f"fetch failed (retry in {event.retry_in:.0f}s): {event.error}")
        elif isinstance(event, bundle_watch.BundleFilesChanged):
            self.restore_tampered()
        elif isinstance(event, PackageReady):
            self.package_ready = True
            pending, self.pending = self.pending, None
            if pending is not None:
                self.commit(pending)
            return False  # the sidecar part's news too
        else:
            return False
        return True

    def cluster_event(self, event: object) -> bool:
        # Imported here: only `bundle.source: kubernetes` loads the cluster source (and so makes its events).
        from agent.bundle import cluster_source

        if isinstance(event, cluster_source.ClusterBundleFetched):
            self.last_fetch_attempt = time.time()
            cluster_source.observe(self.ctx.metrics, event)
            self.accept(dict(event.files), cluster_source.SOURCE_NAME, None)
            return True
        if isinstance(event, cluster_source.ClusterFetchFailed):
            cluster_source.observe(self.ctx.metrics, event)
            self.refused(f"building the bundle from the cluster failed (retry in {event.retry_in:.0f}s): "
                         f"{event.error}")
            return True
        return False

    # --- accepting a bundle ---

    def accept(self, files: dict[str, bytes], source: str, validators: bundle_update.Validators | None) -> None:
        """Validate a fetched bundle (agent.bundle.accept, as every source); install it now, or once the
        sidecar package is ready."""
        try:
            prepared = accept.prepare(files, source=source, cfg=self.ctx.cfg.bundle, now=time.time(),
                                      layout=self.ctx.layout, installed=self.installed)
        except bundle_model.BundleError as exc:
            self.refused(f"bundle from {source} refused, keeping the last good one: {exc}")
            self.schedule_refresh()
            return
        if isinstance(prepared, accept.Unchanged):
            self.schedule_refresh()
            return
        pending = _Pending(prepared, validators)
        if self.package_ready:
            self.commit(pending)
            return
        if self.pending is None:
            self.ctx.post(BundleWaiting(prepared.bundle))
        self.pending = pending  # the newest valid bundle waits for the package

    def commit(self, p: _Pending) -> None:
        c = p.candidate
        try:
            result = accept.commit(c, self.ctx.layout, user=self.ctx.file_owner, validators=p.validators)
        except bundle_install.MissingUser as exc:
            if self.bundle is None:  # nothing will create the user while we wait: say so and stop
                raise FatalError(f"bundle from {c.source} cannot be installed: {exc}; or name the package in "
                                 "sidecar.package", config.EX_CONFIG) from exc
            self.refused(f"bundle from {c.source} refused, keeping the last good one: {exc}")
            self.schedule_refresh()
            return
        except bundle_install.InstallError as exc:
            self.refused(f"bundle from {c.source} refused, keeping the last good one: {exc}")
            self.schedule_refresh()
            return
        self.installed = result.installed
        self.error = None
        self.ctx.metrics.set("bundle_fetched", c.fetched_at)
        if self.tamper_watch is not None:
            self.tamper_watch.rewatch()  # the first install creates the directories it watches
        self.use(c.bundle, frozenset(result.changed))
        self.schedule_refresh()

    def use(self, bundle: bundle_model.Bundle, changed: frozenset[str]) -> None:
        first = self.bundle is None
        self.bundle = bundle
        if self.installed is not None:
            if self.installed.token_expiry:
                self.ctx.metrics.set("expiry", self.installed.token_expiry, "token")
            if self.installed.cert_expiry:
                self.ctx.metrics.set("expiry", self.installed.cert_expiry, "root_cert")
        self.ctx.post(BundleInUse(bundle, changed, first))

    def restore_tampered(self) -> None:
        try:
            restored = bundle_watch.restore_tampered(self.ctx.layout, user=self.ctx.file_owner)
        except bundle_install.InstallError as exc:
            self.refused(f"cannot restore the installed bundle: {exc}")
            restored = []
        if restored:
            self.ctx.record_error("bundle", f"restored {', '.join(restored)}: edited outside the agent")
        if self.tamper_watch is not None:
            self.tamper_watch.rewatch()

    def refused(self, message: str) -> None:
        log.error("%s", message)
        self.error = message
        self.ctx.record_error("bundle", message)

    # --- fetching ---

    def make_fetcher(self) -> bundle_update.Refresher | ClusterRefresher:
        cfg = self.ctx.cfg
        if cfg.bundle.source.strip() == "kubernetes":
            from agent.bundle import cluster_source

            settings = cluster_source.settings_from_config(cfg.bundle, svc_ip=cfg.registry.address.value)
            return cluster_source.ClusterRefresher(cluster_source.ClusterSource(self.ctx.api(), settings),
                                                   self.ctx.post, refresh_fraction=cfg.bundle.refresh_fraction)

        def validators() -> bundle_update.Validators | None:
            i = self.installed
            return bundle_update.Validators(i.etag, i.last_modified) if i else None

        return bundle_update.Refresher(cfg.bundle, self.ctx.post, validators)

    def schedule_refresh(self) -> None:
        i = self.installed
        if i is None or not isinstance(self.fetcher, bundle_update.Refresher):
            return  # the cluster source schedules itself
        delay = bundle_watch.refresh_delay(i.token_expiry, i.token_issued_at, i.fetched_at, self.ctx.cfg.bundle,
                                           time.time(), self.last_fetch_attempt)
        self.fetcher.schedule(delay)
