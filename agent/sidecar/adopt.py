"""The pid file, and finding a proxy left by an earlier agent (killed, or re-executed).

The proxy's pid, start time and command line are kept in Layout.sidecar_pidfile. The next agent
looks there (and, when our ports are taken, for our command line), adopts a proxy that is ours and
healthy, and stops the rest, so there are never two proxies. A recycled pid (other start time) is
never taken for ours.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from agent.fsutil import atomic_write
from agent.sidecar.child import Child, terminate
from agent.sidecar.envoy_admin import expected_ready_body, probe_ready
from agent.sidecar.ports import busy_ports
from agent.sidecar.profiles import MARKER_ENV, LaunchSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PidRecord:
    pid: int
    create_time: float
    argv: tuple[str, ...]
    profile: str


def write_pidfile(path: Path, record: PidRecord) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps({"pid": record.pid, "create_time": record.create_time,
                                    "argv": list(record.argv), "profile": record.profile}) + "\n").encode(), 0o644)


def record_process(path: Path, pid: int, argv: Sequence[str], profile: str) -> None:
    """Write the pid file for a running proxy (nothing when it is gone already or the file cannot be
    written: the pid file only helps a later agent)."""
    with contextlib.suppress(psutil.Error, OSError):
        write_pidfile(path, PidRecord(pid, psutil.Process(pid).create_time(), tuple(argv), profile))


def read_pidfile(path: Path) -> PidRecord | None:
    try:
        data = json.loads(path.read_text())
        return PidRecord(int(data["pid"]), float(data["create_time"]), tuple(data["argv"]),
                         str(data["profile"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable sidecar pid file %s: %s", path, exc)
        return None


def remove_pidfile(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def leftovers(spec: LaunchSpec, pidfile: Path) -> list[psutil.Process]:
    """Proxies left by an earlier agent, the newest --restart-epoch first."""
    found: list[psutil.Process] = []
    record = read_pidfile(pidfile)
    if record is not None:
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(record.pid)
            # The start time guards against a recycled pid: never signal a stranger.
            if abs(p.create_time() - record.create_time) < 1.0 and _is_ours(p, record.argv):
                found.append(p)
    # Without a pid file (deleted, or never written), look for our command line, but only when
    # our ports are taken: a proxy that holds none of them is not serving anything.
    scan = psutil.process_iter(["cmdline"]) if busy_ports(spec.ports) else ()
    for p in scan:
        if same_command(p.info["cmdline"] or [], spec.argv) and p.pid != os.getpid() \
                and all(p.pid != q.pid for q in found):
            found.append(p)
    # After a hot restart two epochs may be left: the newest is the one to keep.
    found.sort(key=lambda p: -_epoch_of_process(p))
    return found


def adopt_or_clean(spec: LaunchSpec, pidfile: Path) -> psutil.Process | None:
    """The leftover proxy to adopt (ours and healthy), after stopping every other one; None (and no
    pid file) when there is none."""
    found: psutil.Process | None = None
    for p in leftovers(spec, pidfile):
        with contextlib.suppress(psutil.Error):
            if found is None and adoptable(p, spec):
                found = p
                continue
            log.warning("stopping a sidecar left by a previous run: pid %d (%s)", p.pid,
                        " ".join(p.cmdline())[:200])
            terminate(Child.of_process(p), spec, drain=False)
    if found is None:
        remove_pidfile(pidfile)
    return found


def adoptable(p: psutil.Process, spec: LaunchSpec) -> bool:
    """Runs the configured command with the spec's environment, and answers its readiness probe.
    Raises psutil.Error when the process went away."""
    return same_command(p.cmdline(), spec.argv) and _same_env(p, spec) \
        and probe_ready(spec.readiness_url, expected_ready_body(spec))


def same_command(cmdline: Sequence[str], argv: Sequence[str]) -> bool:
    """A process's command line is argv (whatever its --restart-epoch), or an interpreter running
    argv (a `#!` script)."""
    cmdline, argv = list(with_epoch(cmdline, 0)), list(with_epoch(argv, 0))
    return cmdline == argv or (len(cmdline) == len(argv) + 1 and cmdline[1:] == argv)


def with_epoch(argv: Sequence[str], epoch: int) -> tuple[str, ...]:
    """argv with its --restart-epoch value replaced (unchanged without one)."""
    out = list(argv)
    for i, word in enumerate(out[:-1]):
        if word == "--restart-epoch":
            out[i + 1] = str(epoch)
    return tuple(out)


def epoch_of(argv: Sequence[str]) -> int:
    words = list(argv)
    for i, word in enumerate(words[:-1]):
        if word == "--restart-epoch":
            with contextlib.suppress(ValueError):
                return int(words[i + 1])
    return 0


def _is_ours(p: psutil.Process, recorded_argv: Sequence[str]) -> bool:
    with contextlib.suppress(psutil.Error):
        if same_command(p.cmdline(), recorded_argv):
            return True
    with contextlib.suppress(psutil.Error):
        return MARKER_ENV in p.environ()
    return False


def _same_env(p: psutil.Process, spec: LaunchSpec) -> bool:
    """The process runs with the environment the spec would give it (e.g. cluster.env unchanged)."""
    try:
        env = p.environ()
    except psutil.AccessDenied:
        return True   # cannot tell (the agent is not root): the command line has to do
    except psutil.Error:
        return False
    return all(env.get(key) == value for key, value in spec.env.items())


def _epoch_of_process(p: psutil.Process) -> int:
    try:
        return epoch_of(p.cmdline())
    except psutil.Error:
        return -1
