"""What to run for the sidecar: the launch spec of the `istio` and `envoy` profiles (pure).

`istio` does what Istio's `istio-start.sh` does when `istio.service` runs the sidecar, so that the
agent can run it instead: the environment from sidecar.env then cluster.env, the derived variables
(INSTANCE_IP, POD_NAME, POD_NAMESPACE, PROV_CERT, OUTPUT_CERTS, CA_ADDR, PROXY_CONFIG), the
`pilot-agent istio-iptables` cleanup and setup around the proxy, and `pilot-agent proxy` run as
`istio-proxy`. `envoy` runs a plain Envoy with a bootstrap file; its admin address comes from the
bootstrap and readiness is the admin `/ready` page.

The profile builders touch nothing: the caller passes the files' contents, the host name and the
address in. `read_spec()`, at the end, is the one helper that reads the two files a profile needs
(sidecar.env, the bootstrap). `agent.sidecar.supervisor.Supervisor` runs the resulting LaunchSpec.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from agent.config import SidecarConfig
from agent.paths import Layout

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ISTIO_READINESS_URL = "http://127.0.0.1:15021/healthz/ready"
# Ports pilot-agent and its Envoy listen on besides admin and readiness: outbound capture,
# inbound capture, pilot-agent's status/merged metrics, Envoy's Prometheus stats.
ISTIO_PROXY_PORTS = (15001, 15006, 15020, 15090)
CERTS_DIR = "/etc/certs"
# Set in the proxy's environment so a proxy left by a killed agent can be recognised as ours.
MARKER_ENV = "MESH_AGENT_SIDECAR"


class ProfileError(ValueError):
    """The inputs cannot make a launch spec (e.g. an unreadable bootstrap); the message says why."""


class NoAddress(ProfileError):
    """The profile needs this VM's address and there is none yet."""


@dataclass(frozen=True)
class Policy:
    """How the proxy is supervised (from agent.yaml's sidecar section)."""
    ready_timeout: float = 60.0
    backoff_initial: float = 0.2
    backoff_max: float = 30.0
    max_exits: int = 5
    window: float = 120.0
    drain_timeout: float = 20.0
    stop_grace: float = 10.0
    liveness_period: float = 10.0      # once ready, readiness asked this often (0: never)
    liveness_timeout: float = 1.0
    failure_threshold: int = 3         # failed answers in a row: not ready
    restart_threshold: int = 6         # failed answers in a row: killed (0: never)

    @classmethod
    def from_config(cls, cfg: SidecarConfig) -> Policy:
        live = cfg.liveness
        return cls(cfg.ready_timeout, cfg.backoff.initial, cfg.backoff.max, cfg.crash_loop.max_exits,
                   cfg.crash_loop.window, cfg.drain_timeout, cfg.stop_grace, live.period, live.timeout,
                   live.failure_threshold, live.restart_threshold)


@dataclass(frozen=True)
class LaunchSpec:
    """Everything the supervisor needs to run, recognise, probe, drain and stop the proxy."""
    profile: Literal["istio", "envoy"]
    argv: tuple[str, ...]
    env: Mapping[str, str]
    user: str | None                      # run as this user; None: as the agent
    readiness_url: str
    admin_address: tuple[str, int]        # Envoy's admin (host, port)
    ports: tuple[int, ...]                # must be free (or held by our own proxy) before starting
    drain: Literal["admin", "signal"]     # admin: Envoy's admin API; signal: SIGTERM (pilot-agent drains)
    pre_start: tuple[tuple[str, ...], ...] = ()   # commands run before each start, as the agent
    post_stop: tuple[tuple[str, ...], ...] = ()   # commands run after the proxy stopped
    identifier: str = "envoy"             # journal identifier (SYSLOG_IDENTIFIER) of the proxy's output
    log_dir: str | None = None            # also append the output to <log_dir>/<identifier>.log
    policy: Policy = field(default_factory=Policy)

    @property
    def admin_url(self) -> str:
        host, port = self.admin_address
        return f"http://{_url_host(host)}:{port}"


# --- small readers -------------------------------------------------------------------------------

def read_env_lines(text: str) -> dict[str, str]:
    """sidecar.env: comments, blank lines and KEY=VALUE lines (optionally `export KEY=...`, quoted).

    Not a shell: nothing is expanded. cluster.env has its own strict parser in the bundle package.
    """
    out: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key.replace("_", "").isalnum() or key[0].isdigit():
            raise ProfileError(f"sidecar.env line {number}: expected KEY=VALUE, got {raw.strip()!r}")
        value = value.strip()
        try:
            parts = shlex.split(value, comments=False, posix=True) if value else [""]
        except ValueError as exc:
            raise ProfileError(f"sidecar.env line {number}: {exc}") from None
        out[key] = " ".join(parts)
    return out


def envoy_admin_address(bootstrap: Mapping[str, Any]) -> tuple[str, int]:
    """The admin socket address of an Envoy bootstrap (v3: admin.address.socket_address)."""
    try:
        sock = bootstrap["admin"]["address"]["socket_address"]
        host = str(sock.get("address", "127.0.0.1"))
        port = int(sock["port_value"])
    except (KeyError, TypeError, ValueError):
        raise ProfileError("the Envoy bootstrap has no admin.address.socket_address with a "
                           "port_value; the agent needs the admin API to probe and drain") from None
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1" if host != "::" else "::1"
    return host, port


def envoy_listener_ports(bootstrap: Mapping[str, Any]) -> tuple[int, ...]:
    """Ports of the static listeners of an Envoy bootstrap."""
    ports: list[int] = []
    listeners = (bootstrap.get("static_resources") or {}).get("listeners") or []
    for listener in listeners:
        try:
            port = int(listener["address"]["socket_address"]["port_value"])
        except (KeyError, TypeError, ValueError):
            continue  # pipes, internal listeners, port 0
        if port:
            ports.append(port)
    return tuple(ports)


def parse_bootstrap(text: str, name: str = "bootstrap") -> dict[str, Any]:
    """An Envoy bootstrap in YAML or JSON (JSON is YAML)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProfileError(f"{name}: not YAML or JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{name}: expected a mapping at the top level")
    return data


# --- profiles ------------------------------------------------------------------------------------

def envoy_profile(cfg: SidecarConfig, bootstrap_text: str, *, restart_epoch: int = 0) -> LaunchSpec:
    """`envoy -c <bootstrap> --base-id N --restart-epoch N`, probed on the bootstrap's admin /ready."""
    if not cfg.bootstrap and not cfg.command:
        raise ProfileError("the envoy profile needs sidecar.bootstrap")
    bootstrap = parse_bootstrap(bootstrap_text, cfg.bootstrap or "bootstrap")
    admin = envoy_admin_address(bootstrap)
    policy = Policy.from_config(cfg)
    # Envoy's own drain window follows ours, so listeners are not held open long after we stop.
    drain_s = max(1, math.ceil(policy.drain_timeout))
    argv = cfg.command or (
        cfg.envoy_binary, "-c", str(cfg.bootstrap), "--base-id", str(cfg.base_id),
        "--restart-epoch", str(restart_epoch), "--drain-time-s", str(drain_s),
        "--parent-shutdown-time-s", str(drain_s + 5), "--drain-strategy", "immediate")
    readiness = cfg.readiness_url or f"http://{_url_host(admin[0])}:{admin[1]}/ready"
    ports = _unique((admin[1], *envoy_listener_ports(bootstrap), *_url_port(readiness)))
    return LaunchSpec(
        profile="envoy", argv=tuple(argv), env={"PATH": DEFAULT_PATH, MARKER_ENV: "envoy"},
        user=None, readiness_url=readiness, admin_address=admin, ports=ports, drain="admin",
        identifier="envoy", log_dir=cfg.log_dir, policy=policy)


def istio_profile(cfg: SidecarConfig, *, sidecar_env: Mapping[str, str], cluster_env: Mapping[str, str],
                  hostname: str, address: str | None,
                  proxy_ports: Sequence[int] = ISTIO_PROXY_PORTS) -> LaunchSpec:
    """What istio-start.sh runs: `pilot-agent proxy` as istio-proxy with the mesh environment.

    `address` is the VM's detected address, used when cluster.env has no ISTIO_SVC_IP (the script
    takes the first of `hostname --all-ip-addresses`). `hostname` is the host name (short or full).
    """
    env: dict[str, str] = {"PATH": DEFAULT_PATH}
    env.update(sidecar_env)   # the script sources sidecar.env first,
    env.update(cluster_env)   # then cluster.env, which wins
    env[MARKER_ENV] = "istio"

    instance_ip = env.get("ISTIO_SVC_IP") or address
    if not instance_ip:
        raise NoAddress("no address for INSTANCE_IP: cluster.env has no ISTIO_SVC_IP and no "
                           "address was detected (set registry.address)")
    namespace = env.get("ISTIO_NAMESPACE") or "default"
    service = env.get("ISTIO_SERVICE") or "rawvm"
    cp_auth = env.get("ISTIO_CP_AUTH") or "MUTUAL_TLS"
    system_ns = env.get("ISTIO_SYSTEM_NAMESPACE") or "istio-system"

    # istiod's address: CA_ADDR > PILOT_ADDRESS > ISTIO_PILOT_PORT > istiod.<system ns>.svc:15012.
    custom_pilot = env.get("PILOT_ADDRESS") or (
        f"istiod.{system_ns}.svc:{env['ISTIO_PILOT_PORT']}" if env.get("ISTIO_PILOT_PORT") else "")
    env["CA_ADDR"] = env.get("CA_ADDR") or custom_pilot or f"istiod.{system_ns}.svc:15012"
    # Issued certificates are written to and read from /etc/certs, so the proxy can renew with its
    # certificate after the bootstrap token expired. Like the script, an explicit value (even
    # empty) is kept.
    env.setdefault("PROV_CERT", CERTS_DIR)
    env.setdefault("OUTPUT_CERTS", CERTS_DIR)
    proxy_config = env.get("PROXY_CONFIG") or \
        f"serviceCluster: {service}\ncontrolPlaneAuthPolicy: {cp_auth}\n"
    if custom_pilot:
        # The script appends this to the given PROXY_CONFIG, dropping the default when none was
        # given; here the default is kept.
        proxy_config = proxy_config.rstrip("\n") + f"\ndiscoveryAddress: {custom_pilot}\n"
    env["PROXY_CONFIG"] = proxy_config
    if env.get("WORKLOAD_IDENTITY_SOCKET_PATH"):
        env["JWT_POLICY"] = "none"   # identity comes from the workload identity socket, not a token
    env["INSTANCE_IP"] = instance_ip
    env["POD_NAME"] = env.get("POD_NAME") or hostname.split(".")[0]
    env["POD_NAMESPACE"] = namespace  # the script passes POD_NAMESPACE=${ISTIO_NAMESPACE:-default}

    # EXEC_USER (sidecar.env) overrides the configured user, as in the script. TPROXY interception
    # needs CAP_NET_ADMIN for transparent listeners: the script runs the proxy as root then.
    user: str | None = env.get("EXEC_USER") or cfg.user
    if env.get("ISTIO_INBOUND_INTERCEPTION_MODE") == "TPROXY":
        user = "root"

    pilot = cfg.pilot_agent_binary
    flags = tuple((env.get("ISTIO_AGENT_FLAGS") or "").split())
    argv = cfg.command or (pilot, "proxy", *flags)

    pre: tuple[tuple[str, ...], ...] = ()
    post: tuple[tuple[str, ...], ...] = ()
    if cfg.manage_iptables and env.get("ISTIO_CUSTOM_IP_TABLES") != "true":
        cleanup = (pilot, "istio-iptables", "--cleanup-only")
        pre = (cleanup, (pilot, "istio-iptables"))
        post = (cleanup,)

    host, _, port = cfg.admin_address.rpartition(":")
    admin = (host.strip("[]") or "127.0.0.1", int(port))
    readiness = cfg.readiness_url or ISTIO_READINESS_URL
    ports = _unique((admin[1], *_url_port(readiness), *proxy_ports))
    return LaunchSpec(
        profile="istio", argv=tuple(argv), env=env, user=user, readiness_url=readiness,
        admin_address=admin, ports=ports, drain="signal", pre_start=pre, post_stop=post,
        identifier="istio-proxy", log_dir=cfg.log_dir, policy=Policy.from_config(cfg))


def read_spec(cfg: SidecarConfig, layout: Layout, *, cluster_env: Mapping[str, str], hostname: str,
              address: str | None) -> LaunchSpec:
    """The LaunchSpec of the configured profile, reading sidecar.env (istio; missing is fine, the
    package ships it all comments) or the bootstrap (envoy). cluster_env: the installed cluster.env,
    as parsed by the bundle package. Raises ProfileError naming the file on any problem."""
    if cfg.profile == "envoy":
        path = cfg.bootstrap or ""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ProfileError(f"cannot read the Envoy bootstrap {path}: {exc}") from None
        return envoy_profile(cfg, text)
    try:
        sidecar_text = layout.sidecar_env.read_text(encoding="utf-8")
    except FileNotFoundError:
        sidecar_text = ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"cannot read {layout.sidecar_env}: {exc}") from None
    return istio_profile(cfg, sidecar_env=read_env_lines(sidecar_text), cluster_env=cluster_env,
                         hostname=hostname, address=address)


def describe(spec: LaunchSpec) -> str:
    """One line for logs: what runs, as whom."""
    who = f" as {spec.user}" if spec.user else ""
    return f"{spec.profile}: {shlex.join(spec.argv)}{who}"


def binary_name(argv: Sequence[str]) -> str:
    return PurePosixPath(argv[0]).name if argv else ""


def _url_port(url: str) -> tuple[int, ...]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise ProfileError(f"bad readiness URL {url!r}") from None
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    return (port,)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _unique(ports: Sequence[int]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(p for p in ports if p))
