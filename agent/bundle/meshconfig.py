"""The mesh's settings for this VM: mesh.yaml (the ProxyConfig) and workloadgroup.yaml, both checked for
the shape Istio requires and against cluster.env, and the readiness probe they carry (an exec probe is
refused unless bundle.allow_exec_probe). Pure; problems are appended as `file: message`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from agent.health.config import ProbeConfig


def is_str_map(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())


def int_in(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


# --- mesh.yaml and the readiness probe ------------------------------------------------------------

def probe_from_istio(p: Any, where: str, problems: list[str]) -> ProbeConfig | None:
    """Istio's ReadinessProbe (camelCase, as in mesh.yaml and the WorkloadGroup) as our ProbeConfig,
    through the health package's converter (the one place that knows the API's defaults)."""
    from agent.health.probe_spec import ProbeSpecError
    from agent.health.probe_spec import probe_from_istio as convert

    try:
        return convert(p, where)
    except ProbeSpecError as exc:
        problems.append(str(exc))
        return None


def check_mesh_config(doc: Any, problems: list[str], file: str = "mesh.yaml", *,
                      allow_exec: bool = False) -> tuple[dict, ProbeConfig | None]:
    """The defaultConfig (ProxyConfig) and its readinessProbe, if any. An exec probe is refused unless
    allow_exec (bundle.allow_exec_probe): a bundle must not make this machine run a command."""
    if not isinstance(doc, dict):
        problems.append(f"{file}: expected a mapping with defaultConfig")
        return {}, None
    pc = doc.get("defaultConfig")
    if not isinstance(pc, dict):
        problems.append(f"{file}: defaultConfig: expected a mapping (a ProxyConfig)")
        return {}, None
    md = pc.get("proxyMetadata")
    if md is not None and not is_str_map(md):
        problems.append(f"{file}: defaultConfig.proxyMetadata: expected a map of strings")
    da = pc.get("discoveryAddress")
    if da is not None and (not isinstance(da, str) or ":" not in da):
        problems.append(f"{file}: defaultConfig.discoveryAddress: expected host:port, got {da!r}")
    probe = None
    if pc.get("readinessProbe") is not None:
        probe = probe_from_istio(pc["readinessProbe"], f"{file}: defaultConfig.readinessProbe", problems)
        probe = refuse_exec(probe, f"{file}: defaultConfig.readinessProbe", allow_exec, problems)
    return pc, probe


def refuse_exec(probe: ProbeConfig | None, where: str, allow_exec: bool,
                 problems: list[str]) -> ProbeConfig | None:
    from agent.health.probe_spec import exec_refusal

    if probe is not None and probe.exec is not None and not allow_exec:
        problems.append(exec_refusal(where))
        return None
    return probe


# --- workloadgroup.yaml ---------------------------------------------------------------------------

_WG_VERSIONS = ("networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def check_workload_group(doc: Any, env: Mapping[str, str], problems: list[str], warnings: list[str],
                         file: str = "workloadgroup.yaml", *, allow_exec: bool = False) -> dict | None:
    """A structural check of the WorkloadGroup (the shape the CRD schema requires), and its consistency
    with cluster.env. The API server does the full schema validation when the group is applied."""
    before = len(problems)
    if not isinstance(doc, dict):
        problems.append(f"{file}: expected a WorkloadGroup object")
        return None
    if doc.get("apiVersion") not in _WG_VERSIONS:
        problems.append(f"{file}: apiVersion must be one of {', '.join(_WG_VERSIONS)}, "
                        f"got {doc.get('apiVersion')!r}")
    if doc.get("kind") != "WorkloadGroup":
        problems.append(f"{file}: kind must be WorkloadGroup, got {doc.get('kind')!r}")
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    if not isinstance(name, str) or not _DNS_SUBDOMAIN.fullmatch(name):
        problems.append(f"{file}: metadata.name must be a DNS subdomain name, got {name!r}")
    ns = meta.get("namespace") if isinstance(meta, dict) else None
    if ns is not None and (not isinstance(ns, str) or not _DNS_LABEL.fullmatch(ns)):
        problems.append(f"{file}: metadata.namespace must be a DNS label, got {ns!r}")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        problems.append(f"{file}: spec: expected a mapping")
        return None
    for k in spec:
        if k not in ("metadata", "template", "probe"):
            problems.append(f"{file}: spec.{k}: unknown field")
    md = spec.get("metadata")
    if md is not None:
        if not isinstance(md, dict):
            problems.append(f"{file}: spec.metadata: expected a mapping")
        else:
            for k in ("labels", "annotations"):
                if md.get(k) is not None and not is_str_map(md[k]):
                    problems.append(f"{file}: spec.metadata.{k}: expected a map of strings")
    tpl = spec.get("template")
    if not isinstance(tpl, dict):
        problems.append(f"{file}: spec.template: expected a mapping (a WorkloadEntry without address)")
    else:
        allowed = {"address", "ports", "labels", "network", "locality", "weight", "serviceAccount"}
        for k in tpl:
            if k not in allowed:
                problems.append(f"{file}: spec.template.{k}: unknown field")
        if tpl.get("address"):
            problems.append(f"{file}: spec.template.address: must be empty in a WorkloadGroup")
        ports = tpl.get("ports")
        if ports is not None:
            if not isinstance(ports, dict):
                problems.append(f"{file}: spec.template.ports: expected a map of name to port")
            else:
                for pname, pv in ports.items():
                    if not int_in(pv, 1, 65535):
                        problems.append(f"{file}: spec.template.ports.{pname}: expected 1..65535, got {pv!r}")
        if tpl.get("labels") is not None and not is_str_map(tpl["labels"]):
            problems.append(f"{file}: spec.template.labels: expected a map of strings")
        for k in ("network", "locality", "serviceAccount"):
            if tpl.get(k) is not None and not isinstance(tpl[k], str):
                problems.append(f"{file}: spec.template.{k}: expected a string")
        if tpl.get("weight") is not None and not int_in(tpl["weight"], 0, 4294967295):
            problems.append(f"{file}: spec.template.weight: expected 0..4294967295")
        sa, want_sa = tpl.get("serviceAccount"), env.get("SERVICE_ACCOUNT")
        if isinstance(sa, str) and want_sa is not None and sa != want_sa:
            problems.append(f"{file}: spec.template.serviceAccount {sa!r} differs from cluster.env "
                            f"SERVICE_ACCOUNT {want_sa!r}")
    if spec.get("probe") is not None:
        refuse_exec(probe_from_istio(spec["probe"], f"{file}: spec.probe", problems), f"{file}: spec.probe",
                     allow_exec, problems)
    if isinstance(ns, str) and env.get("POD_NAMESPACE") not in (None, ns):
        problems.append(f"{file}: metadata.namespace {ns!r} differs from cluster.env POD_NAMESPACE "
                        f"{env.get('POD_NAMESPACE')!r}")
    wname = env.get("ISTIO_META_WORKLOAD_NAME")
    if isinstance(name, str) and wname is not None and name != wname:
        warnings.append(f"{file}: metadata.name {name!r} differs from cluster.env ISTIO_META_WORKLOAD_NAME "
                        f"{wname!r}")
    return doc if len(problems) == before else None

