"""The real agent under a booted systemd, on Debian 12 and 13: the .deb installed by apt, the emulator and
a bundle on the host's loopback (the machine shares the host's network namespace), a real Envoy copied
in, a sample app started as a transient unit. Driven with systemctl and apt, as an admin would, in file
order: installed and skipped while not configured; configured and `enable --now` returns after READY
with the entry applied; reload applies a good file and refuses a bad one (the reload fails, the running
configuration stays); kill -9 -> restarted, one sidecar, entry kept; a restart into a bad file exits 78
and withdraws the entry; restart and upgrade keep the entry; stop withdraws it and exits 0; purge leaves
the file tree and /etc/hosts as they were before the install.
"""

from __future__ import annotations

import json
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
from tests.system.conftest import NEXT_VERSION, needs_daemon, require_root
from tests.system.machine import Machine

pytestmark = [pytest.mark.system, pytest.mark.timeout(900), needs_daemon]

UNIT = "mesh-agent.service"
CONFIG = "/etc/mesh-agent/agent.yaml"
# The test's own inputs (not the package's, not the agent's): left out of the before/after comparison.
INPUTS = "/srv/lifecycle"
ENVOY = "/usr/local/bin/envoy"
HOSTS = "127.0.0.1 localhost\n::1 localhost ip6-localhost\n10.1.2.3 db.internal db # the admin's own\n"


class World:
    def __init__(self, m: Machine, api: KubeAPI, deb: Path) -> None:
        self.m, self.api, self.deb = m, api, deb
        self.app_port, self.listener_port = free_port(), free_port()
        self.admin_port, self.metrics_port = free_port(), free_port()
        self.entry_name = f"billing-{rig.ADDRESS}"
        self.tree_before: set[str] = set()
        self.good_config = ""

    def entry(self) -> dict | None:
        return self.api.get("WorkloadEntry", rig.NS, self.entry_name)

    def labels(self) -> dict[str, str]:
        return ((self.entry() or {}).get("metadata") or {}).get("labels") or {}

    def envoys(self) -> list[int]:
        return [pid for pid, name in self.m.processes().items() if name == "envoy"]

    def main_pid(self) -> str:
        return self.m.unit_property(UNIT, "MainPID")

    def status(self) -> dict:
        return json.loads(self.m.run(["mesh-agent", "status", "--json"], check=False).stdout or "{}")


@pytest.fixture(scope="module", params=["bookworm", "trixie"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, deb: Path) -> Iterator[World]:
    """A booted machine of the suite with the package's dependencies (so that the purge can be compared
    with the tree before the install), the admin's /etc/hosts, and the .deb installed by apt."""
    require_root()
    suite = request.param
    tmp = tmp_path_factory.mktemp(f"lifecycle-{suite}")
    api = KubeAPI(state_dir=tmp / "kubeapi").start()
    try:
        with Machine.boot(suite, tmp / "machine") as m:
            m.apt_update()
            depends = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True, text=True,
                                     check=True).stdout.strip()
            m.run(["apt-get", "satisfy", "-y", "-q", depends], timeout=600)
            m.write("/etc/hosts", HOSTS)  # a minimal debootstrap has none; every real VM has one
            w = World(m, api, deb)
            _inputs(w)
            w.tree_before = m.file_tree(skip=(INPUTS, ENVOY))
            m.install_deb(deb)
            yield w
    finally:
        api.stop()


def _inputs(w: World, app_at_boot: bool = False) -> None:
    """The cluster side, the Envoy binary, the bundle and the sample app: what the admin brings. The app is
    a transient unit, or with `app_at_boot` an enabled one that comes back when the machine reboots."""
    m, api = w.m, w.api
    api.create_namespace(rig.NS)
    api.create(rig.group_object(port=w.app_port))
    m.copy_in(envoy_binary(), ENVOY, mode=0o755)
    m.write(f"{INPUTS}/envoy.yaml", yaml.safe_dump(
        rig.envoy_bootstrap(w.admin_port, w.listener_port, w.app_port)))
    m.write(f"{INPUTS}/kubeconfig", api.kubeconfig.read_text() if api.kubeconfig else "", mode=0o600)
    env = bundles.CLUSTER_ENV_V4.replace("ISTIO_SVC_IP='10.0.0.5'", f"ISTIO_SVC_IP='{rig.ADDRESS}'")
    files = bundles.files(time.time(), replace={"cluster.env": env.encode(),
                                               "hosts": b"127.0.0.1 istiod.istio-system.svc\n"})
    for name, data in files.items():
        m.write(f"{INPUTS}/bundle/{name}", data.decode(), mode=0o600)
    w.good_config = yaml.safe_dump({
        "bundle": {"source": f"{INPUTS}/bundle"},
        "sidecar": {"profile": "envoy", "envoy_binary": ENVOY, "bootstrap": f"{INPUTS}/envoy.yaml",
                    "admin_address": f"127.0.0.1:{w.admin_port}", "drain_timeout": "3s"},
        "app": {"ports": [w.app_port], "probe": {"tcp_socket": {"port": w.app_port}, "period": "1s",
                                                 "failure_threshold": 1}},
        "registry": {"kubeconfig": f"{INPUTS}/kubeconfig", "namespace": rig.NS, "group": "billing",
                     "lease": {"duration": "15s", "renew": "3s"}},
        "shutdown": {"propagation": "1s"},
        "metrics": {"port": w.metrics_port},
    })
    app = ["python3", "-m", "http.server", str(w.app_port), "--bind", "127.0.0.1"]
    if not app_at_boot:
        m.run(["systemd-run", "--unit", "sample-app", "--", *app])
        return
    m.write("/etc/systemd/system/sample-app.service",
            f"[Service]\nExecStart=/usr/bin/{' '.join(app)}\n\n[Install]\nWantedBy=multi-user.target\n")
    m.systemctl("enable", "--now", "sample-app.service")


def _bad_config(w: World) -> str:
    return w.good_config + "no_such_key: 1\n"


def _registered(w: World, timeout: float = 90) -> None:
    try:
        wait_for(lambda: w.m.unit_property(UNIT, "ActiveState") == "active" and
                 "registered" in w.m.unit_property(UNIT, "StatusText"), timeout, "registration")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{w.m.journal(UNIT, lines=40)}") from None


def test_installed_and_skipped_while_not_configured(world: World) -> None:
    m = world.m
    for _ in range(2):  # the postinst's start, then an admin's
        props = m.unit_properties(UNIT, "ActiveState", "Result", "ConditionResult")
        assert props == {"ActiveState": "inactive", "Result": "exec-condition", "ConditionResult": "no"}, \
            m.journal(UNIT)
        m.systemctl("start", UNIT)
    assert world.entry() is None


def test_enable_now_returns_after_ready_with_the_entry_applied(world: World) -> None:
    m = world.m
    m.write(CONFIG, world.good_config, mode=0o640)
    r = m.systemctl("enable", "--now", UNIT, check=False, timeout=200)  # TimeoutStartSec=180s
    assert r.ok, m.journal(UNIT, lines=80)
    # `systemctl start` of a Type=notify unit returns once READY=1 came: the entry is there by now.
    assert world.entry() is not None, m.journal(UNIT, lines=80)
    assert m.unit_property(UNIT, "ActiveState") == "active"
    assert "registered billing-127.0.0.1" in m.unit_property(UNIT, "StatusText")
    status = world.status()
    assert status["registration"]["registered"] is True and status["sidecar"]["ready"] is True
    assert len(world.envoys()) == 1


def test_reload_applies_a_good_file_and_refuses_a_bad_one(world: World) -> None:
    m = world.m
    pid = world.main_pid()
    world.good_config = world.good_config.replace("registry:\n", "registry:\n  labels:\n    rack: r7\n", 1)
    m.write(CONFIG, world.good_config, mode=0o640)
    m.systemctl("reload", UNIT)  # ExecReload waits for the agent's answer
    assert world.status()["reload"]["ok"] is True
    wait_for(lambda: world.labels().get("rack") == "r7", 30, "the reloaded label on the entry")
    m.write(CONFIG, _bad_config(world).replace("rack: r7", "rack: r8"), mode=0o640)
    refused = m.systemctl("reload", UNIT, check=False)
    assert not refused.ok, m.journal(UNIT, lines=30)
    journal = m.journal(UNIT, lines=40)
    assert "no_such_key" in journal and "refused" in journal
    assert m.unit_property(UNIT, "ActiveState") == "active" and world.main_pid() == pid
    assert world.status()["reload"]["ok"] is False
    assert world.labels().get("rack") == "r7"  # the running configuration is kept
    m.write(CONFIG, world.good_config, mode=0o640)
    m.systemctl("reload", UNIT)
    assert world.main_pid() == pid and m.unit_property(UNIT, "ActiveState") == "active"


def test_kill_9_is_restarted_with_one_sidecar_and_the_entry_intact(world: World) -> None:
    m = world.m
    pid = world.main_pid()
    uid = world.entry()["metadata"]["uid"]  # type: ignore[index]
    m.run(["sh", "-c", f"kill -9 {pid}"])  # the shell's kill: a minimal Debian has no procps
    wait_for(lambda: world.main_pid() not in ("0", pid) and
             m.unit_property(UNIT, "ActiveState") == "active", 60, "systemd to restart the agent")
    _registered(world, 60)
    assert len(world.envoys()) == 1, world.m.processes()
    entry = world.entry()
    assert entry is not None and entry["metadata"]["uid"] == uid  # never withdrawn meanwhile
    assert m.unit_property(UNIT, "NRestarts") == "1"


def test_a_restart_into_a_bad_config_exits_78_and_withdraws_the_entry(world: World) -> None:
    """The stopping agent sees the restart job but the file on disk is bad: the next agent exits 78, so
    this one withdraws instead of leaving an entry with no proxy behind it."""
    m = world.m
    m.write(CONFIG, _bad_config(world), mode=0o640)
    m.systemctl("restart", UNIT, check=False, timeout=180)
    m.wait_unit(UNIT, {"failed"}, timeout=60)
    assert m.unit_property(UNIT, "ExecMainStatus") == "78", m.journal(UNIT, lines=60)
    assert world.entry() is None, m.journal(UNIT, lines=40)
    assert "the next agent would refuse" in m.journal(UNIT)
    assert world.envoys() == []
    m.write(CONFIG, world.good_config, mode=0o640)
    m.systemctl("reset-failed", UNIT)
    m.systemctl("start", UNIT, timeout=180)
    _registered(world)


def test_restart_keeps_the_entry(world: World) -> None:
    m = world.m
    uid = world.entry()["metadata"]["uid"]  # type: ignore[index]
    m.systemctl("restart", UNIT, timeout=180)
    _registered(world)
    entry = world.entry()
    assert entry is not None and entry["metadata"]["uid"] == uid, "the entry was withdrawn during the restart"
    assert "systemd is restarting mesh-agent: the entry stays registered" in m.journal(UNIT)


def test_upgrade_keeps_the_vm_in_the_mesh(world: World, deb_next: Path) -> None:
    m = world.m
    uid = world.entry()["metadata"]["uid"]  # type: ignore[index]
    m.install_deb(deb_next)
    _registered(world)
    assert m.run(["mesh-agent", "version"]).stdout.strip() == f"mesh-agent {NEXT_VERSION}"
    entry = world.entry()
    assert entry is not None, m.journal(UNIT, lines=60)
    assert entry["metadata"]["uid"] == uid, "the entry was withdrawn during the upgrade"
    assert len(world.envoys()) == 1


def test_stop_withdraws_the_entry_and_exits_0(world: World) -> None:
    m = world.m
    m.systemctl("stop", UNIT, timeout=120)
    props = m.unit_properties(UNIT, "ActiveState", "Result", "ExecMainStatus")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, m.journal(UNIT)
    assert world.entry() is None
    assert world.envoys() == []
    print(m.run(["systemd-analyze", "security", "--no-pager", UNIT]).stdout)


def test_purge_leaves_the_machine_as_before_the_install(world: World) -> None:
    m = world.m
    assert m.exists("/etc/certs/root-cert.pem") and m.exists("/var/lib/istio/envoy/cluster.env")
    m.purge("mesh-agent")
    assert m.read("/etc/hosts") == HOSTS
    left = m.file_tree(skip=(INPUTS, ENVOY)) - world.tree_before
    assert not left, f"left behind after purge: {sorted(left)[:40]}"
    assert m.systemctl("show", UNIT, "-p", "LoadState").stdout.strip() == "LoadState=not-found"
