"""Shared pieces of the sidecar tests: a local app, a driving loop, the istio profile's stand-in (the real
Envoy and its bootstraps are in devkit.envoy)."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from agent.config import BackoffConfig, SidecarConfig
from agent.sidecar.machine import SidecarStateChanged
from agent.sidecar.supervisor import Supervisor
from agent.units import Duration
from devkit.envoy import bootstrap, free_base_id, reachable_envoy
from devkit.ports import free_port


class Loop:
    """A minimal stand-in for the daemon's loop: a queue of events, ticks between them."""

    def __init__(self) -> None:
        self.events: queue.Queue[object] = queue.Queue()
        self.seen: list[object] = []

    def post(self, event: object) -> None:
        self.events.put(event)

    def run_until(self, sup: Supervisor, done: Callable[[], bool], timeout: float = 20.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if done():
                return True
            deadline = sup.tick()
            wait = 0.05 if deadline is None else max(0.0, min(0.05, deadline - time.monotonic()))
            try:
                event = self.events.get(timeout=wait)
            except queue.Empty:
                continue
            self.seen.append(event)
            sup.handle(event)
        return done()

    def states(self, sup: Supervisor) -> list[object]:
        """Handle what is queued, then the states the supervisor went through, in order."""
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                break
            self.seen.append(event)
            sup.handle(event)
        return [e.state for e in self.seen if isinstance(e, SidecarStateChanged)]


class App:
    """A local HTTP app; /slow answers after `delay` seconds, to keep requests in flight."""

    def __init__(self, delay: float = 0.3) -> None:
        delay_s = delay

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path.startswith("/slow"):
                    time.sleep(delay_s)
                body = b"ok\n"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                # The proxy may go away mid-answer: what the drain tests are about.
                with contextlib.suppress(OSError):
                    self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


CLUSTER_ENV = {
    "CANONICAL_REVISION": "latest",
    "CANONICAL_SERVICE": "billing",
    "ISTIO_INBOUND_PORTS": "8080",
    "ISTIO_LOCAL_EXCLUDE_PORTS": "22,15090,15021,15020",
    "ISTIO_METAJSON_LABELS": '{"app":"billing","version":"v1"}',
    "ISTIO_META_CLUSTER_ID": "cluster1",
    "ISTIO_META_NETWORK": "",
    "ISTIO_NAMESPACE": "vm-apps",
    "ISTIO_SERVICE": "billing.vm-apps",
    "POD_NAMESPACE": "vm-apps",
    "SERVICE_ACCOUNT": "billing-vm",
    "TRUST_DOMAIN": "cluster.local",
}


class IstioStandIn:
    """The istio profile wired to tests/.../fake_pilot_agent.py, in a directory any user can read.

    The stand-in's settings travel in sidecar.env, as an operator's would.
    """

    def __init__(self, user: str | None, **overrides: object) -> None:
        import tempfile

        from agent.sidecar import profiles

        self.dir = Path(tempfile.mkdtemp(prefix="mesh-agent-sidecar-"))
        self.dir.chmod(0o755)
        self.admin = free_port()
        self.bootstrap = self.dir / "bootstrap.json"
        self.bootstrap.write_text(bootstrap(self.admin))
        self.pilot_agent = self.dir / "pilot-agent"
        source = (Path(__file__).parent / "fake_pilot_agent.py").read_text()
        # The proxy's user must be able to run it: the test's interpreter may live under a directory
        # only its owner can enter (a clone in /root), Debian's own is always reachable (stdlib only).
        python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
        self.pilot_agent.write_text(f"#!{python}\n{source}")
        self.pilot_agent.chmod(0o755)
        self.record = self.dir / "record" / "calls.jsonl"
        self.record.parent.mkdir()
        self.record.touch()
        self.record.chmod(0o666)   # written by the agent (root) and the proxy user
        self.sidecar_env = {"STANDIN_RECORD": str(self.record), "STANDIN_ENVOY": reachable_envoy(),
                            "STANDIN_BOOTSTRAP": str(self.bootstrap),
                            "STANDIN_BASE_ID": str(free_base_id())}
        values: dict = dict(
            profile="istio", pilot_agent_binary=str(self.pilot_agent), user=user or "istio-proxy",
            admin_address=f"127.0.0.1:{self.admin}",
            readiness_url=f"http://127.0.0.1:{self.admin}/ready", ready_timeout=Duration(20.0),
            backoff=BackoffConfig(Duration(0.05), Duration(0.5)), stop_grace=Duration(2.0))
        values.update(overrides)
        self.cfg = SidecarConfig(**values)
        self.spec = profiles.istio_profile(self.cfg, sidecar_env=self.sidecar_env,
                                           cluster_env=CLUSTER_ENV, hostname="vm-7.example.internal",
                                           address="10.1.2.3", proxy_ports=())
        if user is None:   # cannot switch users: run as ourselves, the spec was checked already
            import dataclasses

            self.spec = dataclasses.replace(self.spec, user=None)
        self._os = os

    def calls(self) -> list[dict]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
