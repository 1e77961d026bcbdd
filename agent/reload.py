"""`mesh-agent reload`: ask the running agent to re-read its configuration and wait for its answer.

The unit's ExecReload. It finds the daemon from its status.json (pid), sends SIGHUP and waits until the
daemon records the outcome of a reload that began after the signal was sent. The daemon records each
reload in status.json's `reload` section (see `record`): a generation counter, when it began reading
the configuration (CLOCK_MONOTONIC, one clock for every process of the machine) and the reason when
the new configuration was refused. A reload that began before our signal read the file too early; the
signal makes the daemon reload again, and that later outcome is the one reported.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from agent import config
from agent.status import EX_NOT_RUNNING, status_path

EX_FAILED = 1
POLL = 0.05  # seconds between looks at status.json while waiting
DEFAULT_TIMEOUT = 60.0


def record(generation: int, started: float, error: str | None) -> dict[str, Any]:
    """The `reload` section of status.json for a finished reload. `started` is time.monotonic()
    when the daemon began reading the configuration."""
    return {"generation": generation, "started": started, "finished_at": time.time(),
            "ok": error is None, "error": error}


def answer_for(status: dict[str, Any] | None, pid: int, sent: float) -> dict[str, Any] | None:
    """The daemon's record of a reload that covers a SIGHUP sent at `sent` (monotonic), or None yet."""
    if not status or int(status.get("pid", 0)) != pid:
        return None
    rec = status.get("reload")
    if not isinstance(rec, dict) or not isinstance(rec.get("started"), int | float):
        return None
    return rec if rec["started"] >= sent else None


class ReloadError(Exception):
    def __init__(self, message: str, exit_code: int = EX_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ReloadError(f"cannot read {path}: {exc}") from exc
    return data if isinstance(data, dict) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reload(path: Path, timeout: float) -> dict[str, Any]:
    """Signal the agent whose status is at `path` and return its record of the reload.

    Raises ReloadError: not running (exit 3), not allowed to signal it, or no answer in time."""
    status = _read(path)
    pid = int((status or {}).get("pid", 0))
    if pid <= 0 or not _alive(pid):
        raise ReloadError(f"mesh-agent is not running (no live agent in {path})", EX_NOT_RUNNING)
    sent = time.monotonic()
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise ReloadError(f"mesh-agent (pid {pid}) exited before it could be asked to reload",
                          EX_NOT_RUNNING) from None
    except PermissionError:
        raise ReloadError(f"not allowed to signal mesh-agent (pid {pid}): run as root") from None
    deadline = sent + timeout
    while True:
        rec = answer_for(_read(path), pid, sent)
        if rec is not None:
            return rec
        if not _alive(pid):
            raise ReloadError(f"mesh-agent (pid {pid}) exited during the reload; see "
                              f"`journalctl -u mesh-agent`")
        if time.monotonic() >= deadline:
            raise ReloadError(f"mesh-agent (pid {pid}) did not answer the reload within {timeout:g}s "
                              f"(it may be starting or stopping); see `mesh-agent status`")
        time.sleep(POLL)


def add_arguments(p: argparse.ArgumentParser, _verb: str) -> None:
    p.add_argument("--config", help="agent.yaml (to find run_dir and root)")
    p.add_argument("--status-file", help="the running agent's status file (default: from the config)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds to wait for the agent's answer (default: {DEFAULT_TIMEOUT:g})")


def main(args: argparse.Namespace) -> int:
    path = Path(args.status_file) if args.status_file else status_path(args.config)
    try:
        rec = reload(path, args.timeout)
    except ReloadError as exc:
        print(f"mesh-agent reload: {exc}", file=sys.stderr)
        return exc.exit_code
    if rec.get("ok"):
        print(f"configuration reloaded (reload {rec.get('generation')})")
        return 0
    print(f"mesh-agent reload: refused, the running configuration is kept:\n{rec.get('error')}",
          file=sys.stderr)
    return config.EX_CONFIG
