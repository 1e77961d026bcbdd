"""Ensure the istio-sidecar .deb: the wanted version installed, verified before use, istio.service off.

The package is named by agent.yaml (sidecar.package) or by the bundle's sidecar.yaml (url or path,
version, sha256); the configuration wins. `ensure()` is idempotent:

1. `dpkg-query` tells the installed version; equal (by `dpkg --compare-versions`) -> nothing to do;
2. otherwise the .deb is fetched (https://, http://, file:// or a path) into the agent's state
   directory, and its sha256 checked before anything else looks at it; its control fields must name
   the wanted package and version;
3. `apt-get install -y ./x.deb` installs it, so its dependencies resolve. Under systemd it runs in a
   transient unit (`systemd-run --wait --collect --quiet`), so the package's scripts run outside the
   agent's sandbox and are not killed if the agent restarts;
4. `istio.service` is disabled and stopped whatever happened above: the agent runs the sidecar, and
   two proxies would fight over the same ports.

`ensure()` blocks (a download with retries, an install of up to 15 minutes). PackageJob runs it in a
worker thread that posts PackageInstalled or PackageFailed, for a caller whose loop must keep running.

With a root prefix other than `/` (tests, image building) everything happens inside that root:
`dpkg --root=DIR -i` (no dependency resolution), `dpkg-query --admindir`, `systemctl --root=DIR disable`.
Every command goes through agent.proc.run; `command_prefix` replaces the systemd-run prefix.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from agent import download, proc
from agent.config import PackageConfig
from agent.paths import Layout
from agent.retry import Backoff, RetryableError, call_with_retries

log = logging.getLogger(__name__)

PACKAGE_NAME = "istio-sidecar"
ISTIO_UNIT = "istio.service"
MAX_SIZE = 1024 * 1024 * 1024     # a sidecar package with Envoy is ~50-150 MB
FETCH_DEADLINE = 1800.0           # the whole download, retries included: 150 MB at 100 kB/s
CHUNK = 1024 * 1024
SYSTEMD_RUN = ("systemd-run", "--wait", "--collect", "--quiet", "--unit=mesh-agent-sidecar-install",
               "--setenv=DEBIAN_FRONTEND=noninteractive", "--")


class PackageError(Exception):
    """The package cannot be ensured; the message says what to fix. Nothing was installed."""


class DeadlineExpired(Exception):
    """The download did not finish within Installer.fetch_deadline."""


@dataclass(frozen=True)
class PackageSource:
    url: str       # https://, http://, file:// URL or a local path
    version: str   # dpkg's version format
    sha256: str    # lower-case hex
    name: str = PACKAGE_NAME

    @classmethod
    def from_config(cls, cfg: PackageConfig) -> PackageSource | None:
        if not cfg.url:
            return None
        assert cfg.version and cfg.sha256   # the schema's checks require them with url
        return cls(cfg.url, cfg.version, cfg.sha256.lower())

    @classmethod
    def from_mapping(cls, data: Mapping[str, object], where: str = "sidecar.yaml") -> PackageSource:
        """The bundle's sidecar.yaml: `url` (or `path`), `version`, `sha256`, optional `name`."""
        def text(key: str) -> str | None:
            value = data.get(key)
            if value is not None and not isinstance(value, str):
                raise PackageError(f"{where}: {key} must be a string")
            return value

        url = text("url") or text("path")
        version, sha256, name = text("version"), text("sha256"), text("name") or PACKAGE_NAME
        missing = [k for k, v in (("url or path", url), ("version", version), ("sha256", sha256)) if not v]
        if missing:
            raise PackageError(f"{where}: missing {', '.join(missing)}")
        assert url and version and sha256
        sha = sha256.lower()
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise PackageError(f"{where}: sha256 must be 64 hex digits")
        return cls(url, version, sha, name)


def choose_source(cfg: PackageConfig, bundle_sidecar: Mapping[str, object] | None) -> PackageSource | None:
    """agent.yaml's sidecar.package wins over the bundle's sidecar.yaml; None: nothing to install."""
    return PackageSource.from_config(cfg) or (
        PackageSource.from_mapping(bundle_sidecar) if bundle_sidecar else None)


@dataclass(frozen=True)
class Outcome:
    action: Literal["unchanged", "installed"]
    version: str
    previous: str | None


def install_command(deb: Path, root: Path, prefix: Sequence[str]) -> list[str]:
    """The install command: apt-get on the machine itself, dpkg inside another root."""
    if root == Path("/"):
        # Wait for dpkg's lock instead of failing while e.g. unattended-upgrades runs at first boot.
        return [*prefix, "apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "--allow-downgrades",
                "--no-install-recommends", str(deb.resolve())]
    return [*prefix, "dpkg", f"--root={root}", "--force-confnew", "-i", str(deb)]


def parse_dpkg_status(stdout: str) -> str | None:
    """`dpkg-query -W -f '${db:Status-Status} ${Version}'` -> the version if installed."""
    status, _, version = stdout.strip().partition(" ")
    if status != "installed":
        return None
    return version.strip() or None


class Installer:
    """Ensures one sidecar package; see the module docstring. Blocking (PackageJob: in a worker thread)."""

    def __init__(self, layout: Layout, *, command_prefix: Sequence[str] | None = None,
                 under_systemd: bool | None = None, timeout: float = 900.0,
                 fetch_timeout: tuple[float, float] = (10.0, 60.0), verify: str | bool = True,
                 fetch_deadline: float = FETCH_DEADLINE) -> None:
        self.layout = layout
        self.root = layout.root
        if under_systemd is None:
            under_systemd = bool(os.environ.get("INVOCATION_ID") or os.environ.get("NOTIFY_SOCKET"))
        if command_prefix is None:
            command_prefix = SYSTEMD_RUN if under_systemd and self.root == Path("/") else ()
        self.prefix = tuple(command_prefix)
        self.timeout = timeout
        self.fetch_timeout = fetch_timeout
        self.fetch_deadline = fetch_deadline
        self.verify = verify

    @property
    def cache_dir(self) -> Path:
        return self.layout.state / "sidecar"

    def ensure(self, source: PackageSource) -> Outcome:
        current = self.installed_version(source.name)
        if current is not None and self._same_version(current, source.version):
            log.info("sidecar package %s %s is installed", source.name, current)
            outcome = Outcome("unchanged", current, current)
        else:
            deb = self.fetch(source)
            self._check_control(deb, source)
            log.info("installing sidecar package %s %s (installed: %s)", source.name, source.version,
                     current or "none")
            result = proc.run(install_command(deb, self.root, self.prefix), timeout=self.timeout,
                              env=_apt_env())
            if not result.ok:
                raise PackageError(f"installing {deb.name} failed: {proc.CommandError(result)}")
            now = self.installed_version(source.name)
            if now is None or not self._same_version(now, source.version):
                raise PackageError(f"after installing {deb.name}, dpkg reports {source.name} "
                                   f"version {now or 'none'}, not {source.version}")
            outcome = Outcome("installed", now, current)
        self.disable_istio_service()
        return outcome

    def installed_version(self, name: str = PACKAGE_NAME) -> str | None:
        argv = ["dpkg-query", "-W", "-f", "${db:Status-Status} ${Version}", name]
        if self.root != Path("/"):
            argv.insert(1, f"--admindir={self.root / 'var/lib/dpkg'}")
        result = proc.run(argv, timeout=30.0)
        return parse_dpkg_status(result.stdout) if result.ok else None

    def fetch(self, source: PackageSource) -> Path:
        """The verified .deb in the cache (downloaded or copied only when not there already)."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        final = self.cache_dir / f"{source.name}_{_safe(source.version)}.deb"
        if final.exists() and _sha256(final) == source.sha256:
            return final
        tmp = final.with_name(final.name + ".part")
        for stale in self.cache_dir.glob(f"{source.name}_*.deb.part"):  # a download a crash cut short
            stale.unlink(missing_ok=True)
        deadline = download.Deadline(self.fetch_deadline)

        def once() -> str:
            if deadline.expired:
                raise DeadlineExpired
            try:
                return self._download(source.url, tmp, deadline)
            except (OSError, RetryableError):
                if deadline.expired:  # the deadline cut the connection
                    raise DeadlineExpired from None
                raise

        try:
            with deadline:
                digest = call_with_retries(
                    once, Backoff(1.0, 10.0), tries=3,
                    sleep=lambda s: time.sleep(min(s, deadline.remaining())),
                    on_retry=lambda n, exc, d: log.warning(
                        "fetching the sidecar package failed (%s); retrying in %.1fs", exc, d))
        except DeadlineExpired:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise PackageError(f"cannot fetch the sidecar package from {source.url}: not fetched within "
                               f"{self.fetch_deadline:g}s; the server is too slow or trickles its answer") from None
        except (OSError, RetryableError) as exc:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise PackageError(f"cannot fetch the sidecar package from {source.url}: {exc}") from None
        if digest != source.sha256:
            tmp.unlink()
            raise PackageError(f"the sidecar package from {source.url} has sha256 {digest}, expected "
                               f"{source.sha256}: refusing it")
        os.replace(tmp, final)
        for old in self.cache_dir.glob(f"{source.name}_*.deb"):
            if old != final:   # keep only the wanted package
                old.unlink(missing_ok=True)
        return final

    def _download(self, url: str, dest: Path, deadline: download.Deadline) -> str:
        parts = urlsplit(url)
        h = hashlib.sha256()
        with open(dest, "wb") as out:
            if parts.scheme in ("http", "https"):
                import requests

                try:
                    with download.session(deadline) as s, \
                            s.get(url, stream=True, timeout=self.fetch_timeout, verify=self.verify) as r:
                        if r.status_code >= 500 or r.status_code == 429:
                            raise RetryableError(f"HTTP {r.status_code}")
                        if r.status_code != 200:
                            raise OSError(f"HTTP {r.status_code}")
                        for chunk in download.body_chunks(r, MAX_SIZE, CHUNK):
                            h.update(chunk)
                            out.write(chunk)
                except download.DownloadTooLarge:
                    raise OSError(f"larger than {MAX_SIZE} bytes") from None
                except requests.RequestException as exc:
                    raise RetryableError(str(exc)) from None
            else:
                path = Path(unquote(parts.path)) if parts.scheme == "file" else Path(url)
                with open(path, "rb") as src:
                    while chunk := src.read(CHUNK):
                        h.update(chunk)
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        return h.hexdigest()

    def _check_control(self, deb: Path, source: PackageSource) -> None:
        result = proc.run(["dpkg-deb", "--show", "--showformat=${Package} ${Version}", str(deb)],
                          timeout=60.0)
        if not result.ok:
            raise PackageError(f"{deb.name} is not a Debian package: {proc.CommandError(result)}")
        name, _, version = result.stdout.strip().partition(" ")
        if name != source.name or not self._same_version(version, source.version):
            raise PackageError(f"{source.url} holds {name} {version}, not {source.name} {source.version}")

    def _same_version(self, a: str, b: str) -> bool:
        if a == b:
            return True
        return proc.run(["dpkg", "--compare-versions", a, "eq", b], timeout=10.0).ok

    def disable_istio_service(self) -> None:
        """istio.service must not run beside the agent's proxy: disable and stop it when present."""
        systemctl = ["systemctl"] if self.root == Path("/") else ["systemctl", f"--root={self.root}"]
        enabled = proc.run([*systemctl, "is-enabled", ISTIO_UNIT], timeout=30.0).stdout.strip()
        if enabled in ("enabled", "enabled-runtime", "linked", "linked-runtime", "alias"):
            result = proc.run([*systemctl, "disable", ISTIO_UNIT], timeout=60.0)
            if not result.ok:
                log.warning("could not disable %s: %s", ISTIO_UNIT, proc.CommandError(result))
        if self.root == Path("/"):
            active = proc.run(["systemctl", "is-active", ISTIO_UNIT], timeout=30.0).stdout.strip()
            if active in ("active", "activating", "reloading", "deactivating"):
                result = proc.run(["systemctl", "stop", ISTIO_UNIT], timeout=90.0)
                if not result.ok:
                    log.warning("could not stop %s: %s", ISTIO_UNIT, proc.CommandError(result))
        log.info("%s is disabled and stopped: mesh-agent runs the sidecar", ISTIO_UNIT)


@dataclass(frozen=True)
class PackageInstalled:
    """A PackageJob ended well: the package is installed (or was already) and istio.service is off."""
    source: PackageSource
    outcome: Outcome


@dataclass(frozen=True)
class PackageFailed:
    """A PackageJob ended badly; `error` says what to fix. Nothing was installed."""
    source: PackageSource
    error: str


class PackageJob:
    """Installer.ensure(source) in a worker thread, so the caller's loop keeps running meanwhile.

    The thread only posts: PackageInstalled or PackageFailed, exactly once. start() returns at once;
    a second start() does nothing."""

    def __init__(self, installer: Installer, source: PackageSource, post: Callable[[object], None]) -> None:
        self.installer = installer
        self.source = source
        self._post = post
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, daemon=True, name="sidecar-package")
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float | None = None) -> bool:
        """Wait up to timeout for the job (at shutdown); True when it no longer runs."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running

    def _run(self) -> None:
        try:
            outcome = self.installer.ensure(self.source)
        except PackageError as exc:
            self._post(PackageFailed(self.source, str(exc)))
        except Exception as exc:
            # Always answer: the caller waits for this job before it starts the proxy.
            log.exception("ensuring the sidecar package failed")
            self._post(PackageFailed(self.source, f"ensuring {self.source.name} {self.source.version} "
                                                  f"failed: {exc}"))
        else:
            self._post(PackageInstalled(self.source, outcome))


def _apt_env() -> dict[str, str]:
    return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C.UTF-8"}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _safe(version: str) -> str:
    return "".join(c if c.isalnum() or c in ".+~-" else "_" for c in version)
