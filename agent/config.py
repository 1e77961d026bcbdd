"""agent.yaml: the configuration schema, its defaults, and loading with actionable errors.

The `app` and `identity` sections live with their concerns (agent/health/config.py,
agent/identity/config.py); the rest, and the file as a whole, here.

Every key is documented in docs/configuration.md; packaging/agent.yaml.example is the commented
example shipped as /etc/mesh-agent/agent.yaml. Keys are snake_case; a probe override uses the same
names as Istio's WorkloadGroup probe, in snake_case.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from agent.health.config import AppConfig, NamedAppConfig
from agent.identity.config import IdentityConfig
from agent.schema import MAX_BYTES, Loader, SchemaError, SchemaErrors, decode, field
from agent.units import Duration, Size
from agent.units import duration as _d

DEFAULT_PATH = "/etc/mesh-agent/agent.yaml"
ENV_VAR = "MESH_AGENT_CONFIG"
EX_CONFIG = 78  # sysexits.h: configuration error; the unit does not restart on it


# --- bundle ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KubernetesSourceConfig:
    """How to build the bundle from the cluster (bundle.source: kubernetes)."""
    namespace: str | None = field(None, help="the WorkloadGroup's namespace (required with source kubernetes)")
    group: str | None = field(None, help="the WorkloadGroup's name (required with source kubernetes)")
    istio_namespace: str = field("istio-system", help="namespace istiod runs in")
    revision: str = field("", help="istio revision; empty for the default revision")
    gateway_address: str | None = field(None, help="address for the istiod hosts line; "
                                        "default: the east-west gateway Service's address")
    gateway_service: str = field("istio-eastwestgateway", help="the gateway Service, NAME or "
                                 "NAME.NAMESPACE (default namespace: istio_namespace)")
    cluster_id: str | None = field(None, help="ISTIO_META_CLUSTER_ID; default: from the "
                                   "istio-sidecar-injector ConfigMap, else Kubernetes")
    read_istio_config: bool = field(True, help="read the istio[-<rev>] ConfigMap, the injector "
                                    "ConfigMap and the gateway Service in istio_namespace")
    dns_capture: bool = field(True, help="ISTIO_META_DNS_CAPTURE, as istioctl --capture-dns")
    token_lifetime: Duration = field(_d("1h"), min=600.0, max=86400.0 * 2,
                                     help="lifetime of each minted istio token")
    static_dir: str | None = field(None, help="directory with mesh.yaml/hosts made by the admin, "
                                   "used when the agent may not read the istio namespace")


@dataclass(frozen=True)
class BundleConfig:
    """Where the mesh bundle comes from and how it is kept fresh."""

    source: str = field(help="https:// URL, file:// or path to a .tar.gz, a directory, or `kubernetes`")
    ca_file: str | None = field(None, help="CA bundle to verify an https source (default: system CAs)")
    token_file: str | None = field(None, help="file holding a bearer token sent to an https source")
    client_cert: str | None = field(None, help="client certificate (PEM) for an https source")
    client_key: str | None = field(None, help="key of client_cert")
    allow_insecure: bool = field(False, help="allow an http:// source (never in production)")
    connect_timeout: Duration = field(_d("5s"), min=0.1, max=300.0, help="TCP+TLS connect timeout")
    read_timeout: Duration = field(_d("30s"), min=0.1, max=600.0, help="timeout between bytes")
    fetch_deadline: Duration = field(_d("2m"), min=0.1, max=3600.0,
                                     help="longest a whole fetch may take, retries included")
    max_size: Size = field(Size(1024 * 1024), min=1024, max=64 * 1024 * 1024,
                           help="largest bundle accepted")
    refresh_fraction: float = field(0.7, min=0.1, max=0.95,
                                    help="refresh when this fraction of the token's lifetime has passed")
    refresh_interval: Duration = field(_d("1h"), min=10.0,
                                       help="refresh period when the bundle's token has no expiry")
    on_autoregister: Literal["drop", "refuse"] = field(
        "drop", help="what to do with ISTIO_META_AUTO_REGISTER_GROUP in cluster.env")
    restore_tampered: bool = field(True, help="restore installed files edited or deleted by hand")
    allow_exec_probe: bool = field(
        False, help="run an exec probe that comes from the mesh (bundle, WorkloadGroup), as sidecar.user "
        "without new privileges; refused by default")
    kubernetes: KubernetesSourceConfig = field(factory=KubernetesSourceConfig)

    @staticmethod
    def checks(c: BundleConfig) -> list[tuple[str, str]]:
        out = []
        if (c.client_cert is None) != (c.client_key is None):
            out.append(("client_cert", "client_cert and client_key must be set together"))
        if c.source.startswith("http://") and not c.allow_insecure:
            out.append(("source", "http:// is refused; use https:// or set bundle.allow_insecure: true"))
        if not c.source.strip():
            out.append(("source", "must not be empty"))
        if c.source == "kubernetes" and not (c.kubernetes.namespace and c.kubernetes.group):
            out.append(("kubernetes.group", "source kubernetes needs kubernetes.namespace and "
                        "kubernetes.group (the WorkloadGroup)"))
        return out


# --- sidecar --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PackageConfig:
    """The istio-sidecar .deb; overrides the bundle's sidecar.yaml."""
    url: str | None = field(None, help="https:// URL, file:// URL or path of the .deb")
    version: str | None = field(None, help="the package version it holds (dpkg's format)")
    sha256: str | None = field(None, help="hex sha256 of the .deb, checked before use")

    @staticmethod
    def checks(c: PackageConfig) -> list[tuple[str, str]]:
        out = []
        if c.url and not (c.version and c.sha256):
            out.append(("url", "a package url needs version and sha256 too"))
        if c.sha256 is not None and (len(c.sha256) != 64 or
                                     any(ch not in "0123456789abcdef" for ch in c.sha256.lower())):
            out.append(("sha256", "expected 64 hex digits"))
        return out


@dataclass(frozen=True)
class BackoffConfig:
    """Restart or retry delays: exponential with full jitter."""

    initial: Duration = field(_d("200ms"), min=0.01, max=60.0, help="first delay's ceiling")
    max: Duration = field(_d("30s"), min=0.1, max=3600.0, help="largest delay (exponential, full jitter)")


@dataclass(frozen=True)
class CrashLoopConfig:
    """When a crashing sidecar is given up on (FATAL: the agent exits non-zero)."""

    max_exits: int = field(5, min=1, max=1000, help="exits within window that make the sidecar FATAL")
    window: Duration = field(_d("120s"), min=1.0, max=86400.0, help="sliding window for max_exits")


@dataclass(frozen=True)
class LivenessConfig:
    """Once ready, the proxy's readiness URL keeps being asked: a proxy that stops answering (hung,
    overloaded) is taken out of the mesh, and restarted if it does not recover."""

    period: Duration = field(_d("10s"), min=0.0, max=3600.0, help="ask this often once ready; 0: never")
    timeout: Duration = field(_d("1s"), min=0.1, max=60.0, help="each answer's time limit")
    failure_threshold: int = field(3, min=1, max=100, help="failed answers in a row after which the proxy "
                                   "is not ready (the entries are withdrawn)")
    restart_threshold: int = field(6, min=0, max=1000, help="failed answers in a row after which the proxy "
                                   "is killed and restarted (counted as a crash); 0: never")


@dataclass(frozen=True)
class SidecarConfig:
    """The proxy the agent installs, runs, supervises and drains."""

    profile: Literal["istio", "envoy"] = field("istio", help="istio: pilot-agent + Envoy; envoy: plain Envoy")
    package: PackageConfig = field(factory=PackageConfig)
    command: tuple[str, ...] | None = field(None, help="argv override for the proxy")
    envoy_binary: str = field("/usr/local/bin/envoy", help="Envoy binary (envoy profile)")
    pilot_agent_binary: str = field("/usr/local/bin/pilot-agent", help="pilot-agent binary (istio profile)")
    bootstrap: str | None = field(None, help="Envoy bootstrap file (envoy profile)")
    base_id: int = field(0, min=0, max=65535, help="Envoy --base-id (envoy profile)")
    admin_address: str = field("127.0.0.1:15000", help="Envoy admin host:port")
    readiness_url: str | None = field(None, help="default: :15021/healthz/ready (istio), "
                                      "<admin>/ready (envoy)")
    ready_timeout: Duration = field(_d("60s"), min=1.0, max=3600.0,
                                    help="not ready within this after start: restart it")
    backoff: BackoffConfig = field(factory=BackoffConfig)
    crash_loop: CrashLoopConfig = field(factory=CrashLoopConfig)
    liveness: LivenessConfig = field(factory=LivenessConfig)
    drain_timeout: Duration = field(_d("20s"), min=0.0, max=3600.0,
                                    help="longest wait for in-flight requests when stopping")
    stop_grace: Duration = field(_d("10s"), min=0.1, max=600.0, help="SIGTERM to SIGKILL")
    user: str = field("istio-proxy", help="user the proxy runs as (istio profile)")
    log_dir: str | None = field(None, help="also write the proxy's output under this directory "
                                "(e.g. /var/log/istio); default: journal only")
    manage_iptables: bool = field(True, help="run pilot-agent istio-iptables unless "
                                  "ISTIO_CUSTOM_IP_TABLES=true (istio profile)")

    @staticmethod
    def checks(c: SidecarConfig) -> list[tuple[str, str]]:
        out = []
        if c.profile == "envoy" and not c.bootstrap and not c.command:
            out.append(("bootstrap", "the envoy profile needs a bootstrap file"))
        if c.backoff.initial > c.backoff.max:
            out.append(("backoff.initial", "must not be larger than backoff.max"))
        if ":" not in c.admin_address:
            out.append(("admin_address", f'expected host:port, got "{c.admin_address}"'))
        live = c.liveness
        if live.restart_threshold and live.restart_threshold < live.failure_threshold:
            out.append(("liveness.restart_threshold", "must be 0 or at least liveness.failure_threshold"))
        return out


# --- registry -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MetadataAddressConfig:
    """The address as the cloud's metadata service tells it (GCP, Azure IMDS, AWS IMDSv2)."""
    provider: Literal["none", "gcp", "azure", "aws"] = field(
        "none", help="none: not from metadata; gcp, azure, aws: ask that cloud's metadata service")
    which: Literal["private", "public", "ipv6"] = field(
        "private", help="the first interface's private IPv4, its public (external) IPv4, or its IPv6 address")
    endpoint: str | None = field(None, help="metadata service base URL; default: the cloud's own")
    timeout: Duration = field(_d("5s"), min=0.5, max=60.0, help="per request to the metadata service")
    tries: int = field(3, min=1, max=10, help="attempts per lookup before it counts as failed")
    every: Duration = field(_d("60s"), min=1.0, max=86400.0,
                            help="ask again this often, to follow a reassigned address (with watch not 0)")

    @staticmethod
    def checks(c: MetadataAddressConfig) -> list[tuple[str, str]]:
        out = []
        if c.endpoint is not None and not c.endpoint.startswith(("http://", "https://")):
            out.append(("endpoint", f'expected an http:// or https:// URL, got "{c.endpoint}"'))
        if c.provider == "none" and c.endpoint is not None:
            out.append(("provider", "endpoint is set but provider is none"))
        return out


@dataclass(frozen=True)
class AddressConfig:
    """The VM's address in the mesh. Default: ISTIO_SVC_IP, else the default route's interface."""
    value: str | None = field(None, help="a fixed address")
    interface: str | None = field(None, help="take the address of this interface")
    cidr: str | None = field(None, help="take the first local address inside this CIDR")
    metadata: MetadataAddressConfig = field(factory=MetadataAddressConfig)
    family: Literal["auto", "ipv4", "ipv6"] = field(
        "auto", help="address family; auto: IPv4 when the VM has one (a dual-stack VM registers its "
        "IPv4 address), else IPv6")
    watch: Duration = field(_d("5s"), min=0.0, max=3600.0,
                            help="look for a changed address this often and move the entry (0: never); "
                            "the metadata service is asked every metadata.every instead")

    @staticmethod
    def checks(c: AddressConfig) -> list[tuple[str, str]]:
        import ipaddress

        out = []
        chosen = [k for k, v in (("value", c.value), ("interface", c.interface), ("cidr", c.cidr),
                                 ("metadata", c.metadata.provider if c.metadata.provider != "none" else None))
                  if v is not None]
        if len(chosen) > 1:
            out.append((chosen[1], f"set at most one of value, interface, cidr, metadata (have {', '.join(chosen)})"))
        want = {"ipv4": 4, "ipv6": 6}.get(c.family)
        if c.value is not None:
            try:
                ip = ipaddress.ip_address(c.value)
                if want is not None and ip.version != want:
                    out.append(("value", f'"{c.value}" is not an {c.family} address (family: {c.family})'))
            except ValueError:
                out.append(("value", f'expected an IP address, got "{c.value}"'))
        if c.interface is not None and (not c.interface.strip() or "/" in c.interface or len(c.interface) > 15):
            out.append(("interface", f'"{c.interface}" is not an interface name'))
        if c.cidr is not None:
            try:
                net = ipaddress.ip_network(c.cidr, strict=False)
                if want is not None and net.version != want:
                    out.append(("cidr", f'"{c.cidr}" is not an {c.family} network (family: {c.family})'))
            except ValueError:
                out.append(("cidr", f'expected a CIDR like "10.0.0.0/8", got "{c.cidr}"'))
        if c.metadata.provider != "none" and c.metadata.which == "ipv6" and c.family == "ipv4":
            out.append(("metadata.which", "which: ipv6 contradicts family: ipv4"))
        if c.metadata.provider != "none" and c.metadata.which in ("private", "public") and c.family == "ipv6":
            out.append(("metadata.which", f"which: {c.metadata.which} is an IPv4 address; "
                        "family: ipv6 needs which: ipv6"))
        return out


@dataclass(frozen=True)
class LeaseConfig:
    """The coordination.k8s.io Lease that proves this VM is alive."""

    duration: Duration = field(_d("40s"), min=5.0, max=3600.0,
                               help="leaseDurationSeconds: silent this long, the VM counts as dead")
    renew: Duration = field(_d("20s"), min=1.0, max=1800.0, help="renewal period (jittered)")


@dataclass(frozen=True)
class RegistryConfig:
    """Registration of the VM's WorkloadEntry through the Kubernetes API."""

    enabled: bool = field(True, help="register the VM's WorkloadEntry")
    kubeconfig: str | None = field(None, help="default: the bundle's kubeconfig")
    server: str | None = field(None, help="API server URL, used with token_file and ca_file")
    ca_file: str | None = field(None, help="CA of the API server, with server")
    token_file: str | None = field(None, help="bearer token, re-read when it changes")
    renew_token: bool = field(False, help="renew the agent's own service-account token with "
                              "TokenRequest before it expires")
    namespace: str | None = field(None, help="default: POD_NAMESPACE from cluster.env")
    group: str | None = field(None, help="WorkloadGroup name; default: ISTIO_META_WORKLOAD_NAME")
    address: AddressConfig = field(factory=AddressConfig)
    network: str | None = field(None, help="default: ISTIO_META_NETWORK")
    locality: str | None = field(None, help="region/zone/subzone")
    weight: int | None = field(None, min=0, max=4294967295, help="load-balancing weight of the entry")
    labels: dict[str, str] = field(factory=dict, help="extra labels on the entry")
    on_unhealthy: Literal["delete", "condition"] = field(
        "delete", help="delete the entry, or keep it with condition Healthy=False")
    lease: LeaseConfig = field(factory=LeaseConfig)
    resync: Duration = field(_d("15m"), min=5.0, max=86400.0, help="re-read and fix the entry this often")
    timeout: Duration = field(_d("10s"), min=0.5, max=300.0, help="per API request: connect, and each wait "
                              "for bytes")
    request_deadline: Duration = field(_d("30s"), min=1.0, max=600.0,
                                       help="a whole API request, retries included: an API server that "
                                       "trickles its answer is cut then; a watch is cut this long after the "
                                       "server should have ended it")
    backoff: BackoffConfig = field(factory=lambda: BackoffConfig(_d("500ms"), _d("18s")))
    events: bool = field(True, help="record Kubernetes Events (events.k8s.io/v1) on the entry: why it was "
                         "registered, withdrawn or left alone")

    @staticmethod
    def checks(c: RegistryConfig) -> list[tuple[str, str]]:
        out = []
        if c.kubeconfig and c.server:
            out.append(("server", "set kubeconfig or server, not both"))
        if c.request_deadline < c.timeout:
            out.append(("request_deadline", "must not be shorter than timeout"))
        if c.lease.renew >= c.lease.duration:
            out.append(("lease.renew", "must be shorter than lease.duration"))
        if c.locality is not None and c.locality.count("/") > 2:
            out.append(("locality", f'expected "region/zone/subzone", got "{c.locality}"'))
        return out


# --- the rest -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShutdownConfig:
    """The draining stop on SIGTERM."""

    propagation: Duration = field(_d("5s"), min=0.0, max=600.0,
                                  help="wait after withdrawing the entry, before draining")
    timeout: Duration = field(_d("60s"), min=1.0, max=3600.0, help="whole stop, after which it is forced")


@dataclass(frozen=True)
class StatusConfig:
    """What the agent reports to systemd and `mesh-agent status`."""

    ready_when_unhealthy: bool = field(True, help="tell systemd READY=1 when the app is known "
                                       "unhealthy or the VM has no address yet, so `systemctl start` "
                                       "does not hang")
    recent_errors: int = field(20, min=0, max=1000, help="errors kept for `mesh-agent status`")


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics on a local port."""

    enabled: bool = field(True, help="serve Prometheus metrics")
    address: str = field("127.0.0.1", help="listen address (keep it local)")
    port: int = field(15099, min=1, max=65535, help="listen port")


@dataclass(frozen=True)
class LoggingConfig:
    """Log level and destination."""

    level: Literal["debug", "info", "warning", "error"] = field("info", help="least severity logged")
    target: Literal["auto", "journal", "stderr"] = field(
        "auto", help="auto: journald when started by systemd, else stderr")


@dataclass(frozen=True)
class Config:
    bundle: BundleConfig = field()
    sidecar: SidecarConfig = field(factory=SidecarConfig)
    app: AppConfig = field(factory=AppConfig)
    apps: tuple[NamedAppConfig, ...] = field((), help="several apps on this VM, each with its own WorkloadGroup "
                                             "and entry (instead of app: and registry.group)")
    registry: RegistryConfig = field(factory=RegistryConfig)
    shutdown: ShutdownConfig = field(factory=ShutdownConfig)
    status: StatusConfig = field(factory=StatusConfig)
    metrics: MetricsConfig = field(factory=MetricsConfig)
    logging: LoggingConfig = field(factory=LoggingConfig)
    identity: IdentityConfig = field(factory=IdentityConfig)
    configured: bool = field(True, help="false keeps the service from starting (the shipped example "
                             "says false until an admin or image builder fills it in)")
    root: str = field("/", help="prefix for every managed path (tests and the demo)")
    state_dir: str = field("/var/lib/mesh-agent", help="persistent state: last good bundle, token copy")
    run_dir: str = field("/run/mesh-agent", help="runtime state: status.json, pid files")

    @staticmethod
    def checks(c: Config) -> list[tuple[str, str]]:
        out = []
        r, ident = c.registry, c.identity.provider
        if r.server and not r.token_file and ident == "none":
            out.append(("registry.token_file", "registry.server needs registry.token_file "
                        "(or an identity provider)"))
        if ident != "none" and r.token_file:
            out.append(("registry.token_file", f"identity provider {ident} is the API credential: "
                        "remove registry.token_file"))
        if ident != "none" and r.renew_token:
            out.append(("registry.renew_token", "renew_token is for service-account tokens, not an identity "
                        "provider's"))
        return out + _apps_checks(c)


class ConfigError(Exception):
    """The configuration cannot be used; str() is one line per problem."""

    def __init__(self, errors: list[SchemaError]) -> None:
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = errors


def config_path(cli_value: str | None = None) -> str:
    return cli_value or os.environ.get(ENV_VAR) or DEFAULT_PATH


def parse(text: str, file: str = "agent.yaml") -> Config:
    """Parse agent.yaml's text; raises ConfigError listing every problem found, and nothing else."""
    try:
        return Loader(file).load(text, Config)
    except SchemaErrors as exc:
        raise ConfigError(exc.errors) from None


def parse_bytes(data: bytes, file: str = "agent.yaml") -> Config:
    """As parse, for the file's bytes: too large or not UTF-8 is a ConfigError too."""
    try:
        text = decode(data, file)
    except SchemaErrors as exc:
        raise ConfigError(exc.errors) from None
    return parse(text, file)


def read(path: str) -> bytes:
    """The file's bytes, at most MAX_BYTES + 1 of them (enough to tell that it is too large)."""
    try:
        with open(path, "rb") as f:
            return f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError([SchemaError(path, 0, "", f"cannot read: {exc.strerror or exc}")]) from None


def load(path: str) -> Config:
    return parse_bytes(read(path), path)


def to_dict(obj: Any) -> Any:
    """A config (or part of one) as plain data, e.g. for `config check --show`."""
    import dataclasses

    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _apps_checks(c: Config) -> list[tuple[str, str]]:
    """Several apps share one address and one sidecar: Istio then builds the proxy's inbound listeners
    from every entry with that address, so two apps must not claim one port, nor one WorkloadGroup
    (their entries would have one name)."""
    if not c.apps:
        return []
    out = []
    if c.app != AppConfig():
        out.append(("app", "use either app: (one app) or apps: (several), not both"))
    if c.registry.group:
        out.append(("registry.group", "with apps:, each app names its WorkloadGroup (apps[].group)"))
    names: dict[str, int] = {}
    groups: dict[str, int] = {}
    ports: dict[int, str] = {}
    for i, a in enumerate(c.apps):
        if a.name in names:
            out.append((f"apps[{i}].name", f"{a.name!r} is also apps[{names[a.name]}]'s name"))
        names.setdefault(a.name, i)
        if a.group_name in groups:
            out.append((f"apps[{i}].group", f"WorkloadGroup {a.group_name!r} is also apps[{groups[a.group_name]}]'s: "
                                            "one group, one entry per VM"))
        groups.setdefault(a.group_name, i)
        for port in a.ports:
            if port in ports and ports[port] != a.name:
                out.append((f"apps[{i}].ports", f"port {port} is also {ports[port]}'s: apps on one VM share its "
                                                "address, so each port belongs to one app"))
            ports.setdefault(port, a.name)
    return out
