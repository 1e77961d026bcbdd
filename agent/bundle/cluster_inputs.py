"""What the cluster bundle source reads, one input at a time: its settings, the istio token
(TokenRequest), and the control plane's config (the mesh config, the cluster id, the east-west gateway)
or what static_dir supplies in its place. Every read failure comes out as SourceError; a read the
bundle can do without (403/404) becomes a warning."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import jwtclaims
from agent.bundle import generate as G
from agent.kube.core import CoreCalls
from agent.kube.errors import ApiError, Unauthorized
from agent.redact import register_secret
from agent.safeload import LoadError, load_json, load_yaml

INJECTOR_CONFIGMAP = "istio-sidecar-injector"
DEFAULT_CLUSTER_ID = "Kubernetes"


class SourceError(Exception):
    """A fetch failed; `retryable` is False for problems a retry alone will not fix (RBAC, bad group)."""

    def __init__(self, message: str, retryable: bool = True, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


@dataclass(frozen=True)
class Settings:
    """What the source needs, from agent.yaml's bundle.kubernetes (see from_config)."""

    namespace: str
    group: str
    istio_namespace: str = "istio-system"
    revision: str = ""
    cluster_id: str | None = None          # None: from the injector ConfigMap, else "Kubernetes"
    gateway_address: str | None = None     # None: from the gateway Service
    gateway_service: str = G.EAST_WEST_GATEWAY
    token_lifetime: int = 3600
    read_istio_config: bool = True
    static_dir: str | None = None
    dns_capture: bool = True
    svc_ip: str | None = None              # ISTIO_SVC_IP, when the agent knows the VM's address


def token_times(token: str) -> tuple[float | None, float | None]:
    """(iat, exp) claims of a JWT, unverified (only to schedule renewals); None where absent."""
    try:
        tok = jwtclaims.read(token)
    except jwtclaims.TokenError:
        return None, None
    return tok.issued_at, tok.expiry


def _parse_time(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def mint_token(core: CoreCalls, namespace: str, service_account: str, seconds: int,
               audiences: list[str] | None, clock: Callable[[], float] = time.time) -> tuple[str, float, float]:
    """TokenRequest; returns (token, issued, expiry) in wall-clock seconds."""
    asked = clock()
    answer = core.create_token(namespace, service_account, seconds, audiences)
    status = answer.get("status") or {}
    token = status.get("token") or ""
    if not token:
        raise SourceError(f"TokenRequest for {namespace}/{service_account} returned no token")
    register_secret(token)
    iat, exp = token_times(token)
    expiry = _parse_time(status.get("expirationTimestamp")) or exp or asked + seconds
    return token, iat or asked, expiry


def read_required(fn: Callable[[], Any]) -> Any:
    """fn()'s value; a refused or failed read as SourceError (RBAC refusals are not retryable)."""
    try:
        return fn()
    except Unauthorized as exc:
        raise SourceError(f"{exc} (RBAC: see `mesh-agent manifests`)", retryable=False) from exc
    except ApiError as exc:
        raise SourceError(str(exc), retryable=True, retry_after=getattr(exc, "retry_after", None)) from exc


class ControlPlane:
    """The control plane's config as one fetch reads it (or static_dir's); collects the warnings."""

    def __init__(self, core: CoreCalls, settings: Settings) -> None:
        self.core, self.s = core, settings
        self.warnings: list[str] = []
        self._static_cluster_id: str | None = None

    def _optional(self, fn: Callable[[], Any], what: str) -> tuple[bool, Any]:
        """(readable, value) for a read the bundle can do without (403/404 -> not readable)."""
        try:
            return True, fn()
        except Unauthorized as exc:
            self.warnings.append(f"cannot read {what}: {exc.status} {exc.detail}")
            return False, None
        except ApiError as exc:
            raise SourceError(str(exc), retry_after=getattr(exc, "retry_after", None)) from exc

    def mesh_config(self) -> tuple[str | None, str, dict[str, bytes]]:
        """(mesh config text, where it came from, static files that replace generated ones)."""
        s = self.s
        name = G.istio_configmap(s.revision)
        if s.read_istio_config:
            readable, cm = self._optional(lambda: self.core.get_configmap(s.istio_namespace, name),
                                          f"ConfigMap {name} in namespace {s.istio_namespace}")
            if readable and cm is not None:
                return ((cm.get("data") or {}).get("mesh")), "cluster", {}
            if readable:
                self.warnings.append(f"ConfigMap {name} not found in namespace {s.istio_namespace}")
        if s.static_dir:
            static = self._static_files()
            return self._mesh_from_static(static["mesh.yaml"]), "static", static
        if s.read_istio_config:
            raise SourceError(f"cannot read the mesh config (ConfigMap {name} in namespace "
                              f"{s.istio_namespace}) and bundle.kubernetes.static_dir is not set",
                              retryable=False)
        return None, "none", {}

    def _mesh_from_static(self, mesh_yaml: bytes) -> str:
        """A mesh config equivalent to the one an istioctl-made mesh.yaml came from, so cluster.env
        gets the same values (the trust domain and cluster are only in its proxyMetadata)."""
        import yaml

        try:
            doc = load_yaml(mesh_yaml, f"{self.s.static_dir}/mesh.yaml") or {}
        except LoadError as exc:
            raise SourceError(str(exc), retryable=False) from None
        default = doc.get("defaultConfig") if isinstance(doc, dict) else None
        if not isinstance(default, dict):
            raise SourceError(f"{self.s.static_dir}/mesh.yaml has no defaultConfig map", retryable=False)
        metadata = default.get("proxyMetadata") or {}
        mesh: dict[str, Any] = {"defaultConfig": default}
        if isinstance(metadata, dict):
            mesh["trustDomain"] = metadata.get("TRUST_DOMAIN") or ""
            self._static_cluster_id = metadata.get("ISTIO_META_CLUSTER_ID") or None
        return yaml.safe_dump(mesh)

    def _static_files(self) -> dict[str, bytes]:
        d = Path(self.s.static_dir or "")
        out = {}
        for name in ("mesh.yaml", "hosts", "cluster.env"):
            try:
                out[name] = (d / name).read_bytes()
            except FileNotFoundError:
                if name == "mesh.yaml":
                    raise SourceError(f"{d / name} is missing (bundle.kubernetes.static_dir)",
                                      retryable=False) from None
            except OSError as exc:
                raise SourceError(f"cannot read {d / name}: {exc.strerror}", retryable=False) from None
        return out

    def cluster_id(self, istio_readable: bool) -> str:
        s = self.s
        if not istio_readable:
            return self._static_cluster_id or DEFAULT_CLUSTER_ID
        name = INJECTOR_CONFIGMAP + (f"-{s.revision}" if G.is_revisioned(s.revision) else "")
        readable, cm = self._optional(lambda: self.core.get_configmap(s.istio_namespace, name),
                                      f"ConfigMap {name} in namespace {s.istio_namespace}")
        if not readable or cm is None:
            return DEFAULT_CLUSTER_ID
        try:
            values = load_json((cm.get("data") or {}).get("values") or "{}", f"ConfigMap {name} values")
            cluster = ((values.get("global") or {}).get("multiCluster") or {}).get("clusterName")
        except (LoadError, AttributeError):
            cluster = None
        return cluster if isinstance(cluster, str) and cluster else DEFAULT_CLUSTER_ID

    def gateway(self) -> str | None:
        s = self.s
        name, _, ns = s.gateway_service.partition(".")
        ns = ns or s.istio_namespace
        readable, svc = self._optional(lambda: self.core.get_service(ns, name),
                                       f"Service {name} in namespace {ns}")
        if not readable or svc is None:
            return None
        ingress = ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
        address = (ingress[0].get("ip") if ingress else None) or \
            next(iter((svc.get("spec") or {}).get("externalIPs") or []), None)
        if not address:
            self.warnings.append(f"Service {ns}/{name} has no load-balancer IP or external IP: hosts is empty; "
                            "set bundle.kubernetes.gateway_address")
        return address
