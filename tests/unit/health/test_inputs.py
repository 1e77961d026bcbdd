"""The one decision of which probe and ports the app monitor checks (agent.health.inputs.resolve)."""

from __future__ import annotations

import os

from agent.health.config import AppConfig, ExecProbe, HttpGetProbe, ProbeConfig, TcpSocketProbe
from agent.health.inputs import resolve

GROUP = {"spec": {"probe": {"httpGet": {"port": 8080, "path": "/ready"}, "periodSeconds": 7},
                  "template": {"ports": {"http": 8080, "grpc": 9090}}}}
MESH = ProbeConfig(tcp_socket=TcpSocketProbe(port=9000))


def decide(app: AppConfig | None = None, *, group: dict | None = None, mesh: ProbeConfig | None = None,
           inbound: str | None = None, allow_exec: bool = False):
    return resolve(app or AppConfig(), group=group, mesh_readiness=mesh, inbound_ports=inbound, allow_exec=allow_exec,
                   user="nobody")


def test_agent_yaml_wins_over_the_group_and_the_bundle() -> None:
    own = ProbeConfig(tcp_socket=TcpSocketProbe(port=7000))
    d = decide(AppConfig(ports=(7000,), probe=own), group=GROUP, mesh=MESH, inbound="6000")
    assert d.probe == own and d.ports == (7000,) and not d.problems


def test_the_group_wins_over_mesh_yaml_and_cluster_env() -> None:
    d = decide(group=GROUP, mesh=MESH, inbound="6000")
    assert d.probe is not None and d.probe.http_get == HttpGetProbe(port=8080, path="/ready")
    assert d.probe.period == 7.0
    assert d.ports == (8080, 9090)


def test_without_a_group_the_bundles_mesh_probe_and_inbound_ports() -> None:
    d = decide(group={"spec": {}}, mesh=MESH, inbound="8080, 8081,*")
    assert d.probe == MESH and d.ports == (8080, 8081)


def test_ports_star_names_no_port_and_then_there_is_nothing_to_check() -> None:
    d = decide(inbound="*")
    assert d.probe is None and d.ports == () and not d.usable
    assert decide(inbound="*", mesh=MESH).usable  # a probe alone is enough


def test_a_broken_group_probe_is_reported_and_the_next_source_is_used() -> None:
    bad = {"spec": {"probe": {"tcpSocket": {}}}}
    d = decide(group=bad, mesh=MESH)
    assert d.probe == MESH
    assert len(d.problems) == 1 and "WorkloadGroup spec.probe.tcpSocket.port" in d.problems[0]


def test_an_exec_probe_from_the_mesh_is_refused_unless_allowed() -> None:
    group = {"spec": {"probe": {"exec": {"command": ["/bin/true"]}}}}
    d = decide(group=group, mesh=MESH)
    assert d.probe == MESH and "an exec probe from the mesh is refused" in d.problems[0]
    allowed = decide(group=group, allow_exec=True)
    assert allowed.probe is not None and allowed.probe.exec is not None and not allowed.problems
    argv = allowed.probe.exec.command
    assert argv[-1] == "/bin/true" and "--no-new-privs" in argv
    if os.geteuid() == 0:
        assert any(a.startswith("--reuid=") for a in argv)  # never as root


def test_agent_yamls_own_exec_probe_is_not_confined() -> None:
    own = ProbeConfig(exec=ExecProbe(command=("/bin/true",)))
    assert decide(AppConfig(probe=own), group=GROUP).probe == own


def test_the_same_inputs_decide_the_same() -> None:
    """The health part re-applies only when the decision changes; equal inputs must compare equal."""
    assert decide(group=GROUP, mesh=MESH) == decide(group=GROUP, mesh=MESH)
    assert decide(group=GROUP, mesh=MESH) != decide(group={"spec": {}}, mesh=MESH)
