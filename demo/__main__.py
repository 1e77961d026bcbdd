"""The local demo: a VM joining a mesh, on loopback, without root.

    ./scripts/demo.sh        (sets up, then runs: python -m demo)

It starts a Kubernetes API emulator with Istio's CRDs and a WorkloadGroup, serves a mesh bundle in
istioctl's format over HTTPS, starts a sample app, and runs mesh-agent (with a real Envoy) under a
temporary root. Then it shows the entry appearing, a request through Envoy, the app killed and the
entry withdrawn, the app back and registered again, and a clean stop.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from devkit import bundles
from devkit.bundleserver import serve
from devkit.rig import NS, REPO, Rig, agent_env, rig
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
        say(f"    namespace {NS}, WorkloadGroup billing (port http={r.app_port})")

        step(2, "The mesh bundle, as `istioctl x workload entry configure` writes it, served over HTTPS")
        server.state.body = bundles.make_tar(r.bundle_files())
        url = server.url + "/bundle.tar.gz"
        r.overrides = {"bundle": {"ca_file": str(server.ca_file)}, "logging": {"level": "info"}}
        r.write_config(url)
        say(f"    {url} (cluster.env, mesh.yaml, root-cert.pem, istio-token, hosts)")

        step(3, f"The sample app listens on 127.0.0.1:{r.app_port} (probe: GET /healthz)")
        r.start_app()

        step(4, "mesh-agent run: fetch and install the bundle, start Envoy, probe the app, register")
        say(f"    config {r.config_path}; log {tmp / 'vm' / 'agent.log'}")
        started = time.monotonic()
        r.start_agent()
        try:
            wait_for(r.entry, 90, "the WorkloadEntry")
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

        step(6, "The app is killed (SIGKILL)")
        killed = time.monotonic()
        r.kill_app()
        wait_for(lambda: r.entry() is None, 30, "the withdrawal")
        say(f"    entry withdrawn {1000 * (time.monotonic() - killed):.0f} ms later")
        entries(r)

        step(7, "The app starts again")
        back = time.monotonic()
        r.start_app()
        wait_for(r.entry, 30, "the registration")
        say(f"    registered again {1000 * (time.monotonic() - back):.0f} ms later")
        entries(r)

        step(8, "systemctl stop, as it were: SIGTERM")
        stopping = time.monotonic()
        code = r.stop_agent()
        say(f"    exit status {code} after {time.monotonic() - stopping:.1f}s: entry withdrawn, "
            f"{'gone' if r.entry() is None else 'STILL THERE'}; Envoy drained and stopped")
        if code != 0 or r.entry() is not None:
            return 1
    say()
    say("Done. Everything ran on loopback; the files are under " + str(tmp))
    return 0


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


if __name__ == "__main__":
    sys.exit(main())
