"""`mesh-agent config check [FILE]`: validate agent.yaml without starting anything.

`mesh-agent config is-configured [FILE]` is the unit's ExecCondition: it tells a configured file from
one that is missing, holds only comments, or says `configured: false` (the shipped example), so the
service is skipped, not failed, until an admin or image builder has set it up.
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from agent import config
from agent.schema import SchemaErrors, compose, decode


def add_arguments(p: argparse.ArgumentParser, _verb: str) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = sub.add_parser("check", help="validate a configuration file",
                           description="Validate agent.yaml; exit 0 when valid, 78 with one line per "
                                       "problem (file:line: key: message) when not.")
    check.add_argument("file", nargs="?", metavar="FILE",
                       help=f"default: ${config.ENV_VAR}, else {config.DEFAULT_PATH}")
    check.add_argument("--config", help=argparse.SUPPRESS)
    check.add_argument("--show", action="store_true", help="print the effective configuration as JSON")
    configured = sub.add_parser(
        "is-configured", help="exit 0 if the file has been configured, 1 if not (the unit's start condition)",
        description="Exit 1 when the file is missing, empty, only comments, or says `configured: false` "
                    "(the shipped example), and when the path is a directory; 0 otherwise. A file with "
                    "settings counts as configured even when they are wrong, so that `mesh-agent run` "
                    "reports them and exits 78.")
    configured.add_argument("file", nargs="?", metavar="FILE", help="default: as for check")
    configured.add_argument("--config", help=argparse.SUPPRESS)


def is_configured(text: str) -> bool:
    """False for an empty or comments-only document and for `configured: false`; broken YAML and
    wrong settings count as configured (`run` then names the problem)."""
    try:  # the loader's own composer: its caps hold here too
        node = compose(text, "agent.yaml")
    except SchemaErrors:
        return True
    if node is None or (isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"):
        return False
    if not isinstance(node, yaml.MappingNode):
        return True
    values = {k.value: v for k, v in node.value if isinstance(k, yaml.ScalarNode)}
    flag = values.get("configured")
    return not (isinstance(flag, yaml.ScalarNode) and flag.tag == "tag:yaml.org,2002:bool"
                and flag.value.lower() in ("false", "no", "off"))


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
    # A valid file that still says `configured: false` would pass here and then never start.
    verdict = "ok" if cfg.configured else "ok, but configured: false: the service will not start until it is true"
    if args.show:
        print(json.dumps(config.to_dict(cfg), indent=2, sort_keys=True))
        if not cfg.configured:
            print(f"{path}: {verdict}", file=sys.stderr)
    else:
        print(f"{path}: {verdict}")
    return 0


def _is_configured(path: str) -> int:
    """0: configured, start; 1: not configured, the unit is skipped (systemd's ExecCondition)."""
    try:
        with open(path, "rb") as f:
            data = f.read(config.MAX_BYTES + 1)
    except FileNotFoundError:
        print(f"{path}: missing: not configured")
        return 1
    except IsADirectoryError:
        print(f"{path}: is a directory, not a configuration file", file=sys.stderr)
        return 1
    except OSError:
        return 0  # unreadable: let `run` say why, with its exit code
    try:
        text = decode(data, path)
    except SchemaErrors:
        return 0  # too large or not UTF-8: configured, wrongly; `run` says why
    if is_configured(text):
        return 0
    print(f"{path}: not configured yet (no settings, or `configured: false`); mesh-agent waits")
    return 1
