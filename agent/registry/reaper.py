"""`mesh-agent reap`: delete the WorkloadEntries of VMs that died, found by their expired Leases.

Runs in the cluster (the CronJob from `mesh-agent manifests`) with its own ServiceAccount. An entry
written by mesh-agent names its lease in the `mesh-agent.io/lease` annotation; when that lease ran out
more than `--grace` ago (or is missing and the entry is older than the grace), the VM stopped renewing
it without withdrawing: it died. Before deleting, the lease is read again and deleted first with its
resourceVersion as precondition, so an agent that renewed meanwhile wins and keeps its entry.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from dataclasses import dataclass
from typing import Any

from agent.kube.auth import Credentials, in_cluster_credentials
from agent.kube.client import ENTRIES, LEASES, Kube
from agent.kube.errors import ApiError, Conflict
from agent.registry import entry as E
from agent.units import parse_duration


@dataclass(frozen=True)
class Verdict:
    entry: str | None
    lease: str | None
    expired_at: dt.datetime | None
    reason: str


def dead(entries: list[dict[str, Any]], leases: list[dict[str, Any]], now: dt.datetime,
         grace: float) -> list[Verdict]:
    """Pure: which entries (and leases) are past their lease's expiry plus the grace."""
    by_name = {lz["metadata"]["name"]: lz for lz in leases}
    out: list[Verdict] = []
    claimed: set[str] = set()
    cutoff = now - dt.timedelta(seconds=grace)
    for obj in entries:
        meta = obj.get("metadata") or {}
        lease_name = (meta.get("annotations") or {}).get(E.LEASE_ANNOTATION)
        if not lease_name:
            continue  # not written by mesh-agent: never ours to reap
        claimed.add(lease_name)
        lease = by_name.get(lease_name)
        if lease is not None:
            expiry = E.lease_expiry(lease)
            if expiry is not None and expiry < cutoff:
                out.append(Verdict(meta["name"], lease_name, expiry,
                                   f"lease held by {lease['spec'].get('holderIdentity')} expired"))
        else:
            created = E.parse_time(meta.get("creationTimestamp"))
            if created is not None and created < cutoff:
                out.append(Verdict(meta["name"], None, created, "no lease"))
    for name, lease in by_name.items():
        if name in claimed:
            continue
        expiry = E.lease_expiry(lease)
        labels = (lease.get("metadata") or {}).get("labels") or {}
        if labels.get(E.MANAGED_BY_LABEL) == E.FIELD_MANAGER and expiry is not None and expiry < cutoff:
            out.append(Verdict(None, name, expiry, "lease without an entry expired"))
    return out


def reap(kube: Kube, namespace: str, grace: float, dry_run: bool = False,
         now: dt.datetime | None = None, say: Any = print) -> tuple[int, int]:
    """Delete what `dead` finds; returns (deleted, skipped). Raises ApiError on a listing failure."""
    now = now or dt.datetime.now(dt.UTC)
    entries = kube.list(ENTRIES, namespace).get("items") or []
    leases = kube.list(LEASES, namespace, f"{E.MANAGED_BY_LABEL}={E.FIELD_MANAGER}").get("items") or []
    deleted = skipped = 0
    for v in dead(entries, leases, now, grace):
        what = f"entry {v.entry}" if v.entry else f"lease {v.lease}"
        when = v.expired_at.strftime("%Y-%m-%dT%H:%M:%SZ") if v.expired_at else "?"
        if dry_run:
            say(f"would delete {what} in {namespace}: {v.reason} at {when}")
            continue
        try:
            if v.lease is not None:
                lease = kube.get(LEASES, namespace, v.lease)
                expiry = E.lease_expiry(lease)
                if lease is not None and (expiry is None or
                                          expiry >= dt.datetime.now(dt.UTC) - dt.timedelta(seconds=grace)):
                    say(f"kept {what}: its lease was renewed")
                    skipped += 1
                    continue
                if lease is not None:
                    m = lease["metadata"]
                    kube.delete(LEASES, namespace, v.lease, uid=m.get("uid"),
                                resource_version=m.get("resourceVersion"))
            if v.entry is not None:
                obj = kube.get(ENTRIES, namespace, v.entry)
                if obj is not None:
                    kube.delete(ENTRIES, namespace, v.entry, uid=obj["metadata"].get("uid"))
            say(f"deleted {what} in {namespace}: {v.reason} at {when}")
            deleted += 1
        except Conflict:
            say(f"kept {what}: it changed while reaping (its agent is back)")
            skipped += 1
    return deleted, skipped


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("--namespace", required=True, help="namespace of the WorkloadEntries and Leases")
    parser.add_argument("--grace", default="60s", help="how long after the lease expired (default 60s)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be deleted")
    parser.add_argument("--kubeconfig", help="default: the pod's service account, else ~/.kube/config")
    parser.add_argument("--timeout", default="10s", help="per API request (default 10s)")


def main(args: argparse.Namespace) -> int:
    try:
        grace = parse_duration(args.grace)
        timeout = parse_duration(args.timeout)
    except ValueError as exc:
        print(f'mesh-agent reap: expected a duration like "60s", got "{exc}"', file=sys.stderr)
        return 2
    import os

    creds = (Credentials(kubeconfig=args.kubeconfig) if args.kubeconfig else in_cluster_credentials()
             or Credentials(kubeconfig=os.path.expanduser("~/.kube/config")))
    try:
        kube = Kube.from_credentials(creds, timeout)
    except Exception as exc:  # a bad kubeconfig: say which, exit EX_CONFIG
        print(f"mesh-agent reap: cannot use the API credentials: {exc}", file=sys.stderr)
        return 78
    try:
        deleted, skipped = reap(kube, args.namespace, grace, args.dry_run)
    except ApiError as exc:
        print(f"mesh-agent reap: {exc}", file=sys.stderr)
        return 1
    finally:
        kube.close()
    if not args.dry_run:
        print(f"reaped {deleted}, kept {skipped}")
    return 0
