"""Debian root file systems for the booted-systemd tests, made with debootstrap and cached.

A root file system is built once per machine and kept under the cache directory, keyed by suite,
mirror and package list, so changing any of them builds a fresh one. Tests never write to the cached
tree: each boot puts a throw-away overlay on top of it (see machine.py).

Build ahead of time (e.g. in a CI image):  python3 -m tests.system.rootfs bookworm trixie
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(os.environ.get("MESH_AGENT_TEST_CACHE", "/var/cache/mesh-agent-tests"))
MIRROR = os.environ.get("MESH_AGENT_TEST_MIRROR", "http://deb.debian.org/debian")
# Debian's minimal debootstrap (minbase: essential packages and apt; a minimal cloud image has at least
# that), plus only what the harness needs to boot the tree: systemd, as PID 1. Nothing else: what the
# package needs comes from its Depends when the test installs it, so a missing dependency fails a test.
# Not added, on purpose: systemd-sysv (boot.sh execs systemd itself), dbus (root's systemctl,
# systemd-run and journalctl speak to systemd over its private socket), procps, iproute2.
PACKAGES = ("systemd",)
SUITES = ("bookworm", "trixie")
BUILD_TIMEOUT = 1200.0


def cache_key(suite: str, mirror: str = MIRROR, packages: tuple[str, ...] = PACKAGES) -> str:
    text = "\n".join([suite, mirror, "minbase", *sorted(packages)])
    return f"{suite}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def apt_archive(suite: str) -> Path:
    """Downloaded .debs, kept between runs and bind-mounted into each boot to save downloads."""
    path = CACHE / "apt-archives" / suite
    (path / "partial").mkdir(parents=True, exist_ok=True)
    return path


def keep_downloads(suite: str, directory: Path) -> None:
    """Add the .debs a machine downloaded to the shared cache (each file appears whole or not)."""
    shared = apt_archive(suite)
    for deb in directory.glob("*.deb"):
        target = shared / deb.name
        if target.exists() or not deb.is_file():
            continue
        tmp = shared / f".{deb.name}.{os.getpid()}"
        shutil.copyfile(deb, tmp)
        os.replace(tmp, target)


def ensure(suite: str, log: object = sys.stderr) -> Path:
    """The cached root file system of `suite`, built first if missing. Needs root and debootstrap."""
    CACHE.mkdir(parents=True, exist_ok=True)
    final = CACHE / "rootfs" / cache_key(suite)
    if (final / ".complete").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{suite}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be building the same tree
        if (final / ".complete").exists():
            return final
        work = final.with_name(final.name + ".partial")
        shutil.rmtree(work, ignore_errors=True)
        started = time.monotonic()
        print(f"rootfs: debootstrap {suite} into {final} (once per machine)", file=log, flush=True)
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                        f"--cache-dir={apt_archive(suite)}", suite, str(work), MIRROR],
                       check=True, timeout=BUILD_TIMEOUT, stdout=subprocess.DEVNULL)
        _prepare(work, suite)
        (work / ".complete").write_text(f"{time.monotonic() - started:.0f}s\n")
        shutil.rmtree(final, ignore_errors=True)
        work.rename(final)
        print(f"rootfs: {suite} ready in {time.monotonic() - started:.0f}s", file=log, flush=True)
    return final


def _prepare(root: Path, suite: str) -> None:
    """Settings every boot of the tree needs (per-boot settings are in boot.sh)."""
    (root / "etc/hostname").write_text(f"{suite}-test\n")
    (root / "etc/machine-id").write_text("")  # systemd generates one per boot (empty = first boot)
    # Keep downloaded .debs (the archive dir is a shared cache) and never ask questions.
    (root / "etc/apt/apt.conf.d/90mesh-agent-tests").write_text(
        'APT::Keep-Downloaded-Packages "true";\nAPT::Install-Recommends "false";\n'
        'Dpkg::Options { "--force-confdef"; "--force-confold"; };\n')


if __name__ == "__main__":
    for name in sys.argv[1:] or SUITES:
        print(ensure(name))
