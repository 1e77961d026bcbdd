"""The `kubernetes` bundle source: build the mesh bundle from the cluster, as istioctl does, and keep
building it before the istio token expires.

ClusterSource.fetch() reads the WorkloadGroup, the root certificate (ConfigMap istio-ca-root-cert in
the group's namespace), the mesh config (ConfigMap istio[-<rev>] in the istio namespace, optional), the
east-west gateway's address (optional), and mints an istio token with TokenRequest for the group's
service account; agent.bundle.generate turns them into the five files. The files then go through the
same validation and atomic install as a downloaded bundle: this module never writes the live layout.

Where the agent may not read the istio namespace (403/404), `static_dir` (an admin-made bundle
directory) supplies mesh.yaml and hosts (and cluster.env, if it has one): only the token and the root
certificate then come from the cluster.

ClusterRefresher runs fetch() in its own thread: first at once, then at `refresh_fraction` of the
token's real lifetime (from the server's answer, not the configured one), and at once when a watch sees
the root certificate or the group change. It only posts events (ClusterBundleFetched,
ClusterFetchFailed); on failure it retries with agent.retry's backoff and keeps reporting, while the
sidecar goes on with the last good bundle (istio-agent renews its certificate with the one it holds).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import jwtclaims
from agent.bundle import generate as G
from agent.kube.client import GROUPS, Kube
from agent.kube.core import CoreCalls
from agent.kube.errors import ApiError, Unauthorized, map_error
from agent.kube.follow import Follower, Target, version_of
from agent.redact import register_secret
from agent.retry import Backoff
from agent.safeload import LoadError, load_json, load_yaml

log = logging.getLogger(__name__)

Post = Callable[[object], None]
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


def settings_from_config(bundle_cfg: Any, svc_ip: str | None = None) -> Settings:
    """Settings from a BundleConfig whose source is `kubernetes`."""
    k = bundle_cfg.kubernetes
    return Settings(namespace=k.namespace or "", group=k.group or "", istio_namespace=k.istio_namespace,
                    revision=k.revision, cluster_id=k.cluster_id, gateway_address=k.gateway_address,
                    gateway_service=k.gateway_service, token_lifetime=int(k.token_lifetime),
                    read_istio_config=k.read_istio_config, static_dir=k.static_dir,
                    dns_capture=k.dns_capture, svc_ip=svc_ip)


@dataclass(frozen=True)
class Fetched:
    """One build of the bundle."""

    files: Mapping[str, bytes]
    token_issued: float          # wall clock (the token's iat, else the request time)
    token_expiry: float          # wall clock (the server's expirationTimestamp)
    root_cert_version: str       # resourceVersion of istio-ca-root-cert
    group_version: str           # resourceVersion of the WorkloadGroup
    mesh_from: str               # "cluster", "static" or "none"
    warnings: tuple[str, ...] = ()

    @property
    def lifetime(self) -> float:
        return max(0.0, self.token_expiry - self.token_issued)


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


class ClusterSource:
    """Builds the bundle from the cluster. fetch() blocks (each call has the client's timeout)."""

    def __init__(self, kube: Kube, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        if not settings.namespace or not settings.group:
            raise ValueError("bundle.kubernetes needs the WorkloadGroup's namespace and group")
        self.kube = kube
        self.core = CoreCalls(kube)
        self.s = settings
        self.clock = clock
        self._static_cluster_id: str | None = None

    def _read(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Unauthorized as exc:
            raise SourceError(f"{exc} (RBAC: see `mesh-agent manifests`)", retryable=False) from exc
        except ApiError as exc:
            raise SourceError(str(exc), retryable=True, retry_after=getattr(exc, "retry_after", None)) from exc

    def _optional(self, fn: Callable[[], Any], warnings: list[str], what: str) -> tuple[bool, Any]:
        """(readable, value) for a read the bundle can do without (403/404 -> not readable)."""
        try:
            return True, fn()
        except Unauthorized as exc:
            warnings.append(f"cannot read {what}: {exc.status} {exc.detail}")
            return False, None
        except ApiError as exc:
            raise SourceError(str(exc), retry_after=getattr(exc, "retry_after", None)) from exc

    def fetch(self) -> Fetched:
        s = self.s
        warnings: list[str] = []
        group = self._read("group", lambda: self.kube.get(GROUPS, s.namespace, s.group))
        if group is None:
            raise SourceError(f'WorkloadGroup "{s.group}" not found in namespace {s.namespace}',
                              retryable=False)
        cm = self._read("root cert", lambda: self.core.get_configmap(s.namespace, G.ROOT_CERT_CONFIGMAP))
        root_cert = ((cm or {}).get("data") or {}).get(G.ROOT_CERT_KEY)
        if not root_cert:
            raise SourceError(f"ConfigMap {G.ROOT_CERT_CONFIGMAP} in namespace {s.namespace} has no "
                              f"{G.ROOT_CERT_KEY} (is the namespace part of the mesh?)")

        mesh_text, mesh_from, static = self._mesh_config(warnings)
        cluster_id = s.cluster_id or self._cluster_id(warnings, mesh_from == "cluster")
        gateway = s.gateway_address or (self._gateway(warnings) if mesh_from == "cluster" else None)

        try:
            sa = G.service_account(group)
            token, issued, expiry = self._read(
                "token", lambda: mint_token(self.core, s.namespace, sa, s.token_lifetime,
                                            [G.TOKEN_AUDIENCE], self.clock))
            files = G.generate(G.Inputs(
                group=group, mesh=mesh_text, istio_namespace=s.istio_namespace, revision=s.revision,
                cluster_id=cluster_id, gateway_address=gateway, token=token, root_cert=root_cert,
                options=G.Options(internal_ip=s.svc_ip, dns_capture=s.dns_capture)))
        except G.GenerateError as exc:
            raise SourceError(f"WorkloadGroup {s.namespace}/{s.group}: {exc}", retryable=False) from exc
        if static:
            files.update(static)
        return Fetched(files=files, token_issued=issued, token_expiry=expiry,
                       root_cert_version=str(((cm or {}).get("metadata") or {}).get("resourceVersion", "")),
                       group_version=str((group.get("metadata") or {}).get("resourceVersion", "")),
                       mesh_from=mesh_from, warnings=tuple(warnings))

    def _mesh_config(self, warnings: list[str]) -> tuple[str | None, str, dict[str, bytes]]:
        """(mesh config text, where it came from, static files that replace generated ones)."""
        s = self.s
        name = G.istio_configmap(s.revision)
        if s.read_istio_config:
            readable, cm = self._optional(lambda: self.core.get_configmap(s.istio_namespace, name), warnings,
                                          f"ConfigMap {name} in namespace {s.istio_namespace}")
            if readable and cm is not None:
                return ((cm.get("data") or {}).get("mesh")), "cluster", {}
            if readable:
                warnings.append(f"ConfigMap {name} not found in namespace {s.istio_namespace}")
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

    def _cluster_id(self, warnings: list[str], istio_readable: bool) -> str:
        s = self.s
        if not istio_readable:
            return self._static_cluster_id or DEFAULT_CLUSTER_ID
        name = INJECTOR_CONFIGMAP + (f"-{s.revision}" if G.is_revisioned(s.revision) else "")
        readable, cm = self._optional(lambda: self.core.get_configmap(s.istio_namespace, name), warnings,
                                      f"ConfigMap {name} in namespace {s.istio_namespace}")
        if not readable or cm is None:
            return DEFAULT_CLUSTER_ID
        try:
            values = load_json((cm.get("data") or {}).get("values") or "{}", f"ConfigMap {name} values")
            cluster = ((values.get("global") or {}).get("multiCluster") or {}).get("clusterName")
        except (LoadError, AttributeError):
            cluster = None
        return cluster if isinstance(cluster, str) and cluster else DEFAULT_CLUSTER_ID

    def _gateway(self, warnings: list[str]) -> str | None:
        s = self.s
        name, _, ns = s.gateway_service.partition(".")
        ns = ns or s.istio_namespace
        readable, svc = self._optional(lambda: self.core.get_service(ns, name), warnings,
                                       f"Service {name} in namespace {ns}")
        if not readable or svc is None:
            return None
        ingress = ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
        address = (ingress[0].get("ip") if ingress else None) or \
            next(iter((svc.get("spec") or {}).get("externalIPs") or []), None)
        if not address:
            warnings.append(f"Service {ns}/{name} has no load-balancer IP or external IP: hosts is empty; "
                            "set bundle.kubernetes.gateway_address")
        return address


# --- refreshing -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClusterBundleFetched:
    """A new bundle built from the cluster: validate and install `files` like any other bundle."""

    files: Mapping[str, bytes]
    reason: str                  # initial | token | root cert changed | group changed | requested
    token_expiry: float          # wall clock
    refresh_in: float            # seconds until the next scheduled build
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ClusterFetchFailed:
    """A build failed; the last good bundle stays. Retried after `retry_in` seconds."""

    error: str
    failures: int                # in a row
    retry_in: float
    token_expiry: float | None   # of the last good token (None before the first success)
    retryable: bool = True


@dataclass
class _Status:
    token_expiry: float | None = None
    token_issued: float | None = None
    last_success: float | None = None
    last_attempt: float | None = None
    error: str | None = None
    failures: int = 0
    next_refresh: float | None = None    # wall clock
    mesh_from: str = ""
    root_cert_version: str = ""
    group_version: str = ""
    warnings: list[str] = field(default_factory=list)


class ClusterRefresher:
    """Runs ClusterSource.fetch in a thread at the right times and posts the outcome.

    refresh_fraction: rebuild when this fraction of the token's lifetime has passed.
    watch: also watch the root certificate ConfigMap and the WorkloadGroup, and rebuild when they change.
    """

    def __init__(self, source: ClusterSource, post: Post, *, refresh_fraction: float = 0.7,
                 backoff: Backoff | None = None, watch: bool = True, watch_timeout: int = 300,
                 clock: Callable[[], float] = time.time) -> None:
        self.source = source
        self.post = post
        self.fraction = refresh_fraction
        self.backoff = backoff or Backoff(initial=1.0, max=30.0)
        self.watch = watch
        self.watch_timeout = watch_timeout
        self.clock = clock
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._reason = "initial"
        self._status = _Status()
        self._threads: list[threading.Thread] = []
        self._watchers: list[Follower] = []

    # --- control (any thread) ---

    def start(self) -> ClusterRefresher:
        self._spawn(self._loop, "bundle-refresh")
        if self.watch:
            self._start_watches()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        for f in self._watchers:
            f.stop()
        for t in self._threads:
            t.join(timeout)

    def refresh_now(self, reason: str = "requested") -> None:
        with self._lock:
            self._reason = reason
        self._wake.set()

    def status(self) -> dict[str, Any]:
        """For status.json's `bundle` section (plain data)."""
        with self._lock:
            st = self._status
            now = self.clock()
            return {
                "source": "kubernetes",
                "group": f"{self.source.s.namespace}/{self.source.s.group}",
                "token_expiry": st.token_expiry,
                "token_issued": st.token_issued,
                "fetched_at": st.last_success,
                "last_attempt": st.last_attempt,
                "error": st.error,
                "failures": st.failures,
                "next_refresh": st.next_refresh,
                "token_expired": bool(st.token_expiry and now >= st.token_expiry),
                "mesh_from": st.mesh_from,
                "root_cert_version": st.root_cert_version,
                "warnings": list(st.warnings),
            }

    # --- threads ---

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def _loop(self) -> None:
        delay = 0.0
        while not self._stop.is_set():
            if delay > 0 and self._wake.wait(delay):
                pass
            if self._stop.is_set():
                return
            self._wake.clear()
            with self._lock:
                reason, self._reason = self._reason, "token"
            delay = self._once(reason)

    def _once(self, reason: str) -> float:
        """One build; returns the seconds until the next one."""
        now = self.clock()
        try:
            got = self.source.fetch()
        except SourceError as exc:
            return self._failed(str(exc), exc.retryable, exc.retry_after, now, reason)
        except Exception as exc:  # a bug or an unexpected answer must not end the refresh thread
            log.exception("building the bundle from the cluster failed")
            return self._failed(f"{type(exc).__name__}: {exc}", True, None, now, reason)
        self.backoff.reset()
        done = self.clock()
        # Counted from now, not from the token's iat: a VM clock that differs from the API server's
        # must not make the agent rebuild in a loop (or too late).
        refresh_in = max(1.0, self.fraction * got.lifetime - (done - now))
        with self._lock:
            self._status = _Status(token_expiry=got.token_expiry, token_issued=got.token_issued,
                                   last_success=done, last_attempt=now, error=None, failures=0,
                                   next_refresh=done + refresh_in, mesh_from=got.mesh_from,
                                   root_cert_version=got.root_cert_version, group_version=got.group_version,
                                   warnings=list(got.warnings))
        log.info("bundle built from the cluster (%s); token valid until %s; next build in %.0fs", reason,
                 time.strftime("%H:%M:%S", time.gmtime(got.token_expiry)), refresh_in)
        self.post(ClusterBundleFetched(files=dict(got.files), reason=reason, token_expiry=got.token_expiry,
                                       refresh_in=refresh_in, warnings=got.warnings))
        return refresh_in

    def _failed(self, error: str, retryable: bool, retry_after: float | None, now: float,
                reason: str) -> float:
        delay = self.backoff.next_delay(retry_after)
        with self._lock:
            st = self._status
            st.failures += 1
            st.error, st.last_attempt, st.next_refresh = error, now, now + delay
            # Keep the cause of this attempt for the next try (a change still needs picking up).
            if reason != "token":
                self._reason = reason
            failures, expiry = st.failures, st.token_expiry
        log.warning("building the bundle from the cluster failed (%d in a row, retry in %.1fs): %s",
                    failures, delay, error)
        self.post(ClusterFetchFailed(error=error, failures=failures, retry_in=delay, token_expiry=expiry,
                                     retryable=retryable))
        return delay

    def _start_watches(self) -> None:
        """Follow the root certificate ConfigMap and the WorkloadGroup, each from the version the last
        build read (watched only: the agent's RBAC may get and watch them, not list them)."""
        s, core, kube = self.source.s, self.source.core, self.source.kube
        cm = Target(f"ConfigMap {s.namespace}/{G.ROOT_CERT_CONFIGMAP}",
                    lambda rv, timeout: core.watch_configmap(s.namespace, G.ROOT_CERT_CONFIGMAP, rv, timeout))
        group = Target(f"WorkloadGroup {s.namespace}/{s.group}",
                       lambda rv, timeout: kube.watch(GROUPS, s.namespace, s.group, rv, timeout))
        for name, target, version, reason in (
                ("bundle-watch-root-cert", cm, lambda: self._status.root_cert_version, "root cert changed"),
                ("bundle-watch-group", group, lambda: self._status.group_version, "group changed")):
            follower = self._follower(target, version, reason)
            self._watchers.append(follower)
            self._spawn(functools.partial(self._follow, follower, version), name)

    def _follower(self, target: Target, version: Callable[[], str], reason: str) -> Follower:
        """A change (or deletion) the last build did not read triggers a rebuild."""

        def seen(obj: dict[str, Any]) -> None:
            if version_of(obj) != version():
                log.info("%s changed: rebuilding the bundle", target.what)
                self.refresh_now(reason)

        def gone() -> None:
            log.info("%s deleted: rebuilding the bundle", target.what)
            self.refresh_now(reason)

        return Follower(target, seen=seen, gone=gone, watch_timeout=self.watch_timeout,
                        backoff=Backoff(initial=0.5, max=30.0), resume=True)

    def _follow(self, follower: Follower, version: Callable[[], str]) -> None:
        # Start from what the first build read, so the watch's initial events are not news.
        while not version():
            if self._stop.wait(0.2):
                return
        follower.version = version()
        follower.run()


# --- for the daemon: metrics and doctor -----------------------------------------------------------

def observe(metrics: Any, event: object) -> None:
    """Record a refresher event in agent.metrics.Metrics."""
    if isinstance(event, ClusterBundleFetched):
        metrics.set("expiry", event.token_expiry, "token")
        metrics.set("bundle_fetched", time.time())
    elif isinstance(event, ClusterFetchFailed):
        metrics.inc("errors", "bundle")


@dataclass(frozen=True)
class AccessCheck:
    what: str        # e.g. 'create serviceaccounts/token "billing-vm" in vm-apps'
    allowed: bool
    required: bool   # False: the source does without it (static_dir, warnings)
    hint: str


def access_checks(kube: Kube, s: Settings, service_account: str) -> list[AccessCheck]:
    """Ask the API server (SelfSubjectAccessReview) whether this credential may do what the source does."""
    from kubernetes import client

    api = client.AuthorizationV1Api(kube.api_client)
    rev = f"-{s.revision}" if G.is_revisioned(s.revision) else ""
    gw_name, _, gw_ns = s.gateway_service.partition(".")
    wanted = [
        ("get", "networking.istio.io", "workloadgroups", "", s.namespace, s.group, True),
        ("create", "", "serviceaccounts", "token", s.namespace, service_account, True),
        ("get", "", "configmaps", "", s.namespace, G.ROOT_CERT_CONFIGMAP, True),
        ("watch", "", "configmaps", "", s.namespace, G.ROOT_CERT_CONFIGMAP, False),
    ]
    if s.read_istio_config:
        wanted += [
            ("get", "", "configmaps", "", s.istio_namespace, f"istio{rev}", not s.static_dir),
            ("get", "", "configmaps", "", s.istio_namespace, f"{INJECTOR_CONFIGMAP}{rev}", False),
            ("get", "", "services", "", gw_ns or s.istio_namespace, gw_name, False),
        ]
    out = []
    for verb, group, resource, sub, ns, name, required in wanted:
        attrs = {"verb": verb, "group": group, "resource": resource, "namespace": ns, "name": name}
        if sub:
            attrs["subresource"] = sub
        body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                "spec": {"resourceAttributes": attrs}}
        what = f'{verb} {resource}{"/" + sub if sub else ""} "{name}" in {ns}'
        try:
            resp = api.create_self_subject_access_review(body, _preload_content=False,
                                                         _request_timeout=(5.0, kube.timeout))
            allowed = bool((json.loads(resp.data).get("status") or {}).get("allowed"))
        except Exception as exc:  # reported as a failed check, with the reason
            err = map_error(exc, "create", "selfsubjectaccessreviews")
            out.append(AccessCheck(what, False, required, f"cannot ask the API server: {err}"))
            continue
        hint = "" if allowed else "add the rule `mesh-agent manifests` prints" + \
            ("" if required else " (optional: the source does without it)")
        out.append(AccessCheck(what, allowed, required, hint))
    return out


# --- installing what was built --------------------------------------------------------------------

SOURCE_NAME = "kubernetes"


def install_files(files: Mapping[str, bytes], cfg: Any, layout: Any, *, user: str | None = "istio-proxy",
                  now: float | None = None) -> Any:
    """Validate and install a built bundle through the same path as a fetched one (agent.bundle.model,
    agent.bundle.install). Returns update.Updated, or update.Unchanged when the same bundle is installed.
    Raises model.BundleError or install.InstallError; the live files are then unchanged."""
    from agent.bundle import install as I
    from agent.bundle.model import parse_bundle
    from agent.bundle.update import Unchanged, Updated

    wall = time.time() if now is None else now
    bundle = parse_bundle(dict(files), wall, cfg)
    for w in bundle.warnings:
        log.warning("bundle %s: %s", bundle.version, w)
    current = I.last_good(layout)
    if current is not None and current.digest == bundle.digest and not I.drifted(layout):
        return Unchanged(current)
    result = I.install(bundle, layout, source=SOURCE_NAME, fetched_at=wall, user=user)
    return Updated(bundle, result)
