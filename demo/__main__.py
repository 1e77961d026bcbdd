"""The local demo: a VM joining a mesh, on loopback, without root.

    ./scripts/demo.sh        (sets up, then runs: python -m demo)

It starts a Kubernetes API emulator with Istio's CRDs and two WorkloadGroups, serves a mesh bundle in
istioctl's format over HTTPS, starts two sample apps (billing and ledger, two services on one VM), and
runs mesh-agent (with a real Envoy) under a temporary root. Then it shows an entry appearing for each
app, a request through Envoy, one app killed and only its entry withdrawn (and why, as the agent tells
it), the app back and registered again, and a clean stop.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from devkit import bundles
from devkit.bundleserver import serve
from devkit.ports import free_port
from devkit.rig import ADDRESS, NS, REPO, Rig, agent_env, group_object, rig, start_sample_app
from devkit.waiting import wait_for


def say(text: str = "") -> None:
    print(text, flush=True)


def step(n: int, text: str) -> None:
    say()
    say(f"[{n}] {text}")


def show(cmd: list[str], env: dict[str, str] | None = None) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    text = (out.stdout + out.stderr).rstrip()
    for line in text.splitlines():
        say(f"    {line}")
    return text


def entries(r: Rig) -> None:
    if shutil.which("kubectl"):
        say(f"    $ kubectl get workloadentries -n {NS}")
        show(["kubectl", "--kubeconfig", str(r.api.kubeconfig), "get", "workloadentries", "-n", NS,
              "-o", "custom-columns=NAME:.metadata.name,ADDRESS:.spec.address,LABELS:.metadata.labels"])
    else:
        names = [o["metadata"]["name"] for o in r.api.objects("WorkloadEntry", NS)]
        say(f"    WorkloadEntries in {NS}: {', '.join(names) or '(none)'}")


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="mesh-agent-demo-"))
    say("mesh-agent demo: a VM joins an Istio mesh, on loopback, under " + str(tmp))
    with rig(tmp / "vm") as r, serve(_mkdir(tmp / "bundle-server")) as server:
        step(1, f"Kubernetes API emulator (Istio's CRDs loaded) at {r.api.url}")
        r.prepare()
        ledger_port = free_port()
        r.api.create(group_object(name="ledger", port=ledger_port))
        say(f"    namespace {NS}, WorkloadGroups billing (port http={r.app_port}) and ledger (http={ledger_port})")

        step(2, "The mesh bundle, as `istioctl x workload entry configure` writes it, served over HTTPS")
        server.state.body = bundles.make_tar(r.bundle_files())
        url = server.url + "/bundle.tar.gz"
        r.overrides = {"bundle": {"ca_file": str(server.ca_file)}, "logging": {"level": "info"}}
        two_apps(r, url, ledger_port)
        say(f"    {url} (cluster.env, mesh.yaml, root-cert.pem, istio-token, hosts)")

        step(3, f"Two apps on this VM: billing on 127.0.0.1:{r.app_port}, ledger on 127.0.0.1:{ledger_port} "
                "(probe: GET /healthz); agent.yaml lists both under apps:")
        r.start_app()
        ledger = start_sample_app(ledger_port, "ledger")

        step(4, "mesh-agent run: fetch and install the bundle, start Envoy, probe the apps, register each")
        say(f"    config {r.config_path}; log {tmp / 'vm' / 'agent.log'}")
        started = time.monotonic()
        r.start_agent()
        try:
            wait_for(lambda: r.entry() and entry(r, "ledger"), 90, "the WorkloadEntries")
        except AssertionError:
            say("    the entry did not appear; the agent's log ends with:")
            for line in r.log_text().splitlines()[-20:]:
                say(f"      {line}")
            return 1
        say(f"    registered in {time.monotonic() - started:.1f}s")
        entries(r)
        say("    $ mesh-agent status")
        show([sys.executable, "-m", "agent", "status", "--config", str(r.config_path)], agent_env())

        step(5, f"A request through Envoy (127.0.0.1:{r.listener_port}) to the app")
        with urllib.request.urlopen(f"http://127.0.0.1:{r.listener_port}/", timeout=5) as resp:
            say(f"    HTTP {resp.status}: {resp.read().decode().strip()}")

        step(6, "The ledger app is killed (SIGKILL); billing keeps running")
        killed = time.monotonic()
        ledger.kill()
        ledger.wait(5)
        wait_for(lambda: entry(r, "ledger") is None, 30, "the withdrawal")
        say(f"    ledger's entry withdrawn {1000 * (time.monotonic() - killed):.0f} ms later; "
            f"billing's {'still registered' if r.entry() else 'GONE TOO'}")
        entries(r)
        why(r)

        step(7, "The ledger app starts again")
        back = time.monotonic()
        ledger = start_sample_app(ledger_port, "ledger")
        wait_for(lambda: entry(r, "ledger"), 30, "the registration")
        say(f"    registered again {1000 * (time.monotonic() - back):.0f} ms later")
        entries(r)

        step(8, "systemctl stop, as it were: SIGTERM")
        stopping = time.monotonic()
        code = r.stop_agent()
        gone = r.entry() is None and entry(r, "ledger") is None
        ledger.kill()
        ledger.wait(5)
        say(f"    exit status {code} after {time.monotonic() - stopping:.1f}s: entries withdrawn, "
            f"{'gone' if gone else 'STILL THERE'}; Envoy drained and stopped")
        if code != 0 or not gone:
            return 1
    say()
    say("Done. Everything ran on loopback; the files are under " + str(tmp))
    return 0


def two_apps(r: Rig, source: str, ledger_port: int) -> None:
    """agent.yaml with `apps:`: the rig's billing app and ledger, each with its own group and entry."""
    cfg = r.config(source)
    billing = {**cfg.pop("app"), "name": "billing"}
    del cfg["registry"]["group"]
    ledger = {**copy.deepcopy(billing), "name": "ledger", "ports": [ledger_port],  # no YAML aliases: copies
              "probe": {**billing["probe"], "http_get": {"port": ledger_port, "path": "/healthz"}}}
    cfg["apps"] = [billing, ledger]
    r.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def entry(r: Rig, group: str) -> dict | None:
    return r.api.get("WorkloadEntry", NS, f"{group}-{ADDRESS}")


def why(r: Rig) -> None:
    """What the agent says about the withdrawn app, as an operator would read it on the VM."""
    status = json.loads(r.status_file.read_text())
    ledger = status["apps"]["ledger"]
    say(f"    mesh-agent status: ledger {ledger['app'].get('state')}: {ledger['app'].get('reason')}")


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


if __name__ == "__main__":
    sys.exit(main())
