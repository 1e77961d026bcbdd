"""Accepting a fetched bundle: the one path every source takes (a download, an archive, a directory, or
the files the `kubernetes` source builds), for the daemon and for `mesh-agent bundle install` alike.

It is two steps because the daemon installs the sidecar package, which creates the user owning the
live files, between them:

- `prepare` validates the files completely (agent.bundle.model) and decides whether there is anything
  to install: nothing when the bundle is the installed one and no live file drifted from it. It touches
  nothing live; a bundle it refuses raises BundleError listing every problem.
- `commit` installs a prepared bundle atomically (agent.bundle.install): either the live tree is the new
  bundle afterwards, or it is as it was and InstallError (MissingUser for a missing owner) says why.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from agent.bundle import install
from agent.bundle.install import InstallResult
from agent.bundle.model import Bundle, parse_bundle
from agent.bundle.source import Validators
from agent.bundle.store import InstalledBundle
from agent.config import BundleConfig
from agent.paths import Layout

log = logging.getLogger("agent.bundle")


@dataclass(frozen=True)
class Candidate:
    """A valid bundle that differs from the installed one (or repairs drifted live files)."""
    bundle: Bundle
    source: str
    fetched_at: float  # wall-clock time it was validated at, recorded with the install


@dataclass(frozen=True)
class Unchanged:
    """The source has the bundle that is installed, and the live files are as it installed them."""
    installed: InstalledBundle


def prepare(files: Mapping[str, bytes], *, source: str, cfg: BundleConfig, now: float, layout: Layout,
            installed: InstalledBundle | None) -> Candidate | Unchanged:
    """Validate files (name -> bytes) from source at wall-clock time now, against the installed bundle.
    Raises model.BundleError when the bundle is refused; writes nothing live."""
    bundle = parse_bundle(files, now, cfg)
    if installed is not None and installed.digest == bundle.digest and not install.drifted(layout):
        return Unchanged(installed)
    for w in bundle.warnings:
        log.warning("bundle %s: %s", bundle.version, w)
    return Candidate(bundle, source, now)


def commit(candidate: Candidate, layout: Layout, *, user: str | None,
           validators: Validators | None) -> InstallResult:
    """Install a prepared bundle, owned by user (None: not managed). validators (the source's ETag and
    Last-Modified) are kept to ask for the next one conditionally. Raises install.InstallError (or its
    MissingUser); the live files are then as they were."""
    return install.install(candidate.bundle, layout, source=candidate.source, fetched_at=candidate.fetched_at,
                           user=user, etag=validators.etag if validators else None,
                           last_modified=validators.last_modified if validators else None)
