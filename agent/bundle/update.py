"""Fetch, validate and install in one call: what the daemon does at start, when a refresh is due and
on reload, and what `mesh-agent bundle install` does."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from agent.bundle.install import InstalledBundle, InstallResult, install, last_good
from agent.bundle.model import Bundle, parse_bundle
from agent.bundle.source import Fetched, FetchError, NotModified, Validators, fetch
from agent.config import BundleConfig
from agent.paths import Layout

log = logging.getLogger("agent.bundle")


@dataclass(frozen=True)
class Updated:
    bundle: Bundle
    result: InstallResult

    @property
    def installed(self) -> InstalledBundle:
        return self.result.installed


@dataclass(frozen=True)
class Unchanged:
    """The source has the bundle that is installed (HTTP 304, or the same digest)."""
    installed: InstalledBundle


def update(cfg: BundleConfig, layout: Layout, *, user: str | None = "istio-proxy",
           now: float | None = None) -> Updated | Unchanged:
    """Fetch cfg.source, validate it completely, install it. Raises source.FetchError,
    model.BundleError or install.InstallError; on any of them the live files are unchanged."""
    current = last_good(layout)
    previous = Validators(current.etag, current.last_modified) if current else None
    fetched = fetch(cfg, previous)
    if isinstance(fetched, NotModified):
        if current is None:  # we sent no validators: a server answering 304 anyway is broken
            raise FetchError(f"{fetched.source}: HTTP 304 Not Modified, but no bundle is installed yet")
        return Unchanged(current)
    assert isinstance(fetched, Fetched)
    wall = time.time() if now is None else now
    bundle = parse_bundle(fetched.files, wall, cfg)
    for w in bundle.warnings:
        log.warning("bundle %s: %s", bundle.version, w)
    if current is not None and current.digest == bundle.digest and not _needs_restore(layout):
        return Unchanged(current)
    result = install(bundle, layout, source=fetched.source, fetched_at=wall, user=user,
                     etag=fetched.validators.etag, last_modified=fetched.validators.last_modified)
    return Updated(bundle, result)


def _needs_restore(layout: Layout) -> bool:
    from agent.bundle.install import drifted

    return bool(drifted(layout))
