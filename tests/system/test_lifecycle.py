"""The real agent under a booted systemd: the .deb installed by apt, the emulator and a bundle on the
host's loopback (the machine shares the host's network namespace), a real Envoy copied in, a sample
app started as a transient unit. Driven with systemctl, as an admin would, in file order:
start returns after READY with the entry applied; reload; kill -9 -> restarted, one sidecar, entry kept;
stop withdraws the entry and exits 0; upgrade keeps the VM in the mesh.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests import agentkit, bundlekit
from tests.kubeapi.server import KubeAPI
from tests.system.conftest import NEXT_VERSION, needs_daemon, require_root
from tests.system.machine import Machine

pytestmark = [pytest.mark.system, pytest.mark.timeout(900), needs_daemon]

UNIT = "mesh-agent.service"
ENVOY = "/usr/local/bin/envoy"


class World:
    def __init__(self, m: Machine, api: KubeAPI) -> None:
        self.m, self.api = m, api
        self.app_port, self.listener_port = agentkit.free_port(), agentkit.free_port()
        self.admin_port, self.metrics_port = agentkit.free_port(), agentkit.free_port()
        self.entry_name = f"billing-{agentkit.ADDRESS}"

    def entry(self) -> dict | None:
        return self.api.get("WorkloadEntry", agentkit.NS, self.entry_name)

    def envoys(self) -> list[int]:
        return [pid for pid, name in self.m.processes().items() if name == "envoy"]

    def main_pid(self) -> str:
        return self.m.unit_property(UNIT, "MainPID")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, deb: Path) -> Iterator[World]:
    require_root()
    tmp = tmp_path_factory.mktemp("lifecycle")
    api = KubeAPI(state_dir=tmp / "kubeapi").start()
    try:
        with Machine.boot("bookworm", tmp / "machine") as m:
            m.apt_update()
            m.install_deb(deb)
            w = World(m, api)
            _configure(w, tmp)
            yield w
    finally:
        api.stop()


def _configure(w: World, tmp: Path) -> None:
    m, api = w.m, w.api
    m.write("/etc/hosts", "127.0.0.1 localhost\n")  # a minimal debootstrap has none; every real VM has
    api.create_namespace(agentkit.NS)
    api.create(agentkit.group_object(port=w.app_port))
    m.copy_in(agentkit.envoy_binary(), ENVOY, mode=0o755)
    m.write("/etc/mesh-agent/envoy.yaml", yaml.safe_dump(
        agentkit.envoy_bootstrap(w.admin_port, w.listener_port, w.app_port)))
    m.write("/etc/mesh-agent/kubeconfig", api.kubeconfig.read_text() if api.kubeconfig else "", mode=0o600)
    env = bundlekit.CLUSTER_ENV_V4.replace("ISTIO_SVC_IP='10.0.0.5'", f"ISTIO_SVC_IP='{agentkit.ADDRESS}'")
    files = bundlekit.files(time.time(), replace={"cluster.env": env.encode(),
                                                  "hosts": b"127.0.0.1 istiod.istio-system.svc\n"})
    for name, data in files.items():
        m.write(f"/etc/mesh-agent/bundle/{name}", data.decode(), mode=0o600)
    m.write("/etc/mesh-agent/agent.yaml", yaml.safe_dump({
        "bundle": {"source": "/etc/mesh-agent/bundle"},
        "sidecar": {"profile": "envoy", "envoy_binary": ENVOY, "bootstrap": "/etc/mesh-agent/envoy.yaml",
                    "admin_address": f"127.0.0.1:{w.admin_port}", "drain_timeout": "3s"},
        "app": {"ports": [w.app_port], "probe": {"tcp_socket": {"port": w.app_port}, "period": "1s",
                                                 "failure_threshold": 1}},
        "registry": {"kubeconfig": "/etc/mesh-agent/kubeconfig", "namespace": agentkit.NS, "group": "billing",
                     "lease": {"duration": "15s", "renew": "3s"}},
        "shutdown": {"propagation": "1s"},
        "metrics": {"port": w.metrics_port},
    }), mode=0o640)
    m.run(["systemd-run", "--unit", "sample-app", "--", "python3", "-m", "http.server", str(w.app_port),
           "--bind", "127.0.0.1"])


def test_start_returns_after_ready_with_the_entry_applied(world: World) -> None:
    m = world.m
    r = m.systemctl("start", UNIT, check=False, timeout=180)
    assert r.ok, m.journal(UNIT, lines=80)
    # `systemctl start` of a Type=notify unit returns once READY=1 came: the entry is there by now.
    assert world.entry() is not None, m.journal(UNIT, lines=80)
    assert m.unit_property(UNIT, "ActiveState") == "active"
    assert "registered billing-127.0.0.1" in m.unit_property(UNIT, "StatusText")
    status = json.loads(m.run(["mesh-agent", "status", "--json"]).stdout)
    assert status["registration"]["registered"] is True and status["sidecar"]["ready"] is True
    assert len(world.envoys()) == 1
    journal = m.journal(UNIT)
    assert "mesh-agent 0.1.0 starting" in journal or "starting" in journal


def test_reload(world: World) -> None:
    m = world.m
    pid = world.main_pid()
    m.run(["sed", "-i", "s/^registry:/registry:\\n  labels: {rack: r7}/", "/etc/mesh-agent/agent.yaml"])
    m.systemctl("reload", UNIT)
    agentkit.wait_for(lambda: ((world.entry() or {}).get("metadata", {}).get("labels") or {}).get("rack") == "r7",
                      30, "the reloaded label on the entry")
    assert world.main_pid() == pid and m.unit_property(UNIT, "ActiveState") == "active"


def test_kill_9_is_restarted_with_one_sidecar_and_the_entry_intact(world: World) -> None:
    m = world.m
    pid = world.main_pid()
    uid = world.entry()["metadata"]["uid"]  # type: ignore[index]
    m.systemctl("kill", "--kill-who=main", "--signal=SIGKILL", UNIT)  # kill -9 $MAINPID, without procps
    agentkit.wait_for(lambda: world.main_pid() not in ("0", pid) and
                      m.unit_property(UNIT, "ActiveState") == "active", 60, "systemd to restart the agent")
    agentkit.wait_for(lambda: "registered" in m.unit_property(UNIT, "StatusText"), 60, "re-registration")
    assert len(world.envoys()) == 1, m.processes()
    entry = world.entry()
    assert entry is not None and entry["metadata"]["uid"] == uid  # never withdrawn meanwhile
    assert m.unit_property(UNIT, "NRestarts") == "1"


def test_upgrade_keeps_the_vm_in_the_mesh(world: World, deb_next: Path) -> None:
    m = world.m
    uid = world.entry()["metadata"]["uid"]  # type: ignore[index]
    m.install_deb(deb_next)
    agentkit.wait_for(lambda: m.unit_property(UNIT, "ActiveState") == "active" and
                      "registered" in m.unit_property(UNIT, "StatusText"), 90, "the upgraded agent")
    assert m.run(["mesh-agent", "version"]).stdout.strip() == f"mesh-agent {NEXT_VERSION}"
    entry = world.entry()
    assert entry is not None, m.journal(UNIT, lines=60)
    assert entry["metadata"]["uid"] == uid, "the entry was withdrawn during the upgrade"
    assert "systemd is restarting mesh-agent: the entry stays registered" in m.journal(UNIT)
    assert len(world.envoys()) == 1


def test_stop_withdraws_the_entry_and_exits_0(world: World) -> None:
    m = world.m
    m.systemctl("stop", UNIT, timeout=120)
    props = m.unit_properties(UNIT, "ActiveState", "Result", "ExecMainStatus")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, m.journal(UNIT)
    assert world.entry() is None
    assert world.envoys() == []
    print(m.run(["systemd-analyze", "security", "--no-pager", UNIT]).stdout)
