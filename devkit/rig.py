"""A whole mesh-agent on loopback: the API emulator with a WorkloadGroup, a bundle (directory or HTTPS),
a sample app, an Envoy bootstrap, agent.yaml under a temp root, and the agent as a real subprocess.

Used by tests/integration/daemon, the system tests, the demo (python -m demo) and bench/daemon_bench.py.
Nothing here is privileged: the envoy profile, unprivileged ports, and every path under the rig's root.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from devkit import bundles
from devkit.envoy import bootstrap_doc, envoy_binary, free_base_id
from devkit.kubeapi.server import KubeAPI
from devkit.ports import free_port, listening
from devkit.waiting import wait_for

REPO = Path(__file__).resolve().parent.parent
NS, GROUP, SA = bundles.NS, "billing", bundles.SA
ADDRESS = "127.0.0.1"


def envoy_bootstrap(admin_port: int, listener_port: int, app_port: int) -> dict[str, Any]:
    """The rig's proxy: admin on loopback and one inbound HTTP listener in front of the app."""
    return bootstrap_doc(admin_port, listener_port, app_port, node="vm", cluster=GROUP, route_timeout="5s")


def group_object(labels: dict[str, str] | None = None, port: int = 8080, name: str = GROUP,
                 service_account: str = SA) -> dict[str, Any]:
    return {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadGroup",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"metadata": {"labels": labels or {"app": name, "version": "v1"}},
                     "template": {"serviceAccount": service_account, "ports": {"http": port}}}}


def agent_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("NOTIFY_SOCKET", None)
    env.pop("WATCHDOG_USEC", None)
    env.pop("JOURNAL_STREAM", None)
    return env


@dataclass
class Rig:
    tmp: Path
    api: KubeAPI
    app_port: int = field(default_factory=free_port)
    listener_port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    istiod_port: int = field(default_factory=free_port)  # nothing listens unless a test starts it
    app: subprocess.Popen[bytes] | None = None
    agent: subprocess.Popen[bytes] | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    svc_ip: str | None = ADDRESS  # cluster.env's ISTIO_SVC_IP; None: the agent finds the address itself

    @property
    def root(self) -> Path:
        return self.tmp / "root"

    @property
    def config_path(self) -> Path:
        return self.tmp / "agent.yaml"

    @property
    def bundle_dir(self) -> Path:
        return self.tmp / "bundle"

    @property
    def entry_name(self) -> str:
        return self.entry_at(self.svc_ip or ADDRESS)

    @staticmethod
    def entry_at(address: str) -> str:
        return f"{GROUP}-{address.replace(':', '-')}"

    @property
    def status_file(self) -> Path:
        return self.root / "run/mesh-agent/status.json"

    # --- setting up ------------------------------------------------------------------------------

    def prepare(self, bundle_source: str | None = None) -> Rig:
        (self.root / "etc").mkdir(parents=True, exist_ok=True)
        (self.root / "etc/machine-id").write_text(f"{random.getrandbits(128):032x}\n")
        (self.root / "etc/hosts").write_text("127.0.0.1 localhost\n")
        with contextlib.suppress(Exception):
            self.api.create_namespace(NS)
        if self.api.get("WorkloadGroup", NS, GROUP) is None:
            self.api.create(group_object(port=self.app_port))
        (self.tmp / "envoy.yaml").write_text(yaml.safe_dump(
            envoy_bootstrap(self.admin_port, self.listener_port, self.app_port)))
        self.write_bundle()
        self.write_config(bundle_source or str(self.bundle_dir))
        return self

    def bundle_files(self, now: float | None = None) -> dict[str, bytes]:
        svc_ip_line = f"ISTIO_SVC_IP='{self.svc_ip}'\n" if self.svc_ip else ""
        env = bundles.CLUSTER_ENV_V4.replace("ISTIO_SVC_IP='10.0.0.5'\n", svc_ip_line) \
            .replace("ISTIO_INBOUND_PORTS='8080'", f"ISTIO_INBOUND_PORTS='{self.app_port}'")
        # istiod "is" on loopback, so that nothing (doctor's reachability check) dials elsewhere.
        env = env.replace("istiod.istio-system.svc:15012", f"istiod.istio-system.svc:{self.istiod_port}")
        mesh = bundles.MESH_YAML.replace("istiod.istio-system.svc:15012",
                                        f"istiod.istio-system.svc:{self.istiod_port}")
        return bundles.files(time.time() if now is None else now, replace={
            "cluster.env": env.encode(), "mesh.yaml": mesh.encode(),
            "hosts": b"127.0.0.1 istiod.istio-system.svc\n"})

    def write_bundle(self) -> None:
        bundles.write_dir(self.bundle_dir, self.bundle_files())

    def config(self, source: str) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "root": str(self.root),
            "bundle": {"source": source, "allow_insecure": False},
            "sidecar": {"profile": "envoy", "envoy_binary": envoy_binary(),
                        "bootstrap": str(self.tmp / "envoy.yaml"), "base_id": free_base_id(),
                        "admin_address": f"127.0.0.1:{self.admin_port}", "ready_timeout": "30s",
                        "backoff": {"initial": "100ms", "max": "1s"}, "drain_timeout": "3s",
                        "stop_grace": "3s"},
            "app": {"ports": [self.app_port],
                    "probe": {"http_get": {"port": self.app_port, "path": "/healthz"},
                              "period": "500ms", "timeout": "500ms", "failure_threshold": 2},
                    "flap": {"min_dwell": "0s"}},
            "registry": {"kubeconfig": str(self.api.kubeconfig), "namespace": NS, "group": GROUP,
                         "lease": {"duration": "10s", "renew": "2s"}, "resync": "30s", "timeout": "3s",
                         "backoff": {"initial": "200ms", "max": "2s"}},
            "shutdown": {"propagation": "1s", "timeout": "30s"},
            "metrics": {"port": self.metrics_port},
            "logging": {"level": "debug", "target": "stderr"},
        }
        return _merge(cfg, self.overrides)

    def write_config(self, source: str | None = None) -> None:
        current = yaml.safe_load(self.config_path.read_text()) if self.config_path.exists() else None
        source = source or (current or {}).get("bundle", {}).get("source") or str(self.bundle_dir)
        self.config_path.write_text(yaml.safe_dump(self.config(source), sort_keys=False))

    # --- processes -------------------------------------------------------------------------------

    def start_app(self) -> subprocess.Popen[bytes]:
        self.app = start_sample_app(self.app_port, "billing")
        return self.app

    def kill_app(self) -> None:
        if self.app is not None:
            self.app.kill()
            self.app.wait(5)
            self.app = None

    def start_agent(self, env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen[bytes]:
        out = open(log or self.tmp / "agent.log", "ab")  # noqa: SIM115 (the child keeps it)
        self.agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(self.config_path)],
                                      env={**agent_env(), **(env or {})}, stdout=out, stderr=out, cwd=REPO)
        out.close()
        return self.agent

    def stop_agent(self, timeout: float = 40.0) -> int:
        assert self.agent is not None
        self.agent.send_signal(signal.SIGTERM)
        code = self.agent.wait(timeout)
        self.agent = None
        return code

    def cleanup(self) -> None:
        if self.agent is not None and self.agent.poll() is None:
            self.agent.kill()
            self.agent.wait(5)
        self.kill_app()
        pidfile = self.root / "run/mesh-agent/sidecar.pid"
        with contextlib.suppress(OSError, ValueError, KeyError):  # no proxy left, or it is gone already
            os.killpg(int(json.loads(pidfile.read_text())["pid"]), signal.SIGKILL)

    # --- looking -----------------------------------------------------------------------------------

    def entry(self, name: str | None = None) -> dict[str, Any] | None:
        return self.api.get("WorkloadEntry", NS, name or self.entry_name)

    def lease(self, name: str | None = None) -> dict[str, Any] | None:
        return self.api.get("Lease", NS, name or self.entry_name)

    def log_text(self) -> str:
        path = self.tmp / "agent.log"
        return path.read_text(errors="replace") if path.exists() else ""


def start_sample_app(port: int, name: str) -> subprocess.Popen[bytes]:
    """demo/app.py on a loopback port, listening when this returns."""
    app = subprocess.Popen([sys.executable, "-m", "demo.app", "--port", str(port), "--name", name],
                           env=agent_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    wait_for(lambda: listening(port), 10, f"the app {name} to listen")
    return app


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@contextlib.contextmanager
def rig(tmp: Path, **overrides: Any) -> Iterator[Rig]:
    api = KubeAPI(state_dir=tmp / "kubeapi").start()
    r = Rig(tmp, api, overrides=overrides)
    try:
        yield r
    finally:
        r.cleanup()
        api.stop()


@contextlib.contextmanager
def app_rig(tmp: Path, **overrides: Any) -> Iterator[Rig]:
    """A rig with its inputs written and the sample app running: where most whole-agent tests start."""
    with rig(tmp, **overrides) as r:
        r.prepare()
        r.start_app()
        yield r
