"""Build the VM's WorkloadEntry, its Lease and its Healthy condition: pure functions, no I/O.

The entry follows istiod's own auto-registration scheme so operators see familiar names and labels:
name `<group>-<address with ':' -> '-'>[-<network>]`, spec = the group's template + this VM's
address and network, labels merged template -> group metadata.labels -> workload labels -> config
extras, plus topology.istio.io/network when the VM has a network, and an
ownerReference to the WorkloadGroup so deleting the group deletes its entries. mesh-agent registers
the VM itself, so instead of istiod's `istio.io/autoRegistrationGroup` it marks the entry with its
own instance and lease annotations; those are what ownership decisions read.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Any

GROUP = "networking.istio.io"
VERSION = "v1"
API_VERSION = f"{GROUP}/{VERSION}"
ENTRY_PLURAL = "workloadentries"
GROUP_PLURAL = "workloadgroups"
LEASE_API_VERSION = "coordination.k8s.io/v1"

FIELD_MANAGER = "mesh-agent"
INSTANCE_ANNOTATION = "mesh-agent.io/instance"
LEASE_ANNOTATION = "mesh-agent.io/lease"
# The API username that wrote the entry or lease (SelfSubjectReview): with per-VM credentials the
# admission policy compares it with the caller, which the hashed instance annotation cannot be.
OWNER_ANNOTATION = "mesh-agent.io/owner"
HEALTH_CHECKS_ANNOTATION = "proxy.istio.io/health-checks-enabled"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
NETWORK_LABEL = "topology.istio.io/network"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_PORT_NAME = re.compile(r"^[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?$")


class EntryError(ValueError):
    """The inputs cannot make a valid WorkloadEntry; the message says which input and why."""


@dataclass(frozen=True)
class EntryInputs:
    """Everything the entry is made from, gathered by the caller from config, cluster.env and the API.

    `group` is the WorkloadGroup object as the API returns it (a dict), or one read from the bundle's
    workloadgroup.yaml (then it may lack metadata.uid and no ownerReference is written).
    """

    group: dict[str, Any]
    address: str
    instance: str
    namespace: str | None = None          # default: the group's namespace
    network: str | None = None
    locality: str | None = None
    weight: int | None = None
    service_account: str | None = None    # default: the template's, else none
    workload_labels: dict[str, str] = field(default_factory=dict)  # ISTIO_METAJSON_LABELS
    extra_labels: dict[str, str] = field(default_factory=dict)     # registry.labels
    # Several apps on one VM share its one sidecar, whose identity is the bundle's service account: an
    # entry naming another would make Istio expect a workload identity this proxy cannot present.
    sidecar_service_account: str | None = None
    condition_mode: bool = False          # on_unhealthy: condition
    owner: str | None = None              # this credential's API username (OWNER_ANNOTATION)


def instance_id(machine_id: str) -> str:
    """This VM's stable identity: a truncated sha256 of /etc/machine-id (never the raw id)."""
    text = machine_id.strip()
    if not text:
        raise EntryError("/etc/machine-id is empty: cannot tell this VM apart from its clones")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def entry_name(group: str, address: str, network: str | None = None) -> str:
    """istiod's scheme; checked to be a valid object name so the API never rejects it late."""
    name = f"{group}-{address.replace(':', '-')}"
    if network:
        name += f"-{network}"
    if len(name) > 253 or not all(_DNS_LABEL.match(part) for part in name.split(".")):
        raise EntryError(f'entry name "{name}" (group-address[-network]) is not a valid Kubernetes name: '
                         "use lowercase letters, digits, '-' and '.' in the group and network names")
    return name


def _check_labels(labels: dict[str, str], source: str) -> None:
    for key, value in labels.items():
        prefix, _, name = key.rpartition("/")
        if not name or len(name) > 63 or not _LABEL_NAME.match(name) or (
                prefix and (len(prefix) > 253 or not all(_DNS_LABEL.match(p) for p in prefix.split(".")))):
            raise EntryError(f'{source}: label key "{key}" is not a valid Kubernetes label key')
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_NAME.match(value):
            raise EntryError(f'{source}: label "{key}" has an invalid value "{value}"')


def _group_meta(group: dict[str, Any]) -> tuple[str, str | None, str | None]:
    meta = group.get("metadata") or {}
    name = meta.get("name")
    if not name:
        raise EntryError("the WorkloadGroup has no metadata.name")
    return name, meta.get("namespace"), meta.get("uid")


def _address(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        raise EntryError(f'"{address}" is not an IP address') from None


def build_entry(inp: EntryInputs) -> dict[str, Any]:
    """The WorkloadEntry to server-side apply (fields mesh-agent has an opinion about, nothing else)."""
    gname, gnamespace, guid = _group_meta(inp.group)
    namespace = inp.namespace or gnamespace
    if not namespace:
        raise EntryError("no namespace: set registry.namespace or POD_NAMESPACE in cluster.env")
    gspec = inp.group.get("spec") or {}
    template = copy.deepcopy(gspec.get("template") or {})
    gmeta = gspec.get("metadata") or {}
    address = _address(inp.address)
    network = inp.network if inp.network is not None else template.get("network") or None

    labels: dict[str, str] = {}
    for source, part in (("the group's template.labels", template.get("labels") or {}),
                         ("the group's metadata.labels", gmeta.get("labels") or {}),
                         ("ISTIO_METAJSON_LABELS", inp.workload_labels),
                         ("registry.labels", inp.extra_labels)):
        _check_labels(part, source)
        labels.update(part)

    if network:
        # istiod reads a workload's network from this label as well as from spec.network (multi-network
        # meshes route to it through the network's gateway); both say the same.
        _check_labels({NETWORK_LABEL: network}, "registry.network")
        labels[NETWORK_LABEL] = network

    spec: dict[str, Any] = {k: v for k, v in template.items() if k != "address"}
    spec["address"] = address
    if labels:
        spec["labels"] = dict(labels)
    else:
        spec.pop("labels", None)
    wanted = inp.service_account or template.get("serviceAccount")
    if inp.sidecar_service_account and wanted and wanted != inp.sidecar_service_account:
        raise EntryError(f'WorkloadGroup {gname} runs as service account "{wanted}", but this VM\'s sidecar is '
                         f'"{inp.sidecar_service_account}" (the bundle\'s): give the groups of the apps on one VM '
                         "the same serviceAccount, or run this app on its own VM")
    for key, value in (("network", network), ("locality", inp.locality), ("weight", inp.weight),
                       ("serviceAccount", inp.service_account)):
        if value is not None and value != "":
            spec[key] = value
    for port_name, port in (spec.get("ports") or {}).items():
        if len(port_name) >= 63 or not _PORT_NAME.match(port_name):
            raise EntryError(f'port name "{port_name}" is not valid (letters, digits and "-")')
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise EntryError(f'port "{port_name}" must be 1..65535, got {port!r}')
    if inp.locality is not None and inp.locality.count("/") > 2:
        raise EntryError(f'locality "{inp.locality}" is not region/zone/subzone')

    name = entry_name(gname, address, network)
    annotations = dict(gmeta.get("annotations") or {})
    annotations[INSTANCE_ANNOTATION] = inp.instance
    annotations[LEASE_ANNOTATION] = name
    if inp.owner:
        annotations[OWNER_ANNOTATION] = inp.owner
    if inp.condition_mode:
        annotations[HEALTH_CHECKS_ANNOTATION] = "true"
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {**labels, MANAGED_BY_LABEL: FIELD_MANAGER},
        "annotations": annotations,
    }
    if guid and (gnamespace in (None, namespace)):
        metadata["ownerReferences"] = [{
            "apiVersion": inp.group.get("apiVersion") or API_VERSION,
            "kind": "WorkloadGroup",
            "name": gname,
            "uid": guid,
            "controller": False,
            "blockOwnerDeletion": False,
        }]
    return {"apiVersion": API_VERSION, "kind": "WorkloadEntry", "metadata": metadata, "spec": spec}


# --- time formats -----------------------------------------------------------------------------------

def format_time(t: dt.datetime) -> str:
    """metav1.Time: RFC 3339, seconds, UTC."""
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_micro_time(t: dt.datetime) -> str:
    """metav1.MicroTime: exactly six fractional digits (the server parses a fixed layout)."""
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    try:
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


# --- lease --------------------------------------------------------------------------------------------

def build_lease(name: str, namespace: str, instance: str, duration: float, now: dt.datetime,
                previous: dict[str, Any] | None = None,
                owner: dict[str, Any] | None = None, writer: str | None = None) -> dict[str, Any]:
    """The Lease proving this instance is alive, renewed from `previous` (as read) when there is one.
    `owner` is its ownerReference (the entry); `writer` this credential's API username, recorded in
    OWNER_ANNOTATION as on the entry.

    Taking over another holder's lease sets acquireTime and counts a transition, as client-go does.
    The returned object carries previous' resourceVersion, so a replace fails with 409 if someone else
    wrote the lease since it was read.
    """
    pspec = (previous or {}).get("spec") or {}
    spec: dict[str, Any] = {
        "holderIdentity": instance,
        "leaseDurationSeconds": max(1, round(duration)),
        "renewTime": format_micro_time(now),
    }
    if previous is None or pspec.get("holderIdentity") != instance:
        spec["acquireTime"] = format_micro_time(now)
        transitions = int(pspec.get("leaseTransitions") or 0)
        spec["leaseTransitions"] = transitions + 1 if previous is not None else 0
    else:
        spec["acquireTime"] = pspec.get("acquireTime") or format_micro_time(now)
        spec["leaseTransitions"] = int(pspec.get("leaseTransitions") or 0)
    metadata: dict[str, Any] = {"name": name, "namespace": namespace,
                                "labels": {MANAGED_BY_LABEL: FIELD_MANAGER}}
    if previous is not None:
        pmeta = previous.get("metadata") or {}
        if pmeta.get("resourceVersion"):
            metadata["resourceVersion"] = pmeta["resourceVersion"]
        if pmeta.get("labels"):
            metadata["labels"] = {**pmeta["labels"], MANAGED_BY_LABEL: FIELD_MANAGER}
    if owner is not None:
        metadata["ownerReferences"] = [owner]
    if writer:
        metadata["annotations"] = {OWNER_ANNOTATION: writer}
    return {"apiVersion": LEASE_API_VERSION, "kind": "Lease", "metadata": metadata, "spec": spec}


def lease_expiry(lease: dict[str, Any] | None) -> dt.datetime | None:
    """When the lease runs out (renewTime, else acquireTime, + duration); None if it has neither."""
    if not lease:
        return None
    spec = lease.get("spec") or {}
    renewed = parse_time(spec.get("renewTime")) or parse_time(spec.get("acquireTime"))
    if renewed is None:
        return None
    return renewed + dt.timedelta(seconds=int(spec.get("leaseDurationSeconds") or 0))


# --- ownership ------------------------------------------------------------------------------------

def with_owner(obj: dict[str, Any], writer: str | None) -> dict[str, Any]:
    """`obj` (an entry as build_entry made it) recording `writer` in OWNER_ANNOTATION; unchanged when
    the writer is not known."""
    if not writer:
        return obj
    meta = obj["metadata"]
    return {**obj, "metadata": {**meta, "annotations": {**(meta.get("annotations") or {}),
                                                         OWNER_ANNOTATION: writer}}}


def owner_of(obj: dict[str, Any] | None) -> str | None:
    """The API username recorded on an entry or lease (None: none recorded, or no object)."""
    return (((obj or {}).get("metadata") or {}).get("annotations") or {}).get(OWNER_ANNOTATION) or None


def foreign_owner(writer: str | None, *objs: dict[str, Any] | None) -> str | None:
    """The first API username other than `writer` recorded on these objects: whose they are when this
    credential may not write them (with per-VM credentials the admission policy refuses it)."""
    if not writer:
        return None
    for obj in objs:
        owner = owner_of(obj)
        if owner is not None and owner != writer:
            return owner
    return None


@dataclass(frozen=True)
class Ownership:
    """Who may write an existing entry. `mine` False with `live` True is a conflict: hands off."""

    mine: bool
    live: bool
    holder: str | None
    expires: dt.datetime | None

    @property
    def conflict(self) -> bool:
        return not self.mine and self.live


def ownership(entry: dict[str, Any] | None, lease: dict[str, Any] | None, instance: str,
              now: dt.datetime) -> Ownership:
    """Decide from the entry's instance annotation and its lease whether this instance owns the entry.

    An entry without our annotation (another instance's, or one an admin wrote by hand) is someone
    else's; it stays theirs while its lease is live. No lease at all, or an expired one, makes it free to
    take over: a hand-written entry for this VM's own address is adopted, as istiod's would be.
    """
    annotations = ((entry or {}).get("metadata") or {}).get("annotations") or {}
    owner = annotations.get(INSTANCE_ANNOTATION)
    holder = ((lease or {}).get("spec") or {}).get("holderIdentity")
    expires = lease_expiry(lease)
    lease_live = expires is not None and expires > now
    if entry is None:
        # Only the lease can speak for an absent entry (the owner may be between delete and apply).
        return Ownership(mine=holder in (None, instance) or not lease_live, live=lease_live and
                         holder != instance, holder=holder, expires=expires)
    if owner == instance:
        # Our entry, but a live lease held by someone else means another VM claims this address.
        if holder not in (None, instance) and lease_live:
            return Ownership(False, True, holder, expires)
        return Ownership(True, False, instance, expires)
    claimant = holder or owner
    return Ownership(mine=not lease_live, live=lease_live, holder=claimant, expires=expires)


# --- condition ------------------------------------------------------------------------------------

def healthy_condition(healthy: bool, now: dt.datetime, previous: dict[str, Any] | None = None,
                      message: str = "") -> dict[str, Any]:
    """The `Healthy` condition istiod reads with health-checks-enabled; keeps the transition time."""
    status = "True" if healthy else "False"
    transition = format_time(now)
    for old in ((previous or {}).get("status") or {}).get("conditions") or []:
        if old.get("type") == "Healthy" and old.get("status") == status and old.get("lastTransitionTime"):
            transition = old["lastTransitionTime"]
    cond: dict[str, Any] = {"type": "Healthy", "status": status, "lastProbeTime": format_time(now),
                            "lastTransitionTime": transition,
                            "reason": "HealthCheckPassed" if healthy else "HealthCheckFailed"}
    if message:
        cond["message"] = message
    return cond


def status_patch(entry: dict[str, Any], condition: dict[str, Any]) -> dict[str, Any]:
    """An apply configuration for the status subresource holding only our condition."""
    meta = entry["metadata"]
    return {"apiVersion": API_VERSION, "kind": "WorkloadEntry",
            "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
            "status": {"conditions": [condition]}}


# --- drift --------------------------------------------------------------------------------------------

def drifted(desired: dict[str, Any], actual: dict[str, Any] | None) -> bool:
    """True when the live entry differs from what we would apply (spec, our labels/annotations, owner)."""
    if actual is None:
        return True
    if _canon(desired.get("spec")) != _canon(actual.get("spec")):
        return True
    dmeta, ameta = desired["metadata"], actual.get("metadata") or {}
    for key in ("labels", "annotations"):
        have = ameta.get(key) or {}
        if any(have.get(k) != v for k, v in (dmeta.get(key) or {}).items()):
            return True
    want_uids = {o["uid"] for o in dmeta.get("ownerReferences") or []}
    have_uids = {o.get("uid") for o in ameta.get("ownerReferences") or []}
    return not want_uids <= have_uids


def condition_of(entry: dict[str, Any] | None) -> str | None:
    for cond in ((entry or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Healthy":
            return cond.get("status")
    return None


def _canon(value: Any) -> str:
    return json.dumps(value or {}, sort_keys=True)
