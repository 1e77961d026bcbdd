"""Build the five bundle files from a WorkloadGroup and the mesh config, as `istioctl x workload entry
configure` does. Pure: objects and text in, file contents out; the cluster reads live in cluster_source.

What istioctl does, restated (and what we do where it would fail):
- mesh.yaml is `defaultConfig:` — the mesh config's defaultConfig, then the group's
  `proxy.istio.io/config` annotation (object metadata first, then spec.metadata) laid over it field by
  field (a field the annotation sets replaces the mesh's; proxyMetadata is merged key by key),
  discoveryAddress `istiod-<rev>.<ns>.svc:15012` for a revision when none is set, readinessProbe from the
  group's probe, and proxyMetadata extended with the workload's identity (canonical service and
  revision, namespace, service account, trust domain, cluster, mesh, network, ports, labels, DNS capture).
- cluster.env is that proxyMetadata plus ISTIO_INBOUND_PORTS, ISTIO_NAMESPACE, ISTIO_SERVICE,
  ISTIO_SERVICE_CIDR, ISTIO_LOCAL_EXCLUDE_PORTS, SERVICE_ACCOUNT (and CA_ADDR for a revision,
  ISTIO_SVC_IP when an address is given), `KEY=value` lines sorted, values quoted by istioctl's rule.
- hosts is `<gateway address> istiod[-<rev>].<ns>.svc` when the address is an IP, else empty.
- Where istioctl would crash or pick at random we decide: an empty service account means `default`;
  a missing spec.metadata/template is empty; ISTIO_INBOUND_PORTS lists ports by ascending number (Go's
  map order is random); a defaultConfig without proxyMetadata merges an annotation's into an empty map.
- Not reproduced: istioctl reads the mesh config through the ProxyConfig protobuf, which drops unknown
  fields and normalises some values; we keep fields as written (camelCasing snake_case keys at the
  top level) and drop only the zero values protobuf would not print.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent import safeload
from agent.bundle import goyaml
from agent.bundle.clusterenv import format_cluster_env  # one writer of istioctl's cluster.env format

PROXY_CONFIG_ANNOTATION = "proxy.istio.io/config"
CANONICAL_NAME = "service.istio.io/canonical-name"
CANONICAL_REVISION = "service.istio.io/canonical-revision"
ISTIOD_PORT = 15012
ROOT_CERT_CONFIGMAP = "istio-ca-root-cert"
ROOT_CERT_KEY = "root-cert.pem"
TOKEN_AUDIENCE = "istio-ca"
EAST_WEST_GATEWAY = "istio-eastwestgateway"
FILES = ("cluster.env", "mesh.yaml", "hosts", "root-cert.pem", "istio-token")

# ProxyConfig fields whose value is a protobuf message or wrapper: printed even when empty or zero.
_MESSAGE_FIELDS = {
    "drainDuration", "parentShutdownDuration", "discoveryRefreshDelay", "connectTimeout",
    "terminationDrainDuration", "fileFlushInterval", "tracing", "sds", "envoyAccessLogService",
    "envoyMetricsService", "readinessProbe", "proxyStatsMatcher", "concurrency",
    "holdApplicationUntilProxyStarts", "image", "privateKeyProvider", "proxyHeaders", "gatewayTopology",
}
# Enum fields whose first (zero) value protobuf does not print.
_ENUM_DEFAULTS = {"controlPlaneAuthPolicy": "NONE", "interceptionMode": "REDIRECT"}
_MAP_FIELDS = {"proxyMetadata", "runtimeValues"}


class GenerateError(ValueError):
    """The inputs cannot make a bundle (istioctl would refuse them too); the message says which."""


@dataclass(frozen=True)
class Options:
    """istioctl's command-line choices."""

    internal_ip: str | None = None   # --internalIP: ISTIO_SVC_IP
    external_ip: str | None = None   # --externalIP: ISTIO_SVC_IP and probe rewriting
    dns_capture: bool = True         # --capture-dns (istioctl's default is on)
    autoregister: bool = False       # --autoregister


@dataclass(frozen=True)
class Inputs:
    group: Mapping[str, Any]       # the WorkloadGroup object as the API returns it
    mesh: str | None               # the istio[-<rev>] ConfigMap's `mesh` (MeshConfig YAML), if read
    istio_namespace: str = "istio-system"
    revision: str = ""
    cluster_id: str = "Kubernetes"
    gateway_address: str | None = None
    token: str = ""
    root_cert: str = ""
    options: Options = Options()


# --- small rules ----------------------------------------------------------------------------------

def is_revisioned(revision: str) -> bool:
    return revision not in ("", "default")


def istiod_host(namespace: str, revision: str) -> str:
    name = f"istiod-{revision}" if is_revisioned(revision) else "istiod"
    return f"{name}.{namespace}.svc"


def istiod_address(namespace: str, revision: str) -> str:
    return f"{istiod_host(namespace, revision)}:{ISTIOD_PORT}"


def istio_configmap(revision: str) -> str:
    """The ConfigMap holding the mesh config for this revision."""
    return f"istio-{revision}" if is_revisioned(revision) else "istio"


def canonical_service(labels: Mapping[str, str], workload: str) -> tuple[str, str]:
    name = next((labels[k] for k in (CANONICAL_NAME, "app.kubernetes.io/name", "app") if k in labels),
                workload)
    rev = next((labels[k] for k in (CANONICAL_REVISION, "app.kubernetes.io/version", "version")
                if k in labels), "latest")
    return name, rev


def pod_ports_json(ports: Mapping[str, int]) -> str:
    """ISTIO_META_POD_PORTS: the ports as Kubernetes container ports, sorted by name."""
    items = []
    for name in sorted(ports):
        item: dict[str, Any] = {"name": name} if name else {}
        item["containerPort"] = int(ports[name])
        item["protocol"] = ""
        items.append(item)
    # Go keeps struct field order (name, containerPort, protocol); json.dumps keeps insertion order.
    import json

    text = json.dumps(items, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def hosts_file(address: str | None, namespace: str, revision: str) -> str:
    if address and _is_ip(address):
        return f"{address} {istiod_host(namespace, revision)}\n"
    return ""


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# --- proxy config ---------------------------------------------------------------------------------

def _camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def _strings(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise GenerateError(f"{where} must be a map of strings")
    out = {}
    for k, v in value.items():
        if not isinstance(v, str):
            raise GenerateError(f"{where}.{k} must be a string, got {v!r} (quote it)")
        out[str(k)] = v
    return out


def _drop_zero(value: Any) -> Any:
    """Nested message fields as protobuf prints them: zero scalars left out."""
    if isinstance(value, dict):
        return {str(k): _drop_zero(v) for k, v in value.items()
                if v is not None and not (v in ("", 0, False) and not isinstance(v, (dict, list)))}
    if isinstance(value, list):
        return [_drop_zero(v) for v in value]
    return value


def normalize_proxy_config(doc: Any, where: str) -> dict[str, Any]:
    """A ProxyConfig read from YAML, as protobuf would print it back (camelCase keys, no zero fields)."""
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise GenerateError(f"{where} must be a map (a ProxyConfig), got {type(doc).__name__}")
    out: dict[str, Any] = {}
    for raw_key, value in doc.items():
        key = _camel(str(raw_key))
        if value is None:
            continue
        if key in _MAP_FIELDS:
            out[key] = _strings(value, f"{where}.{key}")
        elif key in _MESSAGE_FIELDS:
            out[key] = _drop_zero(value) if isinstance(value, dict) else value
        elif value in ("", 0, False, [], {}) or _ENUM_DEFAULTS.get(key) == value:
            continue
        else:
            out[key] = _drop_zero(value)
    return out


def _load_yaml(text: str, where: str) -> Any:
    try:
        return safeload.load_yaml(text, where)
    except safeload.LoadError as exc:
        raise GenerateError(str(exc)) from None


def _probe(probe: Any) -> dict[str, Any] | None:
    if not probe:
        return None
    if not isinstance(probe, dict):
        raise GenerateError("spec.probe must be a map")
    return _drop_zero({_camel(str(k)): v for k, v in probe.items()})


@dataclass(frozen=True)
class _Group:
    name: str
    namespace: str
    annotations: dict[str, str]
    spec_annotations: dict[str, str]
    labels: dict[str, str]
    template_labels: dict[str, str]
    ports: dict[str, int]
    service_account: str
    network: str
    probe: dict[str, Any] | None


def _group(obj: Mapping[str, Any]) -> _Group:
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    smeta = spec.get("metadata") or {}
    tmpl = spec.get("template") or {}
    name, ns = meta.get("name"), meta.get("namespace")
    if not name or not ns:
        raise GenerateError("the WorkloadGroup needs metadata.name and metadata.namespace")
    ports = {}
    for pname, port in (tmpl.get("ports") or {}).items():
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise GenerateError(f"spec.template.ports.{pname} must be a port number, got {port!r}")
        ports[str(pname)] = port
    return _Group(
        name=name, namespace=ns,
        annotations=_strings(meta.get("annotations"), "metadata.annotations"),
        spec_annotations=_strings(smeta.get("annotations"), "spec.metadata.annotations"),
        labels=_strings(smeta.get("labels"), "spec.metadata.labels"),
        template_labels=_strings(tmpl.get("labels"), "spec.template.labels"),
        ports=ports,
        service_account=tmpl.get("serviceAccount") or "default",
        network=tmpl.get("network") or "",
        probe=_probe(spec.get("probe")))


def service_account(group: Mapping[str, Any]) -> str:
    """The service account the group's workloads run as (the token is minted for it)."""
    return _group(group).service_account


def proxy_config(inp: Inputs) -> dict[str, Any]:
    """mesh.yaml's defaultConfig for these inputs."""
    g = _group(inp.group)
    mesh = _load_yaml(inp.mesh, "the mesh config") if inp.mesh else {}
    if mesh is None:
        mesh = {}
    if not isinstance(mesh, dict):
        raise GenerateError("the mesh config must be a map (a MeshConfig)")
    default_key = "defaultConfig" if "defaultConfig" in mesh else "default_config"
    config = {"proxyMetadata": {}} if default_key not in mesh else \
        normalize_proxy_config(mesh[default_key], "defaultConfig")
    trust_domain = mesh.get("trustDomain", mesh.get("trust_domain")) or ""
    if not isinstance(trust_domain, str):
        raise GenerateError("the mesh config's trustDomain must be a string")

    if is_revisioned(inp.revision) and not config.get("discoveryAddress"):
        config["discoveryAddress"] = istiod_address(inp.istio_namespace, inp.revision)

    metadata = dict(config.get("proxyMetadata") or {})
    for where, notes in (("metadata", g.annotations), ("spec.metadata", g.spec_annotations)):
        if PROXY_CONFIG_ANNOTATION in notes:
            label = f"the {where} annotation {PROXY_CONFIG_ANNOTATION}"
            overlay = normalize_proxy_config(_load_yaml(notes[PROXY_CONFIG_ANNOTATION], label), label)
            config.update(overlay)
            metadata.update(config.get("proxyMetadata") or {})
    config["proxyMetadata"] = metadata

    labels = {**g.labels, **g.template_labels}
    if g.probe is not None:
        config["readinessProbe"] = g.probe
    else:
        config.pop("readinessProbe", None)

    name, revision = canonical_service(labels, g.name)
    metadata["CANONICAL_SERVICE"], metadata["CANONICAL_REVISION"] = name, revision
    metadata["POD_NAMESPACE"] = g.namespace
    metadata["SERVICE_ACCOUNT"] = g.service_account
    metadata["TRUST_DOMAIN"] = trust_domain
    metadata["ISTIO_META_CLUSTER_ID"] = inp.cluster_id
    mesh_id = config.get("meshId") or ""
    metadata["ISTIO_META_MESH_ID"] = mesh_id if isinstance(mesh_id, str) else str(mesh_id)
    metadata["ISTIO_META_NETWORK"] = g.network
    if g.ports:
        metadata["ISTIO_META_POD_PORTS"] = pod_ports_json(g.ports)
    metadata["ISTIO_META_WORKLOAD_NAME"] = g.name
    labels[CANONICAL_NAME], labels[CANONICAL_REVISION] = name, revision
    metadata["ISTIO_METAJSON_LABELS"] = goyaml.go_json(labels)
    if inp.options.dns_capture:
        metadata["ISTIO_META_DNS_CAPTURE"] = "true"
    if inp.options.autoregister:
        metadata["ISTIO_META_AUTO_REGISTER_GROUP"] = g.name
    return config


def cluster_env(inp: Inputs, config: Mapping[str, Any]) -> dict[str, str]:
    """cluster.env's keys and values (proxyMetadata, then the workload's own settings over it)."""
    g = _group(inp.group)
    ports = [str(p) for _, p in sorted(g.ports.items(), key=lambda kv: (kv[1], kv[0]))]
    status_port = config.get("statusPort") or 0
    try:
        status_port = int(status_port)
    except (TypeError, ValueError):
        raise GenerateError(f"statusPort must be a number, got {status_port!r}") from None
    exclude = "22,15090,15021"
    if status_port not in (15090, 15021):
        exclude += f",{status_port}" if status_port else ",15020"
    env = dict(config.get("proxyMetadata") or {})
    env.update({
        "ISTIO_INBOUND_PORTS": ",".join(ports) if ports else "*",
        "ISTIO_NAMESPACE": g.namespace,
        "ISTIO_SERVICE": f"{g.name}.{g.namespace}",
        "ISTIO_SERVICE_CIDR": "*",
        "ISTIO_LOCAL_EXCLUDE_PORTS": exclude,
        "SERVICE_ACCOUNT": g.service_account,
    })
    if is_revisioned(inp.revision):
        env["CA_ADDR"] = istiod_address(inp.istio_namespace, inp.revision)
    if inp.options.internal_ip:
        env["ISTIO_SVC_IP"] = inp.options.internal_ip
    elif inp.options.external_ip:
        env["ISTIO_SVC_IP"] = inp.options.external_ip
        env["REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION"] = "true"
    return env


_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def generate(inp: Inputs) -> dict[str, bytes]:
    """The five files, by name, exactly as istioctl writes them for the same inputs."""
    if inp.options.internal_ip and inp.options.external_ip:
        raise GenerateError("internal_ip and external_ip are mutually exclusive")
    if not _NAME.match(inp.istio_namespace):
        raise GenerateError(f'istio namespace "{inp.istio_namespace}" is not a valid namespace name')
    config = proxy_config(inp)
    env = cluster_env(inp, config)
    return {
        "cluster.env": format_cluster_env(env).encode(),
        "mesh.yaml": goyaml.dump({"defaultConfig": config}).encode(),
        "hosts": hosts_file(inp.gateway_address, inp.istio_namespace, inp.revision).encode(),
        "root-cert.pem": inp.root_cert.encode(),
        "istio-token": inp.token.encode(),
    }
