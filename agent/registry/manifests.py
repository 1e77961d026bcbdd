"""`mesh-agent manifests`: the Kubernetes objects one group of VMs needs, as YAML for `kubectl apply -f -`.

WorkloadGroup, the agents' ServiceAccount with a least-privilege Role and RoleBinding, a ServiceEntry
selecting the group's entries, and the reaper's CronJob with its own ServiceAccount, Role and
RoleBinding. `build_manifests` is pure; `main` only prints.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

import yaml

from agent.registry.entry import API_VERSION, MANAGED_BY_LABEL

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

# What a mesh-agent needs, and nothing more. Server-side apply that creates an object is authorised
# as create as well as patch; nothing here can list or read other workloads' objects.
AGENT_RULES: list[dict[str, Any]] = [
    {"apiGroups": ["networking.istio.io"], "resources": ["workloadentries"],
     "verbs": ["get", "create", "patch", "delete"]},
    {"apiGroups": ["networking.istio.io"], "resources": ["workloadentries/status"],
     "verbs": ["get", "patch"]},
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
     "verbs": ["get", "create", "patch", "delete"]},
    {"apiGroups": ["networking.istio.io"], "resources": ["workloadgroups"],
     "verbs": ["get", "list", "watch"]},
]

REAPER_RULES: list[dict[str, Any]] = [
    {"apiGroups": ["networking.istio.io"], "resources": ["workloadentries"],
     "verbs": ["get", "list", "delete"]},
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "list", "delete"]},
]


def bundle_rules(service_account: str) -> list[dict[str, Any]]:
    """What bundle source `kubernetes` and the agent's own token renewal need in the group's namespace:
    istio tokens (and its own) for this one service account, and the mesh's root certificate."""
    return [
        {"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"],
         "resourceNames": [service_account]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "watch"],
         "resourceNames": ["istio-ca-root-cert"]},
    ]


def istio_read_rules(revision: str = "", gateway: str = "istio-eastwestgateway") -> list[dict[str, Any]]:
    """Optional (--read-istio-config): read the mesh config, the cluster name and the gateway's address
    in the istio namespace. Without it, bundle.kubernetes.static_dir supplies mesh.yaml and hosts."""
    suffix = f"-{revision}" if revision and revision != "default" else ""
    return [
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"],
         "resourceNames": [f"istio{suffix}", f"istio-sidecar-injector{suffix}"]},
        {"apiGroups": [""], "resources": ["services"], "verbs": ["get"], "resourceNames": [gateway]},
    ]


def _protocol(port_name: str) -> str:
    prefix = port_name.split("-", 1)[0].lower()
    return {"http": "HTTP", "http2": "HTTP2", "https": "HTTPS", "grpc": "GRPC", "tls": "TLS",
            "mongo": "MONGO", "redis": "REDIS", "mysql": "MYSQL"}.get(prefix, "TCP")


def parse_port(text: str) -> tuple[str, int]:
    name, sep, number = text.partition("=")
    if not sep or not name or not number.isdigit() or not 1 <= int(number) <= 65535:
        raise ValueError(f'--port expects NAME=PORT (e.g. http=8080), got "{text}"')
    if len(name) >= 63 or not re.match(r"^[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?$", name):
        raise ValueError(f'port name "{name}" must be letters, digits and "-"')
    return name, int(number)


def parse_probe(text: str) -> dict[str, Any]:
    """`http:PORT[/PATH]` or `tcp:PORT` -> a WorkloadGroup probe."""
    kind, _, rest = text.partition(":")
    port, slash, path = rest.partition("/")
    if not port.isdigit() or not 1 <= int(port) <= 65535 or kind not in ("http", "tcp"):
        raise ValueError(f'--probe expects http:PORT[/PATH] or tcp:PORT, got "{text}"')
    if kind == "http":
        return {"httpGet": {"port": int(port), "path": "/" + path if slash else "/"},
                "periodSeconds": 5, "failureThreshold": 3}
    return {"tcpSocket": {"port": int(port)}, "periodSeconds": 5, "failureThreshold": 3}


def build_manifests(*, group: str, namespace: str, service_account: str, ports: list[tuple[str, int]],
                    labels: dict[str, str] | None = None, network: str | None = None,
                    host: str | None = None, probe: dict[str, Any] | None = None,
                    reaper_image: str = "mesh-agent:latest", reaper_schedule: str = "* * * * *",
                    reaper_grace: str = "60s", read_istio_config: str | None = None,
                    revision: str = "") -> list[dict[str, Any]]:
    for what, value in (("group", group), ("namespace", namespace), ("service account", service_account)):
        if not _NAME.match(value) or len(value) > 63:
            raise ValueError(f'{what} "{value}" is not a valid Kubernetes name')
    if not ports:
        raise ValueError("at least one --port NAME=PORT is needed")
    sel = {"app": group, **(labels or {})}
    common = {MANAGED_BY_LABEL: "mesh-agent"}
    template: dict[str, Any] = {"serviceAccount": service_account, "ports": dict(ports)}
    if network:
        template["network"] = network
    wg_spec: dict[str, Any] = {"metadata": {"labels": dict(sel)}, "template": template}
    if probe:
        wg_spec["probe"] = probe
    agent_role = f"mesh-agent-{group}"
    reaper = f"mesh-agent-reaper-{group}"

    def meta(name: str) -> dict[str, Any]:
        return {"name": name, "namespace": namespace, "labels": dict(common)}

    istio_read: list[dict[str, Any]] = []
    if read_istio_config:
        reader = f"mesh-agent-{namespace}-{group}"
        istio_meta = {"name": reader, "namespace": read_istio_config, "labels": dict(common)}
        istio_read = [
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": istio_meta,
             "rules": istio_read_rules(revision)},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": dict(istio_meta),
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": reader},
             "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}]}]
    return [
        {"apiVersion": API_VERSION, "kind": "WorkloadGroup", "metadata": meta(group), "spec": wg_spec},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(service_account)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta(agent_role),
         "rules": AGENT_RULES + bundle_rules(service_account)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta(agent_role),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": agent_role},
         "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}]},
        *istio_read,
        {"apiVersion": API_VERSION, "kind": "ServiceEntry", "metadata": meta(group),
         "spec": {"hosts": [host or f"{group}.{namespace}.svc.cluster.local"],
                  "location": "MESH_INTERNAL", "resolution": "STATIC",
                  "ports": [{"name": n, "number": p, "protocol": _protocol(n), "targetPort": p}
                            for n, p in ports],
                  "workloadSelector": {"labels": dict(sel)}}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(reaper)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta(reaper),
         "rules": REAPER_RULES},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta(reaper),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": reaper},
         "subjects": [{"kind": "ServiceAccount", "name": reaper, "namespace": namespace}]},
        {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": meta(reaper),
         "spec": {"schedule": reaper_schedule, "concurrencyPolicy": "Forbid",
                  "successfulJobsHistoryLimit": 1, "failedJobsHistoryLimit": 3,
                  "jobTemplate": {"spec": {"backoffLimit": 0, "activeDeadlineSeconds": 300, "template": {
                      "metadata": {"labels": dict(common)},
                      "spec": {"serviceAccountName": reaper, "restartPolicy": "Never",
                               "containers": [{
                                   "name": "reap", "image": reaper_image,
                                   "args": ["reap", "--namespace", namespace, "--grace", reaper_grace],
                                   "securityContext": {"runAsNonRoot": True, "runAsUser": 65534,
                                                       "allowPrivilegeEscalation": False,
                                                       "readOnlyRootFilesystem": True,
                                                       "capabilities": {"drop": ["ALL"]}},
                                   "resources": {"requests": {"cpu": "10m", "memory": "64Mi"},
                                                 "limits": {"memory": "128Mi"}}}]}}}}}},
    ]


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("--group", required=True, help="WorkloadGroup name")
    parser.add_argument("--namespace", required=True, help="namespace of the group and its entries")
    parser.add_argument("--service-account", required=True, help="the agents' ServiceAccount")
    parser.add_argument("--port", action="append", default=[], metavar="NAME=PORT", required=True,
                        help="a port of the app (repeat); the name's prefix gives the protocol")
    parser.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                        help="extra label on the group's entries and the ServiceEntry selector")
    parser.add_argument("--network", help="the VMs' network, when it differs from the cluster's")
    parser.add_argument("--host", help="ServiceEntry host (default: GROUP.NAMESPACE.svc.cluster.local)")
    parser.add_argument("--probe", help="http:PORT[/PATH] or tcp:PORT readiness probe in the group")
    parser.add_argument("--reaper-image", default="mesh-agent:latest",
                        help="image with mesh-agent (default: mesh-agent:latest)")
    parser.add_argument("--reaper-schedule", default="* * * * *", help="the CronJob's schedule (default: "
                        "every minute)")
    parser.add_argument("--reaper-grace", default="60s", help="the reaper's --grace (default 60s)")
    parser.add_argument("--read-istio-config", metavar="ISTIO_NAMESPACE",
                        help="also let the agents read the mesh config, injector ConfigMap and gateway "
                        "Service in this namespace (bundle source kubernetes without static_dir)")
    parser.add_argument("--revision", default="", help="istio revision whose ConfigMaps they may read")


def main(args: argparse.Namespace) -> int:
    try:
        labels = {}
        for item in args.label:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f'--label expects KEY=VALUE, got "{item}"')
            labels[key] = value
        docs = build_manifests(group=args.group, namespace=args.namespace,
                               service_account=args.service_account,
                               ports=[parse_port(p) for p in args.port], labels=labels,
                               network=args.network, host=args.host,
                               probe=parse_probe(args.probe) if args.probe else None,
                               reaper_image=args.reaper_image, reaper_schedule=args.reaper_schedule,
                               reaper_grace=args.reaper_grace,
                               read_istio_config=args.read_istio_config, revision=args.revision)
    except ValueError as exc:
        print(f"mesh-agent manifests: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False, explicit_start=True))
    return 0
