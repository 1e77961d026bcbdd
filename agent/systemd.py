"""sd_notify and the watchdog interval, through python-systemd; a no-op outside systemd."""

from __future__ import annotations

import os
import time

try:
    from systemd import daemon as _daemon
except ImportError:  # not a dependency problem worth dying for: without it we are not under systemd
    _daemon = None


def under_systemd() -> bool:
    return bool(os.environ.get("NOTIFY_SOCKET"))


def notify(*fields: str) -> bool:
    """Send fields like "READY=1"; True if systemd got it, False when there is no socket."""
    if _daemon is None or not under_systemd():
        return False
    try:
        return bool(_daemon.notify("\n".join(fields)))
    except OSError:
        # systemd went away (or the socket was never there): nothing to tell, nothing to die for.
        return False


def ready(status: str | None = None) -> bool:
    return notify("READY=1", *([f"STATUS={_one_line(status)}"] if status else []))


def status(text: str) -> bool:
    return notify(f"STATUS={_one_line(text)}")


def reloading() -> bool:
    # MONOTONIC_USEC is ignored by systemd 252 and required by newer ones.
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


def stopping(status: str | None = None) -> bool:
    return notify("STOPPING=1", *([f"STATUS={_one_line(status)}"] if status else []))


def watchdog_ping() -> bool:
    return notify("WATCHDOG=1")


def extend_timeout(seconds: float) -> bool:
    return notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when not asked to ping."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec:
        return None
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (we were forked or exec'd by it)
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 / 2 if value > 0 else None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def own_unit() -> str | None:
    """The service unit this process runs in (from its cgroup), or None outside systemd."""
    try:
        with open("/proc/self/cgroup", encoding="ascii") as f:
            path = f.read().strip().rsplit(":", 1)[-1]
    except OSError:
        return None
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name if name.endswith(".service") else None


def pending_job(unit: str | None = None) -> str | None:
    """The type of the job systemd runs on our unit right now ("stop", "restart", ...), or None.

    Asked while stopping: a `restart` (e.g. the package's postinst after an upgrade) means the
    agent comes straight back, so it leaves the VM registered; a `stop` withdraws it."""
    from agent import proc

    unit = unit or own_unit()
    if unit is None or not under_systemd():
        return None
    try:
        result = proc.run(["systemctl", "list-jobs", "--no-legend", "--plain", "--no-pager", unit], timeout=5)
    except OSError:
        return None
    for line in result.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] == unit:
            return fields[2]
    return None
