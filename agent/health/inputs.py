"""What the app monitor checks: the one decision of which probe and which ports, made the same way at
start, when the WorkloadGroup changes and on reload. Pure (apart from looking up sidecar.user when an
exec probe from the mesh is allowed), so every precedence rule is unit-tested without I/O.

    probe: agent.yaml's app.probe, else the WorkloadGroup's spec.probe (as the API last showed it, else
           the bundle's workloadgroup.yaml), else mesh.yaml's defaultConfig.readinessProbe, else none
           (a TCP check on every app port);
    ports: agent.yaml's app.ports, else the group template's ports, else cluster.env's ISTIO_INBOUND_PORTS.

A probe from the mesh runs only as agent.yaml allows: an exec probe is refused unless
bundle.allow_exec_probe, and then runs as sidecar.user. A probe the mesh got wrong is reported and the
next source in the order is used.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.health import probe_spec
from agent.health.config import AppConfig, ProbeConfig


@dataclass(frozen=True)
class HealthInputs:
    probe: ProbeConfig | None
    ports: tuple[int, ...]
    problems: tuple[str, ...] = ()  # one line each, for the journal and status.json's errors

    @property
    def usable(self) -> bool:
        """Something to check: a probe, or at least one port for the default TCP check."""
        return self.probe is not None or bool(self.ports)


def resolve(app: AppConfig, *, group: Mapping[str, Any] | None, mesh_readiness: ProbeConfig | None,
            inbound_ports: str | None, allow_exec: bool, user: str | None,
            group_where: str = "WorkloadGroup spec.probe") -> HealthInputs:
    """`group`: the WorkloadGroup object (the API's, else the bundle's); `mesh_readiness`: the bundle's
    mesh.yaml readinessProbe; `inbound_ports`: cluster.env's ISTIO_INBOUND_PORTS."""
    problems: list[str] = []
    spec = (group or {}).get("spec") or {}
    template = spec.get("template") if isinstance(spec, Mapping) else None
    template_ports = template.get("ports") if isinstance(template, Mapping) else None
    ports = probe_spec.app_ports(app.ports, template_ports if isinstance(template_ports, Mapping) else None,
                             inbound_ports)

    def from_mesh(probe: ProbeConfig | None, where: str) -> ProbeConfig | None:
        try:
            return probe_spec.mesh_probe(probe, where, allow_exec=allow_exec, user=user)
        except probe_spec.ProbeSpecError as exc:
            problems.append(str(exc))
            return None

    probe = app.probe
    if probe is None and isinstance(spec, Mapping) and spec.get("probe"):
        try:
            probe = from_mesh(probe_spec.probe_from_istio(spec["probe"], group_where), group_where)
        except probe_spec.ProbeSpecError as exc:
            problems.append(str(exc))
    if probe is None:
        probe = from_mesh(mesh_readiness, "mesh.yaml: defaultConfig.readinessProbe")
    return HealthInputs(probe, ports, tuple(problems))
