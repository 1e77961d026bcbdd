"""`mesh-agent doctor` without a configuration, and under a temporary root: every check says something true."""

from __future__ import annotations

import getpass
import json
import shutil
from pathlib import Path

import pytest

from agent import cli
from agent.doctor import vm

CHECKS = ["config", "bundle", "sidecar", "istiod", "API", "clock", "RBAC", "WorkloadGroup", "ports", "iptables",
          "istio.service"]


def _doctor(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, str]]:
    code = cli.main(["doctor", *argv])
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith(" ")]
    return code, {line.split(":", 1)[0].split(" ", 1)[1]: line for line in lines[:-1]}


def test_no_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "etc" / "mesh-agent" / "agent.yaml"
    monkeypatch.setenv("MESH_AGENT_CONFIG", str(missing))
    code, lines = _doctor(capsys)
    assert code == 1
    assert list(lines) == CHECKS
    assert lines["config"] == f"FAIL config: {missing}: cannot read: No such file or directory"
    # The clock is listed, and says why it is not compared.
    assert lines["clock"] == "SKIP clock: no API server configured to compare with"
    assert lines["sidecar"] == "SKIP sidecar: no valid configuration"
    # No configuration means the default profile, istio, whose traffic capture needs iptables.
    found = shutil.which("iptables") or shutil.which("iptables-legacy")
    assert lines["iptables"] == (f"PASS iptables: {found}" if found else "FAIL iptables: iptables is not installed") \
        + " (no configuration: the default istio profile)"
    # istio.service: only what systemd says, never a guess.
    service = lines["istio.service"]
    assert "unknown" not in service
    if not Path("/run/systemd/system").is_dir():
        assert service == "SKIP istio.service: cannot tell: systemd is not running here (no /run/systemd/system)"
    else:
        assert service.startswith(("PASS istio.service: not installed", "PASS istio.service: installed but ",
                                   "WARN istio.service: ", "FAIL istio.service: is ")), service


def test_no_config_file_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["doctor", "--json", "--config", str(tmp_path / "agent.yaml")]) == 1
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    assert list(checks) == CHECKS
    assert checks["config"]["result"] == "fail" and "give --config" in checks["config"]["hint"]
    assert checks["clock"]["result"] == "skip"


def test_a_config_under_a_temporary_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "agent.yaml"
    conf.write_text(f"bundle:\n  source: {tmp_path / 'bundle'}\nroot: {tmp_path}\nregistry:\n  enabled: false\n"
                    f"sidecar:\n  profile: envoy\n  bootstrap: /etc/envoy.yaml\n  envoy_binary: {tmp_path}/envoy\n")
    code, lines = _doctor(capsys, "--config", str(conf))
    assert code == 1  # no bundle installed under the root, no proxy
    assert list(lines) == CHECKS
    assert lines["config"] == f"PASS config: {conf} is valid"
    assert lines["bundle"].startswith("FAIL bundle: no bundle installed yet")
    assert lines["sidecar"] == f"FAIL sidecar: {tmp_path}/envoy missing, and no package is named to install"
    assert lines["clock"] == "SKIP clock: no API server configured to compare with (registry.enabled is false)"
    assert lines["ports"] == "SKIP ports: no bundle: the proxy's ports and address come from it"
    assert lines["iptables"] == "SKIP iptables: the envoy profile does not redirect traffic"
    # The host's systemd says nothing about a tree under another root.
    assert lines["istio.service"] == f"SKIP istio.service: the configuration's root is {tmp_path}, not this host"


def test_sidecar_to_be_installed_from_a_package(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "agent.yaml"
    conf.write_text(f"bundle:\n  source: /srv/bundle\nroot: {tmp_path}\nsidecar:\n"
                    f"  pilot_agent_binary: {tmp_path}/pilot-agent\n  user: no-such-user-here\n  package:\n"
                    "    url: https://pkg.example/istio-sidecar.deb\n    version: 1.24.0\n    sha256: " + "a" * 64
                    + "\n  manage_iptables: false\n")
    _, lines = _doctor(capsys, "--config", str(conf))
    assert lines["sidecar"] == (f"PASS sidecar: {tmp_path}/pilot-agent and user no-such-user-here not there yet: "
                                "the agent installs istio-sidecar 1.24.0 from https://pkg.example/istio-sidecar.deb")
    (tmp_path / "pilot-agent").write_text("")
    conf.write_text(conf.read_text().replace("no-such-user-here", getpass.getuser()))
    _, lines = _doctor(capsys, "--config", str(conf))
    assert lines["sidecar"] == f"PASS sidecar: {tmp_path}/pilot-agent, user {getpass.getuser()}"


@pytest.mark.parametrize(("props", "line"), [
    ({"LoadState": "not-found", "ActiveState": "inactive", "UnitFileState": ""},
     "PASS istio.service: not installed"),
    ({"LoadState": "loaded", "ActiveState": "inactive", "UnitFileState": "disabled"},
     "PASS istio.service: installed but inactive, disabled"),
    ({"LoadState": "loaded", "ActiveState": "failed", "UnitFileState": "enabled"},
     "WARN istio.service: failed but enabled: it starts at the next boot and fights mesh-agent over the "
     "proxy's ports\n     hint: systemctl disable istio.service"),
    ({"LoadState": "loaded", "ActiveState": "active", "UnitFileState": "enabled"},
     "FAIL istio.service: is active alongside mesh-agent: two proxies fight over ports\n"
     "     hint: systemctl disable --now istio.service"),
    ({}, "SKIP istio.service: cannot tell: systemctl did not report its state"),
])
def test_istio_service_state(props: dict[str, str], line: str) -> None:
    assert vm.istio_service_state(props).line() == line
