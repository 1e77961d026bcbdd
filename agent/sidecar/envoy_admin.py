"""Talking to the proxy over HTTP: the readiness probe and Envoy's admin API (stats, epoch, drain)."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from agent.sidecar.profiles import LaunchSpec

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 1.0
DRAIN_POLL = 0.05


def probe_ready(url: str, expect_body: str | None = None, timeout: float = PROBE_TIMEOUT) -> bool:
    """One readiness GET: 200 (and, for Envoy's /ready, the body LIVE)."""
    parts = urlsplit(url)
    conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
        resp = conn.getresponse()
        body = resp.read(256).decode(errors="replace").strip()
        return resp.status == 200 and (expect_body is None or body == expect_body)
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def expected_ready_body(spec: LaunchSpec) -> str | None:
    """Envoy's own /ready answers LIVE once ready; other readiness URLs only need a 200."""
    return "LIVE" if spec.profile == "envoy" and spec.readiness_url.endswith("/ready") else None


def admin_request(spec: LaunchSpec, method: str, path: str, timeout: float = 2.0) -> tuple[int, str]:
    host, port = spec.admin_address
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def active_requests(spec: LaunchSpec) -> int | None:
    """Sum of http.*.downstream_rq_active from Envoy's stats; None if the admin API did not answer."""
    try:
        status, text = admin_request(spec, "GET", "/stats?filter=downstream_rq_active$")
    except (OSError, http.client.HTTPException):
        return None
    if status != 200:
        return None
    total = 0
    for line in text.splitlines():
        name, _, value = line.partition(":")
        # http.admin.* counts this very stats request: only the proxy's own listeners matter.
        if name.startswith("http.") and not name.startswith("http.admin.") \
                and name.endswith(".downstream_rq_active"):
            with contextlib.suppress(ValueError):
                total += int(value.strip())
    return total


def server_epoch(spec: LaunchSpec) -> int | None:
    """The --restart-epoch of the Envoy answering on the admin port (GET /server_info)."""
    try:
        status, text = admin_request(spec, "GET", "/server_info")
        if status != 200:
            return None
        return int(json.loads(text)["command_line_options"]["restart_epoch"])
    except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError):
        return None


def drain(spec: LaunchSpec, deadline: float, stop_waiting: Callable[[], bool]) -> None:
    """Envoy: fail health checks, drain inbound listeners, wait for in-flight requests.

    Waits until no request is in flight, `deadline` (time.monotonic()) passes, or stop_waiting()
    (the proxy exited, or a stop cut the drain short)."""
    for path in ("/healthcheck/fail", "/drain_listeners?graceful&inboundonly"):
        try:
            status, body = admin_request(spec, "POST", path)
            if status != 200:
                log.warning("sidecar drain: POST %s answered %d: %s", path, status, body.strip()[:200])
        except (OSError, http.client.HTTPException) as exc:
            log.warning("sidecar drain: POST %s failed: %s", path, exc)
            return
    while time.monotonic() < deadline and not stop_waiting():
        active = active_requests(spec)
        if active is None or active == 0:
            log.info("sidecar drained")
            return
        time.sleep(DRAIN_POLL)
    if not stop_waiting():
        log.warning("sidecar drain timed out after %gs; stopping it anyway", spec.policy.drain_timeout)
