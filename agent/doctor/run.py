"""`mesh-agent doctor`: runs every check in the order an admin would look and prints one line each
(or JSON); exit status 1 when any failed."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict

from agent import config
from agent.doctor.check import FAIL, WARN, Check, Context
from agent.doctor.remote import check_api, check_group, check_identity, check_istiod, check_rbac
from agent.doctor.vm import (
    check_bundle,
    check_config,
    check_iptables,
    check_istio_service,
    check_ports,
    check_sidecar,
)


def add_arguments(p: argparse.ArgumentParser, _verb: str) -> None:
    p.add_argument("--config", help=f"agent.yaml (default: ${config.ENV_VAR} or {config.DEFAULT_PATH})")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per network check (default 3)")


def main(args: argparse.Namespace) -> int:
    ctx = Context(config.config_path(args.config))
    checks = run_checks(ctx, args.timeout)
    if args.json:
        print(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        for c in checks:
            print(c.line())
        failed = sum(c.result == FAIL for c in checks)
        warned = sum(c.result == WARN for c in checks)
        print(f"{len(checks)} checks: {failed} failed, {warned} warnings")
    return 1 if any(c.result == FAIL for c in checks) else 0


def run_checks(ctx: Context, timeout: float) -> list[Check]:
    out: list[Check] = []
    steps: list[Callable[[Context, float], list[Check]]] = [
        check_config, check_identity, check_bundle, check_sidecar, check_istiod, check_api, check_rbac,
        check_group, check_ports, check_iptables, check_istio_service]
    for step in steps:
        try:
            out.extend(step(ctx, timeout))
        except Exception as exc:  # a broken check must not hide the others
            out.append(Check(step.__name__.removeprefix("check_"), FAIL, f"the check itself failed: {exc}"))
    return out


if __name__ == "__main__":
    sys.exit(main(argparse.Namespace(config=None, json=False, timeout=3.0)))
