"""agent.yaml's `app` section: the local app, the probe that overrides the mesh's, flap damping.

The probe uses the names of Istio's WorkloadGroup probe in snake_case; agent/config.py holds the
whole file's schema and loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from agent.schema import field
from agent.units import Duration
from agent.units import duration as _d


@dataclass(frozen=True)
class HttpHeader:
    """A header sent by an http_get probe."""

    name: str = field()
    value: str = field("")


@dataclass(frozen=True)
class HttpGetProbe:
    port: int = field(min=1, max=65535, help="port to GET")
    path: str = field("/", help="path to GET; 200-399 is healthy")
    host: str | None = field(None, help="default: app.probe_host")
    scheme: Literal["HTTP", "HTTPS"] = field("HTTP", help="HTTPS certificates are not verified, as kubelet")
    http_headers: tuple[HttpHeader, ...] = field((), help="list of {name, value}")


@dataclass(frozen=True)
class TcpSocketProbe:
    port: int = field(min=1, max=65535, help="port to connect to")
    host: str | None = field(None, help="default: app.probe_host")


@dataclass(frozen=True)
class ExecProbe:
    command: tuple[str, ...] = field(help="argv, run without a shell; exit 0 is healthy")

    @staticmethod
    def checks(c: ExecProbe) -> list[tuple[str, str]]:
        return [("command", "must not be empty")] if not c.command else []


@dataclass(frozen=True)
class GrpcProbe:
    port: int = field(min=1, max=65535, help="grpc.health.v1 port")
    service: str = field("", help="service name sent in the health check")


@dataclass(frozen=True)
class ProbeConfig:
    """Istio's WorkloadGroup probe, in snake_case. Exactly one of the four kinds."""
    http_get: HttpGetProbe | None = field(None, help="HTTP GET probe")
    tcp_socket: TcpSocketProbe | None = field(None, help="TCP connect probe")
    exec: ExecProbe | None = field(None, help="command probe")
    grpc: GrpcProbe | None = field(None, help="gRPC health probe (needs python3-grpcio)")
    initial_delay: Duration = field(_d("0s"), min=0.0, max=3600.0, help="wait before the first probe")
    timeout: Duration = field(_d("1s"), min=0.001, max=600.0, help="a probe slower than this failed")
    period: Duration = field(_d("10s"), min=0.01, max=3600.0, help="time between probes")
    success_threshold: int = field(1, min=1, max=100, help="successes in a row to become healthy")
    failure_threshold: int = field(3, min=1, max=100, help="failures in a row to become unhealthy")

    @staticmethod
    def checks(c: ProbeConfig) -> list[tuple[str, str]]:
        kinds = [k for k in ("http_get", "tcp_socket", "exec", "grpc") if getattr(c, k) is not None]
        if len(kinds) != 1:
            return [("http_get", "a probe needs exactly one of http_get, tcp_socket, exec, grpc"
                                 + (f" (got {', '.join(kinds)})" if kinds else ""))]
        if c.grpc is not None:
            try:
                import grpc  # noqa: F401
            except ImportError:
                return [("grpc", "a grpc probe needs grpcio (Debian: apt install python3-grpcio)")]
        return []


@dataclass(frozen=True)
class FlapConfig:
    """Damping of health transitions, so a flapping app does not churn the mesh."""
    min_dwell: Duration = field(_d("5s"), min=0.0, max=3600.0,
                                help="least time after a transition before a return to Healthy "
                                "(going Unhealthy is never delayed)")
    max_transitions: int = field(6, min=2, max=1000, help="transitions allowed per window; past it the "
                                 "app is held Unhealthy until the window frees a slot")
    window: Duration = field(_d("5m"), min=1.0, max=86400.0, help="sliding window for max_transitions")


@dataclass(frozen=True)
class AppConfig:
    """The local application whose health decides registration."""

    ports: tuple[int, ...] = field((), min=1, max=65535,
                                   help="app ports; default: the group's ports or ISTIO_INBOUND_PORTS")
    probe: ProbeConfig | None = field(None, help="overrides the WorkloadGroup's probe")
    probe_host: Literal["localhost", "instance"] = field(
        "localhost", help="probe 127.0.0.1, or the instance address as Istio's agent does")
    flap: FlapConfig = field(factory=FlapConfig)
    watch_process: bool = field(True, help="watch the process owning the port; its exit is "
                                "Unhealthy at once")


@dataclass(frozen=True, kw_only=True)
class NamedAppConfig(AppConfig):
    """One of several apps on this VM (`apps:`): its own WorkloadGroup, entry, health and maintenance,
    sharing the VM's one sidecar and the bundle's service account."""

    name: str = field(help="a DNS label naming the app: in status, metrics, `deregister --app` and Events")
    group: str | None = field(None, help="its WorkloadGroup (in registry.namespace); default: the name")
    labels: dict[str, str] = field(factory=dict, help="extra labels on this app's entry, over registry.labels")

    @property
    def group_name(self) -> str:
        return self.group or self.name

    @staticmethod
    def checks(c: NamedAppConfig) -> list[tuple[str, str]]:
        import re

        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", c.name):
            return [("name", f"{c.name!r} is not a DNS label (lower case letters, digits and '-', at most 63)")]
        return []
