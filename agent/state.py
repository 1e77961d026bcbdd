"""The agent's own state machine, and the status snapshot written to /run/mesh-agent/status.json.

The agent's phase is about its lifecycle (starting, running, reloading, stopping); what it is doing for
the mesh (registered or not, and why) is derived from its parts' states by `summarize`, a pure function,
so the one-line STATUS= that systemd shows and `mesh-agent status` never disagree.
"""

from __future__ import annotations

import enum
import json
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from agent.fsutil import atomic_write


class Phase(enum.Enum):
    STARTING = "starting"    # restoring/fetching the bundle, starting the sidecar
    RUNNING = "running"      # steady state: following the app's health
    RELOADING = "reloading"  # SIGHUP: re-reading config and bundle
    STOPPING = "stopping"    # SIGTERM: withdrawing, draining, stopping
    STOPPED = "stopped"      # clean exit
    FAILED = "failed"        # gave up (sidecar crash loop, fatal error); exits non-zero


# Allowed phase transitions; anything else is a bug in the loop.
TRANSITIONS: dict[Phase, set[Phase]] = {
    Phase.STARTING: {Phase.RUNNING, Phase.STOPPING, Phase.FAILED},
    Phase.RUNNING: {Phase.RELOADING, Phase.STOPPING, Phase.FAILED},
    Phase.RELOADING: {Phase.RUNNING, Phase.STOPPING, Phase.FAILED},
    Phase.STOPPING: {Phase.STOPPED, Phase.FAILED},
    Phase.STOPPED: set(),
    Phase.FAILED: set(),
}


class PhaseMachine:
    def __init__(self) -> None:
        self.phase = Phase.STARTING
        self.since = time.monotonic()

    def to(self, new: Phase) -> None:
        if new == self.phase:
            return
        if new not in TRANSITIONS[self.phase]:
            raise RuntimeError(f"agent phase {self.phase.value} -> {new.value} is not allowed")
        self.phase, self.since = new, time.monotonic()


@dataclass
class Status:
    """Everything `mesh-agent status` shows. Plain data: it is written as JSON."""

    pid: int = field(default_factory=os.getpid)
    version: str = ""
    phase: str = Phase.STARTING.value
    summary: str = "starting"
    started_at: float = field(default_factory=time.time)  # wall clock, for people
    updated_at: float = 0.0
    bundle: dict[str, Any] = field(default_factory=dict)   # source, digest, fetched_at, token/cert expiry
    sidecar: dict[str, Any] = field(default_factory=dict)  # state, pid, restarts, ready
    app: dict[str, Any] = field(default_factory=dict)      # healthy, reason, last probe
    registration: dict[str, Any] = field(default_factory=dict)  # entry, registered, last write, lease
    maintenance: bool = False
    apps: dict[str, dict[str, Any]] = field(default_factory=dict)  # several: name -> app, registration, maintenance
    identity: dict[str, Any] = field(default_factory=dict)  # provider, who, token expiry, error
    reload: dict[str, Any] = field(default_factory=dict)  # the last reload's outcome (agent.reload.record)
    errors: list[dict[str, Any]] = field(default_factory=list)  # recent errors: at, where, message

    def as_json(self) -> str:
        return json.dumps(self._fields(), indent=2, sort_keys=True)

    def _fields(self) -> dict[str, Any]:
        # Its fields hold plain data already (the parts' snapshots as dicts): no deep copy needed, as
        # dataclasses.asdict would make on every loop pass.
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def fingerprint(self) -> str:
        """The content, compact and without updated_at, to tell whether anything changed (the C encoder:
        a fraction of the indented form's cost, paid on every loop pass)."""
        return json.dumps({**self._fields(), "updated_at": 0.0}, sort_keys=True)


def summarize(phase: Phase, sidecar: dict[str, Any], apps: dict[str, dict[str, Any]]) -> str:
    """One line saying what the agent is doing for the mesh, and why: for each app (`apps`: name ->
    {app, registration, maintenance}), prefixed with its name when there are several."""
    if phase in (Phase.STOPPING, Phase.STOPPED, Phase.FAILED):
        return phase.value
    if len(apps) == 1:
        (one,) = apps.values()
        return _summarize_app(sidecar, one["app"], one["registration"], one["maintenance"])
    if apps and all(a["maintenance"] for a in apps.values()):
        return "maintenance: entries withdrawn until `mesh-agent register`"
    return "; ".join(f"{name}: {_summarize_app(sidecar, a['app'], a['registration'], a['maintenance'])}"
                     for name, a in apps.items())


def _summarize_app(sidecar: dict[str, Any], app: dict[str, Any], registration: dict[str, Any],
                   maintenance: bool) -> str:
    if maintenance:
        return "maintenance: entry withdrawn until `mesh-agent register`"
    if registration.get("state") == "waiting":
        return str(registration["message"])
    entry = registration.get("entry") or "entry"
    if registration.get("conflict"):
        return f"conflict: {registration['conflict']}"
    if registration.get("registered"):
        state = "registered " + entry
        if registration.get("unknown_since"):
            state += " as last confirmed; unconfirmed since the API failed"
        if registration.get("error"):
            state += f" (API: {registration['error']})"
        return state
    if not sidecar.get("ready"):
        return f"waiting for sidecar ({sidecar.get('state', 'stopped').lower()})"
    if app.get("healthy") is False:
        return f"withdrawn: app unhealthy ({app.get('reason', 'unknown')})"
    if app.get("healthy") is None:
        return "waiting for app health"
    if registration.get("error"):
        return f"registering {entry}: {registration['error']}"
    return f"registering {entry}"


class StatusWriter:
    """Writes status.json when the content changed (not on every loop pass)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._last = ""

    def write(self, status: Status) -> bool:
        key = status.fingerprint()
        if key == self._last:
            return False
        self._last = key
        status.updated_at = time.time()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, status.as_json().encode(), 0o644)
        return True

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
