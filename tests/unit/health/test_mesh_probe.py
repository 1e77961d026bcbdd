"""An exec probe that comes from the mesh (mesh.yaml, workloadgroup.yaml, the WorkloadGroup) would run a
command on this machine: refused unless bundle.allow_exec_probe, and then run through setpriv as
sidecar.user with no new privileges, never as root."""

from __future__ import annotations

import os
import pwd
import time

import pytest

from agent.bundle.model import BundleError, parse_bundle
from agent.health import probe_spec, probes
from agent.health.config import ExecProbe, ProbeConfig, TcpSocketProbe
from devkit import bundles as kit

EXEC = ProbeConfig(exec=ExecProbe(("/bin/sh", "-c", "id > /tmp/x")))
NOBODY = pwd.getpwnam("nobody")


def test_exec_probe_from_the_mesh_is_refused_by_default() -> None:
    with pytest.raises(probe_spec.ProbeSpecError) as err:
        probe_spec.mesh_probe(EXEC, "WorkloadGroup spec.probe", allow_exec=False, user="istio-proxy")
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith("WorkloadGroup spec.probe.exec: an exec probe from the mesh is refused")
    assert "bundle.allow_exec_probe" in text


def test_other_probes_and_no_probe_pass_unchanged() -> None:
    tcp = ProbeConfig(tcp_socket=TcpSocketProbe(port=80))
    assert probe_spec.mesh_probe(tcp, "p", allow_exec=False, user=None) is tcp
    assert probe_spec.mesh_probe(None, "p", allow_exec=False, user=None) is None


def test_allowed_as_root_it_runs_as_the_user_without_new_privileges() -> None:
    got = probe_spec.mesh_probe(EXEC, "p", allow_exec=True, user="nobody", euid=0)
    assert got is not None and got.exec is not None
    assert got.exec.command == (probe_spec.SETPRIV, "--no-new-privs", f"--reuid={NOBODY.pw_uid}",
                                f"--regid={NOBODY.pw_gid}", "--init-groups", "--", *EXEC.exec.command)


def test_allowed_but_never_as_root_nor_an_unknown_user() -> None:
    with pytest.raises(probe_spec.ProbeSpecError, match="is root; an exec probe from the mesh never runs as root"):
        probe_spec.mesh_probe(EXEC, "p", allow_exec=True, user="root", euid=0)
    with pytest.raises(probe_spec.ProbeSpecError, match="does not exist"):
        probe_spec.mesh_probe(EXEC, "p", allow_exec=True, user="no-such-user-here", euid=0)
    with pytest.raises(probe_spec.ProbeSpecError, match="never run as root"):
        probe_spec.mesh_probe(EXEC, "p", allow_exec=True, user=None, euid=0)


def test_not_root_it_keeps_the_agents_user_with_no_new_privileges() -> None:
    got = probe_spec.mesh_probe(EXEC, "p", allow_exec=True, user="istio-proxy", euid=1000)
    assert got is not None and got.exec is not None
    assert got.exec.command == (probe_spec.SETPRIV, "--no-new-privs", "--", *EXEC.exec.command)


@pytest.mark.subprocess
def test_the_confined_command_really_is_unprivileged() -> None:
    script = 'test "$(id -u)" != 0 && grep -q "^NoNewPrivs:[[:space:]]*1" /proc/self/status'
    argv = probe_spec.confined_argv(("/bin/sh", "-c", script), "nobody")
    assert probes.CommandProbe(argv).check(10).ok, argv
    if os.geteuid() == 0:  # the check is real: the same script unconfined fails as root
        assert not probes.CommandProbe(("/bin/sh", "-c", script)).check(10).ok


EXEC_MESH = kit.MESH_YAML.replace("""  readinessProbe:
    httpGet:
      path: /ready
      port: 8080
""", """  readinessProbe:
    exec:
      command: [/bin/sh, -c, 'id > /tmp/mesh-agent-exec-probe']
""")


def test_bundle_with_an_exec_readiness_probe_is_refused_unless_allowed() -> None:
    now = time.time()
    files = kit.files(now, replace={"mesh.yaml": EXEC_MESH.encode()})
    with pytest.raises(BundleError) as err:
        parse_bundle(files, now, kit.config())
    assert err.value.problems == [probe_spec.exec_refusal("mesh.yaml: defaultConfig.readinessProbe")]
    allowed = parse_bundle(files, now, kit.config(allow_exec_probe=True))
    assert allowed.probe is not None and allowed.probe.exec is not None


def test_workloadgroup_yaml_with_an_exec_probe_is_refused_unless_allowed() -> None:
    now = time.time()
    wg = kit.WORKLOADGROUP.split("  probe:")[0] + "  probe:\n    exec:\n      command: [/usr/bin/true]\n"
    files = kit.files(now, extras=True, replace={"workloadgroup.yaml": wg.encode()})
    with pytest.raises(BundleError) as err:
        parse_bundle(files, now, kit.config())
    assert err.value.problems == [probe_spec.exec_refusal("workloadgroup.yaml: spec.probe")]
    parse_bundle(files, now, kit.config(allow_exec_probe=True))
