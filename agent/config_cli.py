"""`mesh-agent config check [FILE]`: validate agent.yaml without starting anything.

`mesh-agent config is-configured [FILE]` is the unit's ExecCondition: it tells a configured file from
one that is missing, holds only comments, or says `configured: false` (the shipped example), so the
service is skipped, not failed, until an admin or image builder has set it up.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from agent import config


def add_arguments(p: argparse.ArgumentParser, _verb: str) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = sub.add_parser("check", help="validate a configuration file",
                           description="Validate agent.yaml; exit 0 when valid, 78 with one line per "
                                       "problem (file:line: key: message) when not.")
    check.add_argument("file", nargs="?", help=f"default: --config, ${config.ENV_VAR}, {config.DEFAULT_PATH}")
    check.add_argument("--config", help=argparse.SUPPRESS)
    check.add_argument("--show", action="store_true", help="print the effective configuration as JSON")
    configured = sub.add_parser(
        "is-configured", help="exit 0 if the file has been configured, 1 if not (the unit's start condition)",
        description="Exit 1 when the file is missing, empty, only comments, or says `configured: false` "
                    "(the shipped example); 0 otherwise. A file with settings counts as configured even "
                    "when they are wrong, so that `mesh-agent run` reports them and exits 78.")
    configured.add_argument("file", nargs="?", help="default: as for check")
    configured.add_argument("--config", help=argparse.SUPPRESS)


def is_configured(text: str) -> bool:
    """False for an empty or comments-only document and for `configured: false`; broken YAML and
    wrong settings count as configured (`run` then names the problem)."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        return True
    if doc is None:
        return False
    return not (isinstance(doc, dict) and doc.get("configured") is False)


def main(args: argparse.Namespace) -> int:
    path = config.config_path(args.file or args.config)
    if args.action == "is-configured":
        return _is_configured(path)
    try:
        cfg = config.load(path)
    except config.ConfigError as exc:
        print(exc, file=sys.stderr)
        n = len(exc.errors)
        print(f"{path}: {n} problem{'s' if n != 1 else ''}", file=sys.stderr)
        return config.EX_CONFIG
    if args.show:
        print(json.dumps(config.to_dict(cfg), indent=2, sort_keys=True))
    else:
        print(f"{path}: ok")
    return 0


def _is_configured(path: str) -> int:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        print(f"{path}: missing: not configured")
        return 1
    except OSError:
        return 0  # unreadable: let `run` say why, with its exit code
    if is_configured(text):
        return 0
    print(f"{path}: not configured yet (no settings, or `configured: false`); mesh-agent waits")
    return 1
