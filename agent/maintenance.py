"""`mesh-agent deregister` / `mesh-agent register`: maintenance mode, through a file the daemon watches.

The commands never call the Kubernetes API themselves: the running daemon owns the registration, and a
write behind its back would be undone by its next resync. `deregister` writes the maintenance file
(Layout.control_file, under the state directory so it survives restarts); the daemon sees it, withdraws
the entry and keeps it withdrawn. `register` removes the file and the daemon registers again once the
app is healthy.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import Config
from agent.fsutil import atomic_write
from agent.part import Context, MaintenanceChanged
from agent.paths import Layout


def maintenance_requested(layout: Layout) -> bool:
    """What the daemon checks (on a file-system event and on every resync)."""
    return layout.control_file.exists()


def maintenance_info(layout: Layout) -> dict[str, Any] | None:
    """The recorded request (since, reason, by), or None when not in maintenance."""
    try:
        text = layout.control_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        return {"error": exc.strerror}
    try:
        data = json.loads(text)
        return data if isinstance(data, dict) else {}
    except ValueError:
        return {}  # present but unreadable: still maintenance (the file's existence is what counts)


def request_maintenance(layout: Layout, reason: str = "", now: dt.datetime | None = None) -> None:
    path = layout.control_file
    path.parent.mkdir(parents=True, exist_ok=True)
    when = (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        by = getpass.getuser()
    except (KeyError, OSError):
        by = str(os.getuid())
    data = json.dumps({"since": when, "reason": reason, "by": by}) + "\n"
    atomic_write(path, data.encode(), 0o644)


def end_maintenance(layout: Layout) -> bool:
    """True when maintenance was on."""
    try:
        layout.control_file.unlink()
    except FileNotFoundError:
        return False
    return True


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("--config", help="agent.yaml, for its root and state_dir (default: "
                        "$MESH_AGENT_CONFIG or /etc/mesh-agent/agent.yaml; when it is missing or invalid, "
                        "the built-in defaults)")
    parser.add_argument("--root", help="path prefix of the VM's files, instead of the config's root "
                        "(tests and demos)")
    if verb == "deregister":
        parser.add_argument("--reason", default="", help="recorded in the maintenance file and status")


def _layout(args: argparse.Namespace) -> Layout:
    from agent import config as C

    path = C.config_path(args.config)
    cfg = None
    if args.config or os.path.exists(path):
        try:
            cfg = C.load(path)
        except C.ConfigError:
            cfg = None  # maintenance must work even with a broken config; defaults place the file
    layout = Layout.from_config(cfg) if cfg is not None else Layout()
    if args.root:
        layout = Layout(Path(args.root), layout.state_dir, layout.run_dir)
    return layout


def main(args: argparse.Namespace) -> int:
    layout = _layout(args)
    try:
        if args.verb == "deregister":
            request_maintenance(layout, args.reason)
            print(f"maintenance on ({layout.control_file}): the running agent withdraws this VM's "
                  "WorkloadEntry and keeps it withdrawn until `mesh-agent register`")
        else:
            was = end_maintenance(layout)
            print("maintenance ended: the agent registers this VM again once its app is healthy"
                  if was else "not in maintenance; nothing to do")
    except PermissionError:
        print(f"mesh-agent {args.verb}: permission denied writing {layout.control_file} (run as root)",
              file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"mesh-agent {args.verb}: {layout.control_file}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


# --- the daemon's part -------------------------------------------------------------------------------

@dataclass(frozen=True)
class MaintenanceSnapshot:
    on: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"on": self.on}


class MaintenancePart:
    """Looks at the maintenance file on every pass of the loop (it wakes at least every few seconds) and
    tells the other parts when it appears or goes."""

    name = "maintenance"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.on = False

    def start(self, now: float) -> None:
        self.tick(now)

    def handle(self, event: object, now: float) -> bool:
        return False

    def tick(self, now: float) -> float | None:
        on = maintenance_requested(self.ctx.layout)
        if on != self.on:
            self.on = on
            self.ctx.post(MaintenanceChanged(on))
        return None

    def reconfigure(self, old: Config, new: Config) -> None:
        pass

    def stop(self) -> None:
        pass

    def status(self) -> MaintenanceSnapshot:
        return MaintenanceSnapshot(self.on)
