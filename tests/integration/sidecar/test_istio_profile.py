"""The istio profile end to end, with a stand-in pilot-agent that records how it was run."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import psutil
import pytest

from agent.paths import Layout
from agent.sidecar.machine import State
from agent.sidecar.supervisor import Supervisor

from .helpers import CLUSTER_ENV, IstioStandIn, Loop

pytestmark = [pytest.mark.subprocess, pytest.mark.timeout(120)]
ROOT = os.geteuid() == 0


@pytest.fixture
def standin():
    s = IstioStandIn(user="nobody" if ROOT else None)
    yield s
    s.cleanup()


def test_istio_profile_runs_pilot_agent_like_istio_start_sh(standin: IstioStandIn, tmp_path: Path) -> None:
    if not ROOT:
        assert standin.cfg.user == "istio-proxy"  # what would run, had we the right to switch users
    loop = Loop()
    sup = Supervisor(standin.spec, Layout(root=tmp_path), loop.post)
    sup.start()
    try:
        assert loop.run_until(sup, lambda: sup.state is State.RUNNING), sup.reason
    finally:
        sup.stop(drain=True)
    calls = standin.calls()
    assert [c["argv"] for c in calls] == [
        ["istio-iptables", "--cleanup-only"], ["istio-iptables"], ["proxy"],
        ["istio-iptables", "--cleanup-only"]]
    # iptables as the agent (root), the proxy as the proxy user.
    assert {c["uid"] for c in calls if c["argv"][0] == "istio-iptables"} == {os.getuid()}
    proxy = calls[2]
    env = proxy["env"]
    if ROOT:
        nobody = pwd.getpwnam("nobody")
        assert (proxy["uid"], proxy["gid"]) == (nobody.pw_uid, nobody.pw_gid)
        assert 0 not in proxy["groups"]   # none of root's groups
        assert env["USER"] == env["LOGNAME"] == "nobody" and env["HOME"] == nobody.pw_dir
    for key, value in CLUSTER_ENV.items():
        if key != "POD_NAMESPACE":
            assert env[key] == value, key
    for key, value in standin.sidecar_env.items():
        assert env[key] == value
    assert env["INSTANCE_IP"] == "10.1.2.3"
    assert env["POD_NAME"] == "vm-7"
    assert env["POD_NAMESPACE"] == "vm-apps"
    assert env["PROV_CERT"] == env["OUTPUT_CERTS"] == "/etc/certs"
    assert env["CA_ADDR"] == "istiod.istio-system.svc:15012"
    assert env["PROXY_CONFIG"] == "serviceCluster: billing.vm-apps\ncontrolPlaneAuthPolicy: MUTUAL_TLS\n"
    # The agent's own environment does not leak into the proxy's.
    assert "PYTEST_CURRENT_TEST" not in env
    assert sup.state is State.STOPPED
    assert not [p for p in psutil.process_iter(["cmdline"])
                if str(standin.bootstrap) in (p.info["cmdline"] or []) and p.status() != "zombie"]


def test_custom_iptables_skips_the_iptables_commands(tmp_path: Path) -> None:
    s = IstioStandIn(user=None, manage_iptables=False)
    try:
        loop = Loop()
        sup = Supervisor(s.spec, Layout(root=tmp_path), loop.post)
        sup.start()
        assert loop.run_until(sup, lambda: sup.state is State.RUNNING), sup.reason
        sup.stop(drain=False)
        assert [c["argv"] for c in s.calls()] == [["proxy"]]
    finally:
        s.cleanup()
