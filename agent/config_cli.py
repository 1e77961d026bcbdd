"""`mesh-agent config check [FILE]`: validate agent.yaml without starting anything."""

from __future__ import annotations

import argparse
import json
import sys

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
        "configured", help="exit 1 when the file says `configured: false` (the unit's start condition)",
        description="Used by the unit's ExecCondition: exit 0 when the file sets configured: true or "
                    "leaves it out, 1 when it says false. A file that fails to load also exits 0, so "
                    "that `mesh-agent run` reports its errors and fails with status 78.")
    configured.add_argument("file", nargs="?")
    configured.add_argument("--config", help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> int:
    path = config.config_path(args.file or args.config)
    if args.action == "configured":
        return _configured(path)
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


def _configured(path: str) -> int:
    try:
        cfg = config.load(path)
    except config.ConfigError:
        return 0  # not ours to judge: `run` names the errors and exits 78
    if not cfg.configured:
        print(f"{path}: configured: false; mesh-agent waits until it is set to true", file=sys.stderr)
        return 1
    return 0
