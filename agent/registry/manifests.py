"""`mesh-agent manifests`: the Kubernetes objects one group of VMs needs, as YAML for `kubectl apply -f -`.

WorkloadGroup, the agents' ServiceAccount with a least-privilege Role and RoleBinding, a ServiceEntry
selecting the group's entries, and the reaper's CronJob with its own ServiceAccount, Role and
RoleBinding, and a ValidatingAdmissionPolicy with its binding narrowing what RBAC cannot: the
agents may write only their own group's entries and leases. `build_manifests` is pure; `main` only
prints.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

import yaml

from agent.bundle.generate import TOKEN_AUDIENCE
from agent.registry.entry import API_VERSION, FIELD_MANAGER, INSTANCE_ANNOTATION, MANAGED_BY_LABEL, OWNER_ANNOTATION
from agent.registry.identity_manifests import (
    IDENTITY_PROVIDERS,
    authentication_configuration,
    cel_str,
    identity_authenticator,
    identity_bindings,
    identity_group,
    owner_policy,
)

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
    # Events about the entry (registry.events): created, then a series patched; never read.
    {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
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


def _has_labels(path: str, labels: dict[str, str]) -> str:
    """CEL: the map at `path` exists and holds every one of `labels` (more are allowed)."""
    terms = [f"{cel_str(k)} in {path} && {path}[{cel_str(k)}] == {cel_str(v)}" for k, v in sorted(labels.items())]
    return f"has({path}) && " + " && ".join(terms)


def policy_name(namespace: str, group: str) -> str:
    """Policies are cluster-scoped: the name carries the namespace."""
    return f"mesh-agent-{namespace}-{group}"


def owner_policy_name(namespace: str, group: str) -> str:
    """The per-VM policy's: a dot, which no group name has, keeps it apart from every group's."""
    return f"{policy_name(namespace, group)}.per-vm"


# What the policies judge: every write of entries (and their status) and leases.
POLICY_RULES: list[dict[str, Any]] = [
    {"apiGroups": ["networking.istio.io"], "apiVersions": ["*"], "operations": ["CREATE", "UPDATE", "DELETE"],
     "resources": ["workloadentries", "workloadentries/status"]},
    {"apiGroups": ["coordination.k8s.io"], "apiVersions": ["*"], "operations": ["CREATE", "UPDATE", "DELETE"],
     "resources": ["leases"]}]


def admission_policy(*, group: str, namespace: str, service_account: str, selector: dict[str, str],
                     identity: bool = False) -> list[dict[str, Any]]:
    """A ValidatingAdmissionPolicy and its binding. RBAC lets the group's agents write any WorkloadEntry
    and Lease in the namespace (it cannot name objects that do not exist yet); this lets them write
    only what agent.registry.entry builds for their own group. WorkloadEntries: named `<group>-...`,
    spec.serviceAccount the group's, owned by the group's WorkloadGroup (if owned at all), the group's
    selector labels in spec.labels and metadata.labels, managed by mesh-agent, an instance annotation;
    an entry changed must already be the group's; a deleted one is judged as it was (oldObject).
    Leases: named `<group>-...`, managed by mesh-agent (before and after a change), owned (if at all)
    by the WorkloadEntry of the same name. The reaper's service account is not matched. With
    `identity`, also the per-VM policy (identity_manifests.owner_policy): a VM authenticated with its
    own cloud identity writes only the entries and leases that name it as their owner."""
    name = policy_name(namespace, group)
    agent_user = f"system:serviceaccount:{namespace}:{service_account}"
    reaper_user = f"system:serviceaccount:{namespace}:mesh-agent-reaper-{group}"
    who = f"request.userInfo.username == {cel_str(agent_user)}"
    if identity:
        who += f" || {cel_str(identity_group(namespace, group))} in request.userInfo.groups"
    prefix = cel_str(f"{group}-")
    obj, old = "variables.obj", "oldObject"
    managed = {MANAGED_BY_LABEL: FIELD_MANAGER}
    shown = ", ".join(f"{k}={v}" for k, v in sorted(selector.items()))

    def entry_rule(expression: str, message: str) -> dict[str, str]:
        return {"expression": f"!variables.isEntry || ({expression})", "message": message}

    def lease_rule(expression: str, message: str) -> dict[str, str]:
        return {"expression": f"variables.isEntry || ({expression})", "message": message}

    def sa_check(o: str) -> str:
        return f"has({o}.spec.serviceAccount) && {o}.spec.serviceAccount == {cel_str(service_account)}"

    annotation = cel_str(INSTANCE_ANNOTATION)
    validations = [
        entry_rule(f"{obj}.metadata.name.startsWith({prefix})",
                   f"a VM of group {group} may only write WorkloadEntries named {group}-..."),
        entry_rule(sa_check(obj), f"the WorkloadEntry's spec.serviceAccount must be {service_account}"),
        entry_rule(f"!has({obj}.metadata.ownerReferences) || {obj}.metadata.ownerReferences.all(r, "
                   f"r.kind == 'WorkloadGroup' && r.name == {cel_str(group)} && "
                   "r.apiVersion.startsWith('networking.istio.io/'))",
                   f"the WorkloadEntry may be owned only by WorkloadGroup {group}"),
        entry_rule(_has_labels(f"{obj}.spec.labels", selector),
                   f"the WorkloadEntry's spec.labels must carry the group's labels {shown}"),
        entry_rule(_has_labels(f"{obj}.metadata.labels", {**selector, **managed}),
                   f"the WorkloadEntry's labels must carry the group's labels {shown} and "
                   f"{MANAGED_BY_LABEL}={FIELD_MANAGER}"),
        entry_rule(f"has({obj}.metadata.annotations) && {annotation} in {obj}.metadata.annotations && "
                   f"{obj}.metadata.annotations[{annotation}] != ''",
                   f"the WorkloadEntry must name its VM in annotation {INSTANCE_ANNOTATION}"),
        entry_rule(f"request.operation != 'UPDATE' || ({sa_check(old)} && "
                   f"{_has_labels(f'{old}.spec.labels', selector)})",
                   f"a VM of group {group} may not take over another group's WorkloadEntry"),
        lease_rule(f"{obj}.metadata.name.startsWith({prefix})",
                   f"a VM of group {group} may only write Leases named {group}-..."),
        lease_rule(_has_labels(f"{obj}.metadata.labels", managed),
                   f"the Lease must carry label {MANAGED_BY_LABEL}={FIELD_MANAGER}"),
        lease_rule(f"request.operation != 'UPDATE' || ({_has_labels(f'{old}.metadata.labels', managed)})",
                   "a VM may not take over a Lease that mesh-agent does not manage"),
        lease_rule(f"!has({obj}.metadata.ownerReferences) || {obj}.metadata.ownerReferences.all(r, "
                   f"r.kind == 'WorkloadEntry' && r.name == {obj}.metadata.name)",
                   "the Lease may be owned only by the WorkloadEntry of its name"),
    ]
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name, "labels": dict(managed)},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [dict(r) for r in POLICY_RULES]},
            "matchConditions": [
                {"name": "group-agents", "expression": who},
                {"name": "not-the-reaper", "expression": f"request.userInfo.username != {cel_str(reaper_user)}"}],
            "variables": [
                {"name": "obj", "expression": "request.operation == 'DELETE' ? oldObject : object"},
                {"name": "isEntry", "expression": "request.resource.resource == 'workloadentries'"}],
            "validations": validations,
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name, "labels": dict(managed)},
        "spec": {"policyName": name, "validationActions": ["Deny"],
                 "matchResources": {"namespaceSelector": {
                     "matchLabels": {"kubernetes.io/metadata.name": namespace}}}},
    }
    fenced = [policy, binding]
    if identity:
        # Per-VM identities can be told apart: each VM only its own entries and leases.
        fenced += owner_policy(namespace=namespace, group=group, name=owner_policy_name(namespace, group),
                               resource_rules=[dict(r) for r in POLICY_RULES],
                               owner_annotation=OWNER_ANNOTATION, labels=managed, token_audience=TOKEN_AUDIENCE)
    return fenced


def build_manifests(*, group: str, namespace: str, service_account: str, ports: list[tuple[str, int]],
                    labels: dict[str, str] | None = None, network: str | None = None,
                    host: str | None = None, probe: dict[str, Any] | None = None,
                    reaper_image: str = "mesh-agent:latest", reaper_schedule: str = "* * * * *",
                    reaper_grace: str = "60s", read_istio_config: str | None = None,
                    revision: str = "", identity: bool = False) -> list[dict[str, Any]]:
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
        *admission_policy(group=group, namespace=namespace, service_account=service_account, selector=sel,
                          identity=identity),
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
    ident = parser.add_argument_group("cloud identity (docs/identity.md)")
    ident.add_argument("--identity", choices=IDENTITY_PROVIDERS,
                       help="the VMs authenticate with their cloud's identity token: also bind the Roles to "
                       "group mesh-vm:NAMESPACE:GROUP (which the admission policy then confines too), fence each "
                       "VM to its own entries and leases (a second policy) and write the API server's jwt "
                       "authenticator")
    ident.add_argument("--authn-config", metavar="FILE",
                       help="where to write the AuthenticationConfiguration (with --identity)")
    ident.add_argument("--audience", help="the audience the agents ask for (identity.audience)")
    ident.add_argument("--issuer", help="issuer URL (aws: the account's; oidc: yours; gcp, azure: default)")
    ident.add_argument("--issuer-ca", metavar="FILE", help="CA of a self-managed issuer (PEM)")
    ident.add_argument("--project", help="GCP project id, Azure subscription id or AWS account id")
    ident.add_argument("--tenant", help="Azure tenant id")
    ident.add_argument("--resource-group", help="Azure resource group the VMs must be in")
    ident.add_argument("--image", help="GCP: licence id the VM's image must carry")
    ident.add_argument("--role", help="AWS: the instance role's name the token must be for")
    ident.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                       help="AWS: principal tag the role must have (repeat)")
    ident.add_argument("--require", action="append", default=[], metavar="CLAIM=VALUE",
                       help="oidc: a claim the token must carry with this value (repeat)")
    ident.add_argument("--username-claim", default="sub", help="oidc: the claim naming the instance")


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
                               read_istio_config=args.read_istio_config, revision=args.revision,
                               identity=bool(getattr(args, "identity", None)))
        authn = identity_from_args(args, docs) if getattr(args, "identity", None) else None
    except ValueError as exc:
        print(f"mesh-agent manifests: {exc}", file=sys.stderr)
        return 2
    if authn is not None:
        bindings, config = authn
        docs = docs + bindings
        try:
            with open(args.authn_config, "w", encoding="utf-8") as f:
                yaml.safe_dump(config, f, sort_keys=False)
        except OSError as exc:
            print(f"mesh-agent manifests: {args.authn_config}: {exc.strerror}", file=sys.stderr)
            return 1
    sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False, explicit_start=True))
    return 0


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f'{flag} expects KEY=VALUE, got "{item}"')
        out[key] = value
    return out


def identity_from_args(args: argparse.Namespace, docs: list[dict[str, Any]]) \
        -> tuple[list[dict[str, Any]], dict[str, Any]]:
    if not args.authn_config:
        raise ValueError("--identity needs --authn-config FILE (where the API server's "
                         "AuthenticationConfiguration is written)")
    ca = None
    if args.issuer_ca:
        try:
            with open(args.issuer_ca, encoding="utf-8") as f:
                ca = f.read()
        except OSError as exc:
            raise ValueError(f"--issuer-ca {args.issuer_ca}: {exc.strerror}") from None
    jwt = identity_authenticator(provider=args.identity, namespace=args.namespace, group=args.group,
                                 audience=args.audience or "", issuer=args.issuer, project=args.project,
                                 tenant=args.tenant, resource_group=args.resource_group, image=args.image,
                                 role=args.role, tags=_pairs(args.tag, "--tag"),
                                 require=_pairs(args.require, "--require"), username_claim=args.username_claim,
                                 issuer_ca=ca)
    return identity_bindings(docs, args.namespace, args.group), authentication_configuration(jwt)
