"""`mesh-agent status`: what the running agent is doing, read from its status.json (no root needed)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from agent import config
from agent.paths import Layout

EX_NOT_RUNNING = 3  # like `systemctl status` for an inactive unit


def add_arguments(p: argparse.ArgumentParser, _verb: str) -> None:
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")
    p.add_argument("--config", help="agent.yaml, to find run_dir and root (default: $MESH_AGENT_CONFIG or "
                   f"{config.DEFAULT_PATH}; when it cannot be read, the built-in defaults)")
    p.add_argument("--status-file", help="read this status file instead")


def main(args: argparse.Namespace) -> int:
    path = Path(args.status_file) if args.status_file else status_path(args.config)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        print(f"mesh-agent is not running (no {path})", file=sys.stderr)
        return EX_NOT_RUNNING
    except PermissionError:
        print(f"cannot read {path}: permission denied", file=sys.stderr)
        return 1
    except json.JSONDecodeError:
        print(f"{path} is not valid JSON", file=sys.stderr)
        return 1
    running = _alive(int(data.get("pid", 0)))
    if args.json:
        data["running"] = running
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(render(data, running, time.time()))
    return 0 if running else EX_NOT_RUNNING


def status_path(config_arg: str | None) -> Path:
    """status.json's place, from the config when it can be read. A file with errors (e.g. one that a
    reload is about to refuse) still names the running agent's places: its `root` and `run_dir` are
    taken when they are plain strings, else the defaults."""
    path = config.config_path(config_arg)
    try:
        return Layout.from_config(config.load(path)).status_file
    except config.ConfigError:
        pass
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        raw = None
    default = Layout()
    if not isinstance(raw, dict):
        return default.status_file
    root, run_dir = raw.get("root", str(default.root)), raw.get("run_dir", default.run_dir)
    if not isinstance(root, str) or not isinstance(run_dir, str):
        return default.status_file
    return Layout(root=Path(root), run_dir=run_dir).status_file


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by root
    return True


def _ago(then: float | None, now: float) -> str:
    if not then:
        return "never"
    return f"{_span(now - then)} ago" if now >= then else f"in {_span(then - now)}"


def _span(seconds: float) -> str:
    s = int(abs(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d"


def _when(ts: float | None, now: float) -> str:
    if not ts:
        return "unknown"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))
    return f"{stamp} ({_ago(ts, now)})"


def _known(r: dict[str, Any], now: float) -> str:
    """registered / withdrawn / ... as the API last confirmed it, and whether that still holds."""
    known = r.get("known")
    if known is None:
        state = "registered" if r.get("registered") else "not registered"
        return state if not r.get("unknown_since") else f"unknown since {_when(r['unknown_since'], now)}"
    if not r.get("unknown_since"):
        return f"{known} (confirmed {_ago(r.get('confirmed_at'), now)})"
    return (f"unknown since {_when(r['unknown_since'], now)}; last confirmed {known} "
            f"{_ago(r.get('confirmed_at'), now)}")


def render(d: dict[str, Any], running: bool, now: float) -> str:
    """The human summary: one topic per line, the most important first."""
    lines = []
    head = f"mesh-agent {d.get('version', '')} pid {d.get('pid')}"
    if not running:
        head += " (NOT RUNNING: this is the last status it wrote)"
    lines.append(head)
    lines.append(f"  state:        {d.get('phase')}: {d.get('summary')}")
    lines.append(f"  up since:     {_when(d.get('started_at'), now)}")
    b = d.get("bundle") or {}
    if b:
        lines.append(f"  bundle:       {b.get('source', '?')} digest {str(b.get('digest', '?'))[:12]} "
                     f"fetched {_ago(b.get('fetched_at'), now)}")
        lines.append(f"  token expiry: {_when(b.get('token_expiry'), now)}")
        lines.append(f"  cert expiry:  {_when(b.get('cert_expiry'), now)}")
        if b.get("error"):
            lines.append(f"  bundle error: {b['error']}")
    s = d.get("sidecar") or {}
    if s:
        lines.append(f"  sidecar:      {s.get('state', '?')} pid {s.get('pid') or '-'} "
                     f"restarts {s.get('restarts', 0)} ready {'yes' if s.get('ready') else 'no'}")
    several = d.get("apps") or {}
    if several:
        for name, one in several.items():
            lines.append(f"  app {name}:" + (" maintenance (`mesh-agent register --app " + name + "` ends it)"
                                              if one.get("maintenance") and not d.get("maintenance") else ""))
            lines.extend("  " + line for line in _app_lines(one.get("app") or {}, one.get("registration") or {}, now))
    else:
        lines.extend(_app_lines(d.get("app") or {}, d.get("registration") or {}, now))
    i = d.get("identity") or {}
    if i:
        who = f" ({i['who']})" if i.get("who") else ""
        lines.append(f"  identity:     {i.get('provider', '?')}{who}, token expiry {_when(i.get('expiry'), now)}")
        if i.get("error"):
            lines.append(f"  identity error: {i['error']}")
    if d.get("maintenance"):
        lines.append("  maintenance:  on (`mesh-agent register` ends it)")
    rl = d.get("reload") or {}
    if rl:
        outcome = "applied" if rl.get("ok") else f"REFUSED, running configuration kept: {rl.get('error')}"
        lines.append(f"  last reload:  {_ago(rl.get('finished_at'), now)}: {outcome}")
    errors = d.get("errors") or []
    if errors:
        lines.append("  recent errors:")
        for e in errors[-5:]:
            lines.append(f"    {_ago(e.get('at'), now)}: {e.get('where', '')}: {e.get('message', '')}")
    return "\n".join(lines)


def _app_lines(a: dict[str, Any], r: dict[str, Any], now: float) -> list[str]:
    """One app's health and entry."""
    lines = []
    if a:
        health = {True: "healthy", False: "unhealthy", None: "unknown"}[a.get("healthy")]
        reason = f" ({a['reason']})" if a.get("reason") else ""
        lines.append(f"  app:          {health}{reason}")
        last = a.get("last_probe")
        if isinstance(last, dict):
            result = "ok" if last.get("ok") else "failed"
            lines.append(f"  last probe:   {result}: {last.get('reason', '')} ({last.get('latency_ms', '?')} ms, "
                         f"{_ago(last.get('at'), now)}) {a.get('probe', '')}".rstrip())
    if r.get("state") == "waiting":
        lines.append(f"  entry:        none: {r.get('message', 'waiting')}")
    elif r:
        lines.append(f"  entry:        {r.get('namespace', '?')}/{r.get('entry', '?')} {_known(r, now)}")
        lines.append(f"  last write:   {_when(r.get('last_write'), now)} {r.get('last_action', '')}".rstrip())
        if r.get("lease"):
            lines.append(f"  lease:        {r['lease']} renewed {_ago(r.get('lease_renewed'), now)}")
        if r.get("conflict"):
            lines.append(f"  CONFLICT:     {r['conflict']}")
    return lines
