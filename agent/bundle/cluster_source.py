"""The `kubernetes` bundle source: build the mesh bundle from the cluster, as istioctl does, and keep
building it before the istio token expires.

ClusterSource.fetch() reads the WorkloadGroup, the root certificate (ConfigMap istio-ca-root-cert in
the group's namespace), the mesh config (ConfigMap istio[-<rev>] in the istio namespace, optional), the
east-west gateway's address (optional), and mints an istio token with TokenRequest for the group's
service account; agent.bundle.generate turns them into the five files. The files then go through the
same validation and atomic install as a downloaded bundle: this module never writes the live layout.
The reads themselves (and the source's Settings and SourceError) are agent.bundle.cluster_inputs'.

Where the agent may not read the istio namespace (403/404), `static_dir` (an admin-made bundle
directory) supplies mesh.yaml and hosts (and cluster.env, if it has one): only the token and the root
certificate then come from the cluster.

ClusterRefresher runs fetch() in its own thread: first at once, then at `refresh_fraction` of the
token's real lifetime (from the server's answer, not the configured one), and at once when a watch sees
the root certificate or the group change (each followed by agent.kube.follow from the version the last
build read, watched on from where it was, and from the current version after 410 Gone). It only posts
events (ClusterBundleFetched, ClusterFetchFailed); on failure it retries with agent.retry's backoff and
keeps reporting, while the sidecar goes on with the last good bundle (istio-agent renews its
certificate with the one it holds).
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.bundle import generate as G
from agent.bundle.cluster_inputs import (
    INJECTOR_CONFIGMAP,
    ControlPlane,
    Settings,
    SourceError,
    mint_token,
    read_required,
)
from agent.kube.client import GROUPS, Kube
from agent.kube.core import CoreCalls
from agent.kube.errors import ApiError, map_error
from agent.kube.follow import Follower, Target, version_of
from agent.retry import Backoff

log = logging.getLogger(__name__)

Post = Callable[[object], None]


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


class ClusterSource:
    """Builds the bundle from the cluster. fetch() blocks (each call has the client's timeout)."""

    def __init__(self, kube: Kube, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        if not settings.namespace or not settings.group:
            raise ValueError("bundle.kubernetes needs the WorkloadGroup's namespace and group")
        self.kube = kube
        self.core = CoreCalls(kube)
        self.s = settings
        self.clock = clock

    def fetch(self) -> Fetched:
        s = self.s
        group = read_required(lambda: self.kube.get(GROUPS, s.namespace, s.group))
        if group is None:
            raise SourceError(f'WorkloadGroup "{s.group}" not found in namespace {s.namespace}',
                              retryable=False)
        cm = read_required(lambda: self.core.get_configmap(s.namespace, G.ROOT_CERT_CONFIGMAP))
        root_cert = ((cm or {}).get("data") or {}).get(G.ROOT_CERT_KEY)
        if not root_cert:
            raise SourceError(f"ConfigMap {G.ROOT_CERT_CONFIGMAP} in namespace {s.namespace} has no "
                              f"{G.ROOT_CERT_KEY} (is the namespace part of the mesh?)")

        control = ControlPlane(self.core, s)
        mesh_text, mesh_from, static = control.mesh_config()
        cluster_id = s.cluster_id or control.cluster_id(mesh_from == "cluster")
        gateway = s.gateway_address or (control.gateway() if mesh_from == "cluster" else None)

        try:
            sa = G.service_account(group)
            token, issued, expiry = read_required(lambda: mint_token(self.core, s.namespace, sa, s.token_lifetime,
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
                       mesh_from=mesh_from, warnings=tuple(control.warnings))

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
            resp = kube.request("create", "selfsubjectaccessreviews", api.create_self_subject_access_review,
                                body, _preload_content=False)
            allowed = bool((json.loads(resp.data).get("status") or {}).get("allowed"))
        except Exception as exc:  # reported as a failed check, with the reason
            err = exc if isinstance(exc, ApiError) else map_error(exc, "create", "selfsubjectaccessreviews")
            out.append(AccessCheck(what, False, required, f"cannot ask the API server: {err}"))
            continue
        hint = "" if allowed else "add the rule `mesh-agent manifests` prints" + \
            ("" if required else " (optional: the source does without it)")
        out.append(AccessCheck(what, allowed, required, hint))
    return out


# --- installing what was built --------------------------------------------------------------------

# What is built is accepted like any fetched bundle (agent.bundle.accept), recorded as from this source.
SOURCE_NAME = "kubernetes"
