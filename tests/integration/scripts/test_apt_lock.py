"""setup.sh waits while another package manager holds apt's or dpkg's lock, and says who holds it.

Real dpkg and apt-get run against private admin and list directories, so the machine's own package
state is never touched; the lock is a real fcntl lock held by this test process.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.skipif(not (shutil.which("dpkg") and shutil.which("apt-get")), reason="needs dpkg and apt")


@contextmanager
def held(lock: Path, seconds: float) -> Iterator[None]:
    """Hold a write lock on `lock` as apt and dpkg take it, released after `seconds` (or at exit)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    f = open(lock, "w")  # noqa: SIM115 - closed by the timer or at exit
    fcntl.lockf(f, fcntl.LOCK_EX)
    timer = threading.Timer(seconds, f.close)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        f.close()


def with_apt_lock(*argv: str, wait: int = 60) -> subprocess.CompletedProcess[str]:
    script = f'source {REPO / "scripts/apt-lock.sh"}; with_apt_lock "$@"'
    env = {**os.environ, "APT_LOCK_WAIT": str(wait), "APT_LOCK_POLL": "0.2"}
    return subprocess.run(["bash", "-c", script, "with_apt_lock", *argv], capture_output=True, text=True,
                          env=env, timeout=120, check=False)


def dpkg_args(admin: Path) -> list[str]:
    (admin / "updates").mkdir(parents=True, exist_ok=True)
    (admin / "status").touch()
    return ["dpkg", f"--admindir={admin}", "--configure", "-a"]


def apt_update_args(lists: Path) -> list[str]:
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    return ["apt-get", f"-o=Dir::State::Lists={lists}/", "-o=Dir::Etc::SourceList=/dev/null",
            "-o=Dir::Etc::SourceParts=/nonexistent", "-qq", "update"]


def test_dpkg_waits_for_the_frontend_lock_and_names_the_holder(tmp_path: Path) -> None:
    admin = tmp_path / "dpkg"
    argv = dpkg_args(admin)
    with held(admin / "lock-frontend", 1.5):
        r = with_apt_lock(*argv)
    assert r.returncode == 0, r.stderr
    assert "setup: waiting for another package manager to finish" in r.stderr
    assert f"pid {os.getpid()}" in r.stderr
    assert r.stderr.count("setup: waiting") == 1  # said once, not at every try


def test_apt_get_update_waits_for_the_lists_lock_and_names_the_holder(tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    argv = apt_update_args(lists)
    with held(lists / "lock", 1.5):
        r = with_apt_lock(*argv)
    assert r.returncode == 0, r.stderr
    assert f"held by process {os.getpid()}" in r.stderr


def test_it_gives_up_after_the_wait_with_what_apt_said(tmp_path: Path) -> None:
    admin = tmp_path / "dpkg"
    argv = dpkg_args(admin)
    with held(admin / "lock-frontend", 30):
        r = with_apt_lock(*argv, wait=1)
    assert r.returncode != 0
    assert "dpkg frontend lock was locked by another process" in r.stderr  # dpkg's own words, shown


def test_other_failures_are_not_retried() -> None:
    r = with_apt_lock("apt-get", "no-such-operation")
    assert r.returncode == 100
    assert "Invalid operation no-such-operation" in r.stderr
    assert "waiting" not in r.stderr
