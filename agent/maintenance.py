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


def maintenance_requested(layout: Layout, app: str | None = None) -> bool:
    """What the daemon checks on every pass: the VM's file, or one app's (None: the VM)."""
    return layout.app_control_file(app).exists()


def maintenance_info(layout: Layout, app: str | None = None) -> dict[str, Any] | None:
    """The recorded request (since, reason, by), or None when not in maintenance."""
    try:
        text = layout.app_control_file(app).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        return {"error": exc.strerror}
    try:
        data = json.loads(text)
        return data if isinstance(data, dict) else {}
    except ValueError:
        return {}  # present but unreadable: still maintenance (the file's existence is what counts)


def request_maintenance(layout: Layout, reason: str = "", now: dt.datetime | None = None,
                        app: str | None = None) -> None:
    path = layout.app_control_file(app)
    path.parent.mkdir(parents=True, exist_ok=True)
    when = (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        by = getpass.getuser()
    except (KeyError, OSError):
        by = str(os.getuid())
    data = json.dumps({"since": when, "reason": reason, "by": by}) + "\n"
    atomic_write(path, data.encode(), 0o644)


def end_maintenance(layout: Layout, app: str | None = None) -> bool:
    """True when maintenance was on."""
    try:
        layout.app_control_file(app).unlink()
    except FileNotFoundError:
        return False
    return True


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("--config", help="agent.yaml, for its root and state_dir (default: "
                        "$MESH_AGENT_CONFIG or /etc/mesh-agent/agent.yaml; when it is missing or invalid, "
                        "the built-in defaults)")
    parser.add_argument("--root", help="path prefix of the VM's files, instead of the config's root "
                        "(tests and demos)")
    parser.add_argument("--app", help="only this app (apps[].name in agent.yaml), not the whole VM")
    if verb == "deregister":
        parser.add_argument("--reason", default="", help="recorded in the maintenance file and status")


def _layout(args: argparse.Namespace) -> tuple[Layout, Any]:
    """The layout, and the configuration when it can be read (None otherwise)."""
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
    return layout, cfg


def main(args: argparse.Namespace) -> int:
    layout, cfg = _layout(args)
    app = getattr(args, "app", None)
    if app is not None and cfg is not None:
        from agent import apps

        known = [a.name for a in apps.apps(cfg)]
        if app not in known:
            print(f"mesh-agent {args.verb}: no app {app!r} in the configuration (apps: {', '.join(known)})",
                  file=sys.stderr)
            return 2
    path = layout.app_control_file(app)
    what = f"app {app}'s WorkloadEntry" if app else "this VM's WorkloadEntries"
    try:
        if args.verb == "deregister":
            request_maintenance(layout, args.reason, app=app)
            print(f"maintenance on ({path}): the running agent withdraws {what} and keeps "
                  f"{'it' if app else 'them'} withdrawn until `mesh-agent register{f' --app {app}' if app else ''}`")
        else:
            was = end_maintenance(layout, app)
            print(f"maintenance ended: the agent registers {what} again once healthy"
                  if was else "not in maintenance; nothing to do")
    except PermissionError:
        print(f"mesh-agent {args.verb}: permission denied writing {path} (run as root)", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"mesh-agent {args.verb}: {path}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


# --- the daemon's part -------------------------------------------------------------------------------

@dataclass(frozen=True)
class MaintenanceSnapshot:
    on: bool = False  # the whole VM
    apps: tuple[str, ...] = ()  # apps in maintenance of their own

    def as_dict(self) -> dict[str, Any]:
        return {"on": self.on, "apps": list(self.apps)}


class MaintenancePart:
    """Looks at the maintenance files (the VM's, each app's) on every pass of the loop (it wakes at least
    every few seconds) and tells the other parts when one appears or goes."""

    name = "maintenance"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.on: dict[str | None, bool] = {}

    def start(self, now: float) -> None:
        self.tick(now)

    def handle(self, event: object, now: float) -> bool:
        return False

    def tick(self, now: float) -> float | None:
        from agent import apps

        several = [a.name for a in apps.apps(self.ctx.cfg) if a.several]
        for app in (None, *several):
            on = maintenance_requested(self.ctx.layout, app)
            if on != self.on.get(app, False):
                self.on[app] = on
                self.ctx.post(MaintenanceChanged(on, app))
        return None

    def reconfigure(self, old: Config, new: Config) -> None:
        pass

    def stop(self) -> None:
        pass

    def status(self) -> MaintenanceSnapshot:
        return MaintenanceSnapshot(self.on.get(None, False),
                                   tuple(sorted(a for a, on in self.on.items() if a is not None and on)))
