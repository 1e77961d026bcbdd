"""Two apps on one VM under a booted systemd (Debian 12 and Debian 13): the .deb installed by apt, agent.yaml with
`apps:`, both apps' entries after `enable --now`; one app's unit stopped withdraws only its entry;
`deregister --app` and `register --app`; `systemctl stop` withdraws both."""

from __future__ import annotations

import json
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from devkit import bundles, rig
from devkit.envoy import envoy_binary
from devkit.kubeapi.server import KubeAPI
from devkit.ports import free_port
from devkit.waiting import wait_for
from tests.system.conftest import needs_daemon, require_root
from tests.system.machine import Machine

pytestmark = [pytest.mark.system, pytest.mark.timeout(900), needs_daemon]

UNIT = "mesh-agent.service"
CONFIG = "/etc/mesh-agent/agent.yaml"
INPUTS = "/srv/two-apps"
ENVOY = "/usr/local/bin/envoy"


class VM:
    def __init__(self, m: Machine, api: KubeAPI) -> None:
        self.m, self.api = m, api
        self.ports = {"billing": free_port(), "ledger": free_port()}

    def entry(self, app: str) -> dict | None:
        return self.api.get("WorkloadEntry", rig.NS, f"{app}-{rig.ADDRESS}")

    def status(self) -> dict:
        return json.loads(self.m.run(["mesh-agent", "status", "--json"], check=False).stdout or "{}")

    def journal(self) -> str:
        return self.m.journal(UNIT, lines=60)


@pytest.fixture(scope="module", params=["bookworm", "trixie"])
def vm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, deb: Path) -> Iterator[VM]:
    require_root()
    tmp = tmp_path_factory.mktemp(f"two-apps-{request.param}")
    api = KubeAPI(state_dir=tmp / "kubeapi").start()
    try:
        with Machine.boot(request.param, tmp / "machine") as m:
            m.apt_update()
            depends = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True, text=True,
                                     check=True).stdout.strip()
            m.run(["apt-get", "satisfy", "-y", "-q", depends], timeout=600)
            m.write("/etc/hosts", "127.0.0.1 localhost\n")  # a minimal debootstrap has none; a VM has one
            m.install_deb(deb)
            v = VM(m, api)
            _inputs(v)
            yield v
    finally:
        api.stop()


def _inputs(v: VM) -> None:
    m, api = v.m, v.api
    admin, listener, metrics = free_port(), free_port(), free_port()
    api.create_namespace(rig.NS)
    for app, port in v.ports.items():
        api.create(rig.group_object(name=app, port=port))
        m.run(["systemd-run", "--unit", f"sample-{app}", "--", "python3", "-m", "http.server", str(port),
               "--bind", "127.0.0.1"])
    m.copy_in(envoy_binary(), ENVOY, mode=0o755)
    m.write(f"{INPUTS}/envoy.yaml", yaml.safe_dump(rig.envoy_bootstrap(admin, listener, v.ports["billing"])))
    m.write(f"{INPUTS}/kubeconfig", api.kubeconfig.read_text() if api.kubeconfig else "", mode=0o600)
    env = bundles.CLUSTER_ENV_V4.replace("ISTIO_SVC_IP='10.0.0.5'", f"ISTIO_SVC_IP='{rig.ADDRESS}'")
    files = bundles.files(time.time(), replace={"cluster.env": env.encode(),
                                               "hosts": b"127.0.0.1 istiod.istio-system.svc\n"})
    for name, data in files.items():
        m.write(f"{INPUTS}/bundle/{name}", data.decode(), mode=0o600)
    m.write(CONFIG, yaml.safe_dump({
        "bundle": {"source": f"{INPUTS}/bundle"},
        # Envoy's shared-memory and domain-socket names come from its base id, in the network namespace the
        # machine shares with the host: another machine's Envoy beside this one must not collide.
        "sidecar": {"profile": "envoy", "envoy_binary": ENVOY, "bootstrap": f"{INPUTS}/envoy.yaml",
                    "base_id": random.randint(1000, 60000),
                    "admin_address": f"127.0.0.1:{admin}", "drain_timeout": "3s"},
        "apps": [{"name": app, "ports": [port], "flap": {"min_dwell": "0s"},
                  "probe": {"tcp_socket": {"port": port}, "period": "1s", "failure_threshold": 1}}
                 for app, port in v.ports.items()],
        "registry": {"kubeconfig": f"{INPUTS}/kubeconfig", "namespace": rig.NS,
                     "lease": {"duration": "15s", "renew": "3s"}},
        "shutdown": {"propagation": "1s"},
        "metrics": {"port": metrics},
    }), mode=0o640)


def test_both_apps_are_registered_once_the_unit_is_started(vm: VM) -> None:
    r = vm.m.systemctl("enable", "--now", UNIT, check=False, timeout=200)
    assert r.ok, vm.journal()
    # READY=1 waits for every app: both entries are there when `systemctl start` returns.
    assert vm.entry("billing") is not None and vm.entry("ledger") is not None, vm.journal()
    status_text = vm.m.unit_property(UNIT, "StatusText")
    assert "billing: registered" in status_text and "ledger: registered" in status_text
    assert set(vm.status()["apps"]) == {"billing", "ledger"}


def test_one_app_stopped_withdraws_only_its_entry(vm: VM) -> None:
    vm.m.systemctl("stop", "sample-ledger")
    wait_for(lambda: vm.entry("ledger") is None, 30, "ledger's entry withdrawn")
    assert vm.entry("billing") is not None
    vm.m.run(["systemd-run", "--unit", "sample-ledger2", "--", "python3", "-m", "http.server",
              str(vm.ports["ledger"]), "--bind", "127.0.0.1"])
    wait_for(lambda: vm.entry("ledger"), 30, "ledger back")


def test_maintenance_of_one_app(vm: VM) -> None:
    vm.m.run(["mesh-agent", "deregister", "--app", "billing", "--reason", "patching"])
    wait_for(lambda: vm.entry("billing") is None, 30, "billing withdrawn")
    assert vm.entry("ledger") is not None
    assert vm.status()["apps"]["billing"]["maintenance"] is True
    vm.m.run(["mesh-agent", "register", "--app", "billing"])
    wait_for(lambda: vm.entry("billing"), 30, "billing back")


def test_stop_withdraws_both(vm: VM) -> None:
    vm.m.systemctl("stop", UNIT, timeout=120)
    assert vm.m.unit_property(UNIT, "ActiveState") == "inactive"
    assert vm.entry("billing") is None and vm.entry("ledger") is None, vm.journal()
