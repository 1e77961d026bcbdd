"""The whole agent as a subprocess: real Envoy, the API emulator, a real app, a notify socket bound here."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from devkit.bundleserver import serve
from devkit.rig import NS, REPO, Rig, agent_env, app_rig, rig
from devkit.waiting import wait_for

pytestmark = pytest.mark.timeout(180)


class NotifySocket:
    """What systemd would receive: every datagram, with the time it arrived."""

    def __init__(self) -> None:
        self.address = f"@mesh-agent-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.address[1:])
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, list[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode().split("\n")))

    def fields(self) -> list[str]:
        return [f for _, fs in list(self.messages) for f in fs]

    def first(self, field: str) -> float | None:
        return next((t for t, fs in list(self.messages) if field in fs), None)

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    n = NotifySocket()
    yield n
    n.close()


@pytest.fixture
def r(tmp_path: Path) -> Iterator[Rig]:
    with app_rig(tmp_path) as rg:
        yield rg


def _through_envoy(r: Rig) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{r.listener_port}/", timeout=5) as resp:
        return resp.read().decode()


def _envoy_ready(r: Rig) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{r.admin_port}/ready", timeout=0.5) as resp:
            return resp.status == 200
    except OSError:
        return False


def test_ready_only_after_registration_then_status_and_watchdog(r: Rig, notify: NotifySocket) -> None:
    r.start_agent({"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "2000000"})
    wait_for(lambda: notify.first("READY=1"), 60, "READY=1")
    ready_at = notify.first("READY=1")
    entry = r.entry()
    assert entry is not None, "READY=1 came before the entry was applied"
    assert entry["spec"]["address"] == "127.0.0.1"
    assert entry["metadata"]["labels"]["app"] == "billing"
    assert "hello from billing" in _through_envoy(r)
    statuses = [f for f in notify.fields() if f.startswith("STATUS=")]
    assert "STATUS=registered billing-127.0.0.1" in statuses
    assert any(s.startswith("STATUS=waiting") or s.startswith("STATUS=registering") for s in statuses)
    # The loop pings the watchdog at half of WATCHDOG_USEC.
    wait_for(lambda: len([f for f in notify.fields() if f == "WATCHDOG=1"]) >= 3, 10, "watchdog pings")
    assert ready_at is not None
    status = json.loads(r.status_file.read_text())
    assert status["phase"] == "running" and status["registration"]["registered"] is True
    assert status["sidecar"]["ready"] is True and status["app"]["healthy"] is True
    assert r.stop_agent() == 0


def test_app_killed_entry_withdrawn_then_back(r: Rig) -> None:
    r.start_agent()
    wait_for(r.entry, 60, "registration")
    killed = time.monotonic()
    r.kill_app()
    wait_for(lambda: r.entry() is None, 10, "the entry to be withdrawn")
    withdrawn_after = time.monotonic() - killed
    # The probe period is 500 ms with 2 failures; process-exit detection must beat that by far.
    assert withdrawn_after < 3.0, withdrawn_after
    assert "exited: killed by SIGKILL" in r.log_text()
    r.start_app()
    wait_for(r.entry, 15, "registration after the app came back")
    assert r.stop_agent() == 0


def test_sighup_applies_a_label_change_without_restarting_the_sidecar(r: Rig) -> None:
    r.start_agent()
    wait_for(r.entry, 60, "registration")
    sidecar_pid = json.loads(r.status_file.read_text())["sidecar"]["pid"]
    r.overrides = {"registry": {"labels": {"rack": "r12"}}}
    r.write_config()
    assert r.agent is not None
    r.agent.send_signal(signal.SIGHUP)
    wait_for(lambda: (r.entry() or {}).get("metadata", {}).get("labels", {}).get("rack") == "r12", 20,
             "the new label on the entry")
    assert json.loads(r.status_file.read_text())["sidecar"]["pid"] == sidecar_pid
    assert r.agent.poll() is None
    assert r.stop_agent() == 0


def _reload_verb(r: Rig, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "reload", "--config", str(r.config_path), *extra],
                          env=agent_env(), cwd=REPO, capture_output=True, text=True, timeout=90)


def test_reload_verb_waits_for_the_answer_applied_or_refused(r: Rig) -> None:
    """`mesh-agent reload` (the unit's ExecReload) exits 0 once the new configuration is applied, and
    78 with the daemon's reason when it is refused; the running configuration is kept then."""
    r.start_agent()
    wait_for(r.entry, 60, "registration")
    r.overrides = {"registry": {"labels": {"rack": "r3"}}}
    r.write_config()
    ok = _reload_verb(r)
    assert ok.returncode == 0, ok.stderr
    assert "configuration reloaded (reload 1)" in ok.stdout
    status = json.loads(r.status_file.read_text())
    assert status["reload"]["generation"] == 1 and status["reload"]["ok"] is True
    wait_for(lambda: (r.entry() or {}).get("metadata", {}).get("labels", {}).get("rack") == "r3", 20,
             "the reloaded label on the entry")
    good = r.config_path.read_text()
    r.config_path.write_text(good.replace("registry:\n", "registry:\n  no_such_key: 1\n", 1))
    refused = _reload_verb(r)
    assert refused.returncode == 78, (refused.stdout, refused.stderr)
    assert "refused, the running configuration is kept" in refused.stderr
    assert f"{r.config_path}:" in refused.stderr and "registry.no_such_key" in refused.stderr
    assert "last reload:" in subprocess.run(
        [sys.executable, "-m", "agent", "status", "--status-file", str(r.status_file)], env=agent_env(),
        cwd=REPO, capture_output=True, text=True, timeout=60).stdout
    assert r.agent is not None and r.agent.poll() is None
    assert (r.entry() or {})["metadata"]["labels"]["rack"] == "r3"
    # A good file again: applied, as the next generation.
    r.config_path.write_text(good)
    again = _reload_verb(r)
    assert again.returncode == 0 and "(reload 3)" in again.stdout, again.stderr
    assert r.stop_agent() == 0
    gone = _reload_verb(r, "--status-file", str(r.status_file))
    assert gone.returncode == 3 and "not running" in gone.stderr


def test_reload_verb_times_out_with_a_clear_error(r: Rig) -> None:
    """A process that never answers (here: a stopped agent) makes the verb give up after --timeout."""
    r.start_agent()
    wait_for(r.entry, 60, "registration")
    assert r.agent is not None
    r.agent.send_signal(signal.SIGSTOP)
    try:
        out = _reload_verb(r, "--timeout", "1")
    finally:
        r.agent.send_signal(signal.SIGCONT)
    assert out.returncode == 1
    assert "did not answer the reload within 1s" in out.stderr
    # The signal is handled once it runs again: the verb then gets its answer.
    assert _reload_verb(r).returncode == 0
    assert r.stop_agent() == 0


def test_sigterm_withdraws_before_draining_then_exits_0(r: Rig, notify: NotifySocket) -> None:
    r.start_agent({"NOTIFY_SOCKET": notify.address})
    wait_for(lambda: notify.first("READY=1"), 60, "READY=1")
    assert _envoy_ready(r)
    seen: dict[str, float] = {}

    def watch() -> None:
        end = time.monotonic() + 30
        while time.monotonic() < end and len(seen) < 2:
            now = time.monotonic()
            if "withdrawn" not in seen and r.entry() is None:
                seen["withdrawn"] = now
            if "draining" not in seen and not _envoy_ready(r):
                seen["draining"] = now
            time.sleep(0.02)

    t = threading.Thread(target=watch)
    t.start()
    assert r.agent is not None
    agent = r.agent
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(40) == 0
    r.agent = None
    t.join()
    assert "STOPPING=1" in notify.fields()
    assert seen["withdrawn"] < seen["draining"], seen
    # shutdown.propagation is 1 s in the rig: the proxy keeps serving while the mesh catches up.
    assert seen["draining"] - seen["withdrawn"] >= 0.8, seen
    assert not r.status_file.exists()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{r.admin_port}/ready", timeout=0.5)


def test_api_outage_keeps_running_and_the_entry_converges_after(r: Rig) -> None:
    r.start_agent()
    wait_for(r.entry, 60, "registration")
    r.api.outage(4.0)
    time.sleep(1.0)
    r.kill_app()  # unhealthy while the API is away: the delete must wait for the API
    time.sleep(1.0)
    assert r.agent is not None and r.agent.poll() is None
    wait_for(lambda: r.entry() is None, 20, "the withdrawal once the API is back")
    r.start_app()
    wait_for(r.entry, 20, "registration after recovery")
    assert r.agent.poll() is None
    assert r.stop_agent() == 0


def test_bad_config_exits_78_naming_file_line_and_key(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("bundle:\n  source: /x\nregistry:\n  lease:\n    duration: forty\n")
    out = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(cfg)], env=agent_env(),
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 78
    assert f'{cfg}:5: registry.lease.duration: expected a duration like "40s", got "forty"' in out.stderr


def test_bad_bundle_is_refused_and_the_last_good_keeps_running(r: Rig) -> None:
    r.start_agent()
    wait_for(r.entry, 60, "registration")
    good = (r.root / "var/lib/istio/envoy/cluster.env").read_bytes()
    (r.bundle_dir / "istio-token").write_bytes(b"not a jwt")
    assert r.agent is not None
    r.agent.send_signal(signal.SIGHUP)  # reload re-reads the bundle
    wait_for(lambda: "refused, keeping the last good one" in r.log_text(), 20, "the refusal")
    assert (r.root / "var/lib/istio/envoy/cluster.env").read_bytes() == good
    # status.json is written at the end of the loop's pass that logged the refusal: a moment later.
    wait_for(lambda: json.loads(r.status_file.read_text())["bundle"].get("error"), 5, "the error in status.json")
    status = json.loads(r.status_file.read_text())
    assert "istio-token" in status["bundle"]["error"]
    assert r.entry() is not None and r.agent.poll() is None
    assert r.stop_agent() == 0


def test_https_bundle_and_status_command(r: Rig, tmp_path: Path) -> None:
    from devkit import bundles

    (tmp_path / "srv").mkdir()
    with serve(tmp_path / "srv") as server:
        server.state.body = bundles.make_tar(r.bundle_files())
        r.overrides = {"bundle": {"ca_file": str(server.ca_file)}}
        r.write_config(server.url + "/bundle.tar.gz")
        r.start_agent()
        wait_for(r.entry, 60, "registration")
        assert server.state.hits.get("/bundle.tar.gz") == 1
        out = subprocess.run([sys.executable, "-m", "agent", "status", "--config", str(r.config_path)],
                             env=agent_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "state:        running: registered billing-127.0.0.1" in out.stdout
        assert f"{NS}/billing-127.0.0.1 registered" in out.stdout
        assert "sidecar:      running" in out.stdout and "app:          healthy" in out.stdout
        assert server.url in out.stdout
        js = subprocess.run([sys.executable, "-m", "agent", "status", "--json", "--config", str(r.config_path)],
                            env=agent_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
        assert json.loads(js.stdout)["running"] is True
        assert r.stop_agent() == 0
    out = subprocess.run([sys.executable, "-m", "agent", "status", "--config", str(r.config_path)],
                         env=agent_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 3 and "not running" in out.stderr


def test_maintenance_withdraws_and_register_ends_it(r: Rig) -> None:
    r.start_agent()
    wait_for(r.entry, 60, "registration")
    cli = [sys.executable, "-m", "agent"]
    root = ["--root", str(r.root)]
    out = subprocess.run([*cli, "deregister", *root, "--config", str(r.config_path)], env=agent_env(),
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    wait_for(lambda: r.entry() is None, 10, "maintenance to withdraw the entry")
    # The registrar's worker may delete the entry before the loop has written status.json for that pass.
    wait_for(lambda: yaml.safe_load(r.status_file.read_text())["maintenance"] is True, 10, "status to say so")
    out = subprocess.run([*cli, "register", *root, "--config", str(r.config_path)], env=agent_env(),
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    wait_for(r.entry, 10, "registration after maintenance")
    assert r.stop_agent() == 0


def test_doctor_names_what_is_wrong(r: Rig) -> None:
    r.start_agent()
    wait_for(r.entry, 60, "registration")
    doctor = [sys.executable, "-m", "agent", "doctor", "--config", str(r.config_path)]
    out = subprocess.run(doctor, env=agent_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
    lines = out.stdout.splitlines()
    assert out.returncode == 1, out.stdout  # nothing listens on istiod's port
    assert any(line.startswith("PASS config:") for line in lines)
    assert any(line.startswith("PASS bundle:") for line in lines)
    assert any(line.startswith("FAIL istiod CA: istiod.istio-system.svc:") and "(127.0.0.1)" in line
               for line in lines), out.stdout
    assert any(line.startswith("PASS API:") for line in lines)
    assert any(line.startswith("PASS clock:") for line in lines)
    assert any(line.startswith("PASS RBAC: all") for line in lines)
    assert any(line.startswith("PASS WorkloadGroup: vm-apps/billing exists") for line in lines)
    assert any(line.startswith("PASS ports:") for line in lines), out.stdout
    with socket.socket() as istiod:
        istiod.bind(("127.0.0.1", r.istiod_port))
        istiod.listen()
        ok = subprocess.run([*doctor, "--json"], env=agent_env(), cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    checks = {c["name"]: c for c in json.loads(ok.stdout)}
    assert ok.returncode == 0, ok.stdout
    assert checks["istiod CA"]["result"] == "pass"
    # A credential without the agent's RBAC: named, verb by verb.
    r.api.add_token("weak-token-0123456789", "someone-else", [])
    weak = r.api.write_kubeconfig(r.tmp / "weak.kubeconfig", "weak-token-0123456789")
    r.overrides = {"registry": {"kubeconfig": str(weak)}}
    r.write_config()
    bad = subprocess.run(doctor, env=agent_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert "FAIL RBAC: denied in vm-apps: get workloadentries, create workloadentries" in bad.stdout
    assert r.stop_agent() == 0


def test_bundle_built_from_the_cluster(r: Rig) -> None:
    """`bundle.source: kubernetes`: the agent mints its istio token and reads the root cert itself."""
    from devkit import bundles

    root_pem = bundles.make_cert(time.time()).decode()
    r.api.create({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "billing-vm", "namespace": NS}})
    r.api.create({"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": {"name": "istio-ca-root-cert", "namespace": NS}, "data": {"root-cert.pem": root_pem}})
    r.api.create_namespace("istio-system")
    r.api.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "istio", "namespace": "istio-system"},
                  "data": {"mesh": "trustDomain: cluster.local\ndefaultConfig:\n  discoveryAddress: "
                                   f"istiod.istio-system.svc:{r.istiod_port}\n"}})
    r.overrides = {"bundle": {"kubernetes": {"namespace": NS, "group": "billing", "gateway_address": "127.0.0.1"}},
                   "registry": {"address": {"value": "127.0.0.1"}}}
    r.write_config("kubernetes")
    r.start_agent()
    try:
        wait_for(r.entry, 60, "registration")
    except AssertionError:
        print(r.log_text()[-5000:])
        raise
    assert (r.root / "etc/certs/root-cert.pem").read_text() == root_pem
    token = (r.root / "var/run/secrets/tokens/istio-token").read_text()
    assert token.count(".") == 2  # a JWT minted by the API server's TokenRequest
    env = (r.root / "var/lib/istio/envoy/cluster.env").read_text()
    assert "ISTIO_META_WORKLOAD_NAME='billing'" in env and "POD_NAMESPACE='vm-apps'" in env
    assert (r.root / "etc/hosts").read_text().count("127.0.0.1 istiod.istio-system.svc") == 1
    status = json.loads(r.status_file.read_text())
    assert status["bundle"]["source"] == "kubernetes" and status["bundle"]["token_expiry"] > time.time()
    assert r.stop_agent() == 0


def test_a_proxy_restart_brings_the_entry_back_without_flap_damping(r: Rig) -> None:
    """The proxy's crash withdraws the entry; its restart is no app flap, so the entry is back as soon
    as the proxy is ready, though a return of the app itself would be held for an hour."""
    r.overrides = {"app": {"flap": {"min_dwell": "1h"}}}
    r.write_config()
    r.start_agent()
    first = wait_for(r.entry, 60, "registration")
    pid = json.loads((r.root / "run/mesh-agent/sidecar.pid").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    again = wait_for(lambda: (e := r.entry()) is not None and e["metadata"]["uid"] != first["metadata"]["uid"]
                     and e, 30, "the entry to be registered again after the proxy's restart")
    assert again["spec"]["address"] == "127.0.0.1"
    log = r.log_text()
    assert "sidecar not ready" in log
    assert r.stop_agent() == 0


def test_a_crash_looping_sidecar_makes_the_agent_exit_non_zero(r: Rig) -> None:
    """FATAL is for systemd to see: the agent gives up with status 1 (Restart=on-failure applies)."""
    r.overrides = {"sidecar": {"envoy_binary": "/bin/false", "crash_loop": {"max_exits": 3, "window": "60s"}}}
    r.write_config()
    r.start_agent()
    assert r.agent is not None
    assert r.agent.wait(60) == 1
    log = r.log_text()
    assert "crash loop" in log and "giving up: sidecar failed" in log
    assert r.entry() is None
    r.agent = None


@pytest.mark.skipif(os.geteuid() != 0, reason="file owners are managed only as root")
def test_a_missing_sidecar_user_stops_the_agent_at_78_instead_of_waiting(tmp_path: Path) -> None:
    # No istio-sidecar package named and its user missing: nothing would fix this while the agent waits,
    # so `systemctl start` must fail at once with the reason rather than time out.
    with rig(tmp_path, sidecar={"profile": "istio", "user": "mesh-agent-no-such-user"}) as r:
        r.prepare()
        agent = r.start_agent()
        assert agent.wait(60) == 78
        assert "user 'mesh-agent-no-such-user' does not exist" in r.log_text()
        assert "sidecar.package" in r.log_text()


def test_status_tells_what_is_known_during_an_api_outage(r: Rig) -> None:
    r.start_agent()
    wait_for(r.entry, 60, "registration")
    # The entry is in the API; wait until the agent has the answer too, or the outage below would cut
    # its first confirmation short and status would rightly still show the earlier "withdrawn".
    wait_for(lambda: json.loads(r.status_file.read_text())["registration"].get("known") == "registered", 30,
             "the agent to see its entry confirmed")
    # Every request about the entry and its lease fails: the entry stays in the cluster meanwhile.
    r.api.faults.status(503, path="workloadentries|leases", times=None)

    def unknown() -> dict | None:
        reg = json.loads(r.status_file.read_text())["registration"]
        return reg if reg.get("unknown_since") else None
    reg = wait_for(unknown, 30, "the failed renewal to show in status")
    assert reg["registered"] is True and reg["known"] == "registered", reg
    assert reg["confirmed_at"] <= reg["unknown_since"] <= time.time()
    assert r.entry() is not None  # and it really is still there
    out = subprocess.run([sys.executable, "-m", "agent", "status", "--config", str(r.config_path)],
                         env=agent_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "unknown since" in out.stdout and "last confirmed registered" in out.stdout, out.stdout
    r.api.faults.clear()
    wait_for(lambda: not json.loads(r.status_file.read_text())["registration"].get("unknown_since"), 30,
             "the API to confirm the entry again")
    assert r.stop_agent() == 0


def test_reload_after_editing_app_keeps_the_workloadgroups_probe_and_ports(tmp_path: Path) -> None:
    # agent.yaml names neither a probe nor ports, cluster.env's ISTIO_INBOUND_PORTS is "*": the probe and
    # the ports come from the WorkloadGroup, and a reload that edits `app:` must keep them.
    with rig(tmp_path) as r:
        group = _group_with_probe(r.app_port)
        r.api.create_namespace(NS)
        r.api.create(group)
        r.prepare()
        env = (r.bundle_dir / "cluster.env").read_text()
        (r.bundle_dir / "cluster.env").write_text(
            env.replace(f"ISTIO_INBOUND_PORTS='{r.app_port}'", "ISTIO_INBOUND_PORTS='*'"))
        cfg = yaml.safe_load(r.config_path.read_text())
        del cfg["app"]["probe"], cfg["app"]["ports"]
        r.config_path.write_text(yaml.safe_dump(cfg))
        r.start_app()
        r.start_agent()
        wait_for(r.entry, 60, "registration")

        def app() -> dict:
            return json.loads(r.status_file.read_text())["app"]
        before = app()
        assert "/ready-by-group" in str(before["probe"]) and list(before["ports"]) == [str(r.app_port)], before
        cfg["app"]["flap"] = {"min_dwell": "1s"}  # an edit of `app:` that says nothing of probe or ports
        r.config_path.write_text(yaml.safe_dump(cfg))
        out = subprocess.run([sys.executable, "-m", "agent", "reload", "--config", str(r.config_path)],
                             env=agent_env(), cwd=REPO, capture_output=True, text=True, timeout=90)
        assert out.returncode == 0, out.stdout + out.stderr
        after = app()
        assert after["probe"] == before["probe"] and after["ports"].keys() == before["ports"].keys(), after
        assert r.agent is not None and r.agent.poll() is None and r.entry() is not None
        assert r.stop_agent() == 0


def _group_with_probe(port: int) -> dict:
    from devkit.rig import group_object

    group = group_object(port=port)
    group["spec"]["probe"] = {"httpGet": {"port": port, "path": "/ready-by-group"}, "periodSeconds": 1}
    return group
