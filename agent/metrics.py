"""Prometheus metrics on a local port (prometheus-client; optional: without it, metrics are off)."""

from __future__ import annotations

import logging
import threading
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

prom: ModuleType | None = None  # prometheus_client, imported by the first Metrics that is on


def _load() -> ModuleType | None:
    """prometheus_client (about 3 MiB and 40 ms), imported only when metrics are on."""
    global prom
    if prom is None:
        try:
            import prometheus_client
        except ImportError:  # Debian: python3-prometheus-client is a Recommends, not a Depends
            return None
        prom = prometheus_client
    return prom

PHASES = ("starting", "running", "reloading", "stopping", "stopped", "failed")


class Metrics:
    """All metrics the agent exports. Off (`on=False`, agent.yaml's metrics.enabled) or without
    prometheus-client, every method is a no-op and prometheus-client is not even imported."""

    def __init__(self, on: bool = True) -> None:
        prom = _load() if on else None
        self.enabled = prom is not None
        if prom is None:
            return
        r = self.registry = prom.CollectorRegistry(auto_describe=True)
        self.phase = prom.Gauge("mesh_agent_phase", "1 for the agent's current phase", ["phase"], registry=r)
        # `app`: the app's name (`app` for the one app of an `app:` configuration; apps[].name otherwise).
        self.app_healthy = prom.Gauge("mesh_agent_app_healthy", "1 when the app is healthy", ["app"], registry=r)
        self.registered = prom.Gauge("mesh_agent_registered", "1 while the app's WorkloadEntry is registered",
                                     ["app"], registry=r)
        self.sidecar_ready = prom.Gauge("mesh_agent_sidecar_ready", "1 when the proxy is ready", registry=r)
        self.sidecar_restarts = prom.Counter("mesh_agent_sidecar_restarts", "proxy restarts", registry=r)
        self.address_changes = prom.Counter("mesh_agent_address_changes",
                                            "changes of the VM's mesh address noticed while running", registry=r)
        self.writes = prom.Counter("mesh_agent_registration_writes", "API writes by action and result",
                                   ["action", "result"], registry=r)
        self.events = prom.Counter("mesh_agent_events", "Kubernetes Events about the app's entry by outcome "
                                   "(created, patched, failed, dropped, filtered)", ["app", "result"], registry=r)
        self.errors = prom.Counter("mesh_agent_errors", "errors by where they happened", ["where"], registry=r)
        self.expiry = prom.Gauge("mesh_agent_expiry_timestamp_seconds",
                                 "when the bundle's token and root cert expire (unix time)", ["what"],
                                 registry=r)
        self.bundle_fetched = prom.Gauge("mesh_agent_bundle_fetched_timestamp_seconds",
                                         "last successful bundle fetch (unix time)", registry=r)
        self.api_contact = prom.Gauge("mesh_agent_api_last_contact_timestamp_seconds",
                                      "last successful Kubernetes API call (unix time)", registry=r)
        self.probe_latency = prom.Histogram(
            "mesh_agent_probe_duration_seconds", "app probe latency", ["result"], registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))

    def serve(self, address: str, port: int) -> bool:
        if prom is None or not self.enabled:
            log.warning("metrics are off: python3-prometheus-client is not installed")
            return False
        _serve(prom.make_wsgi_app(self.registry), address, port)
        log.info("metrics on http://%s:%d/metrics", address, port)
        return True

    def set_phase(self, phase: str) -> None:
        if self.enabled:
            for p in PHASES:
                self.phase.labels(p).set(1 if p == phase else 0)

    def set(self, name: str, value: float, *labels: str) -> None:
        if self.enabled:
            metric: Any = getattr(self, name)
            (metric.labels(*labels) if labels else metric).set(value)

    def inc(self, name: str, *labels: str, amount: float = 1) -> None:
        if self.enabled:
            metric: Any = getattr(self, name)
            (metric.labels(*labels) if labels else metric).inc(amount)

    def observe_probe(self, seconds: float, ok: bool) -> None:
        if self.enabled:
            self.probe_latency.labels("success" if ok else "failure").observe(seconds)

    def render(self) -> bytes:
        return prom.generate_latest(self.registry) if prom is not None and self.enabled else b""


def _serve(app: Any, address: str, port: int) -> None:
    """Serve `app` in a daemon thread that sleeps until a request comes.

    Not prometheus_client.start_http_server: its serve_forever wakes every 0.5 s to look for a
    shutdown request, 120 wake-ups a minute of an idle agent. The server here is never shut down (it
    ends with the process), so it polls once an hour."""
    import socket
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in address else socket.AF_INET

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass  # no line on stderr per scrape

    httpd = make_server(address, port, app, Server, handler_class=Quiet)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 3600.0}, daemon=True,
                     name="metrics").start()
