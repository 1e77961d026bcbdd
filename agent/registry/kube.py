"""The Kubernetes API as mesh-agent uses it: a client from the credentials, and a few calls with errors
mapped to what the registrar decides on.

Every object travels as a plain dict through the client's generic (custom object) calls, for the
WorkloadEntries and WorkloadGroups and for the Leases too: the typed Lease model of the client would
turn renewTime into a datetime and write it back in a format the server refuses (MicroTime needs six
fractional digits), and dicts behave the same in the old (Debian 12: 22.6) and new (37.x) clients.

Server-side apply: the generations of the client send it differently, so how is found out once per
process by watching this client serialise a probe apply (agent.registry.kube.apply_style): a call
whose request never leaves the process, its connection pool replaced by a recorder. The regenerated
client takes `_content_type` per call and serialises a dict body; the older generation hard-codes
merge-patch in its generated calls and lets the ApiClient's default headers override per-call ones,
so applies go through a second ApiClient on the same configuration whose default Content-Type is
the apply type. Its REST layer then either serialises a dict for the apply type (30.x) or passes
only a pre-serialised string through unchanged (22.6, where JSON is YAML); the probe takes the first
form whose recorded request carries the apply type and the very object.

Bearer tokens: the generations keep the token under different api_key names (`authorization`,
`BearerToken`) with or without a separate prefix; the token-file hook finds the names this
configuration's auth_settings reads and writes the whole header value there (see TokenFile.hook).

Every call has a timeout; the client's own retries are limited to one reconnect (a kept-alive
connection the server closed): backoff belongs to the registrar (agent.retry), where the whole
fleet's behaviour is decided.
"""

from __future__ import annotations

import email.utils
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from agent.redact import register_secret
from agent.retry import RetryableError

log = logging.getLogger(__name__)

APPLY_PATCH = "application/apply-patch+yaml"
MERGE_PATCH = "application/merge-patch+json"
RETRY_AFTER_CAP = 30.0

ENTRIES = ("networking.istio.io", "v1", "workloadentries")
GROUPS = ("networking.istio.io", "v1", "workloadgroups")
LEASES = ("coordination.k8s.io", "v1", "leases")
Resource = tuple[str, str, str]


# --- errors ---------------------------------------------------------------------------------------

class ApiError(Exception):
    """A refused or failed call, naming the verb and the resource."""

    def __init__(self, verb: str, resource: str, status: int, message: str,
                 causes: list[str] | None = None) -> None:
        self.verb, self.resource, self.status = verb, resource, status
        self.causes = causes or []
        self.detail = message
        text = f"{verb} {resource}: {status} {message}" if status else f"{verb} {resource}: {message}"
        if self.causes:
            text += " (" + "; ".join(self.causes) + ")"
        super().__init__(text)


class Unauthorized(ApiError):
    """401/403: the credential is missing, expired, or lacks RBAC for this verb and resource."""


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    """409: a stale resourceVersion or an object that already exists."""


class Invalid(ApiError):
    """422 (or 400): the object was refused; `causes` lists the fields."""


class Unavailable(ApiError, RetryableError):
    """Unreachable, timed out, 5xx or 429: try again later (after `retry_after` when the server said)."""

    def __init__(self, verb: str, resource: str, status: int, message: str,
                 retry_after: float | None = None) -> None:
        ApiError.__init__(self, verb, resource, status, message)
        self.retry_after = retry_after


def _retry_after(headers: Any) -> float | None:
    if not headers:
        return None
    value = None
    try:
        value = headers.get("Retry-After") or headers.get("retry-after")
    except AttributeError:
        return None
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, min(seconds, RETRY_AFTER_CAP))


def map_error(exc: BaseException, verb: str, resource: str) -> ApiError:
    """Translate a client exception into our errors (anything unexpected is treated as unavailable)."""
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        status = int(exc.status or 0)
        message, causes = exc.reason or "", []
        try:
            body = json.loads(exc.body) if exc.body else {}
            message = body.get("message") or message
            for c in (body.get("details") or {}).get("causes") or []:
                causes.append(f"{c.get('field', '')}: {c.get('message', c.get('reason', ''))}".strip(": "))
        except (ValueError, TypeError, AttributeError):
            pass
        if status in (401, 403):
            return Unauthorized(verb, resource, status, message or "forbidden")
        if status == 404:
            return NotFound(verb, resource, status, message)
        if status == 409:
            return Conflict(verb, resource, status, message)
        if status in (400, 422):
            return Invalid(verb, resource, status, message, causes)
        return Unavailable(verb, resource, status, message or "unavailable", _retry_after(exc.headers))
    return Unavailable(verb, resource, 0, f"unreachable: {type(exc).__name__}: {exc}")


# --- credentials ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Credentials:
    """Where the API and its credential come from: a kubeconfig, or server + CA + token file."""

    kubeconfig: str | None = None
    server: str | None = None
    ca_file: str | None = None
    token_file: str | None = None
    context: str | None = None


class TokenFile:
    """Reads a bearer token file again whenever it changes, so a rotated token is used at once."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._token = ""
        self._lock = threading.Lock()

    def current(self) -> str:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise Unauthorized("read", f"token file {self.path}", 0, exc.strerror or str(exc)) from None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp != self._stamp:
                with open(self.path, encoding="utf-8") as f:
                    token = f.read().strip()
                register_secret(token)
                self._token, self._stamp = token, stamp
                log.debug("bearer token read from %s", self.path)
            return self._token

    def hook(self, configuration: Any) -> None:
        """A Configuration.refresh_api_key_hook: the client calls it before each request.

        The whole header value goes under every api_key name the configuration reads, with no separate
        prefix: a kubeconfig loader may have left `Bearer <token>` under one name and a prefix under
        another, which would otherwise combine into `Bearer Bearer <token>`."""
        value = f"Bearer {self.current()}"
        cls: type = type(configuration)  # typed: mypy does not take type[Any] as hashable for the cache
        for slot in bearer_slots(cls):
            configuration.api_key[slot] = value
            configuration.api_key_prefix.pop(slot, None)


# The names the generated configurations have used for the bearer token's api_key entry.
_BEARER_NAMES = ("authorization", "BearerToken")


@functools.cache
def bearer_slots(configuration_class: type) -> tuple[str, ...]:
    """The api_key names this configuration class's auth_settings reads the bearer token from,
    found by asking it (each name alone) rather than by the client's version."""
    found = []
    for name in _BEARER_NAMES:
        probe = configuration_class()
        probe.refresh_api_key_hook = None
        probe.api_key = {name: "probe"}
        probe.api_key_prefix = {}
        settings = probe.auth_settings() or {}
        if any((s or {}).get("value") == "probe" for s in settings.values()):
            found.append(name)
    if not found:
        raise RuntimeError("this kubernetes client reads its bearer token from no api_key name known here "
                           f"({', '.join(_BEARER_NAMES)})")
    return tuple(found)


def make_configuration(creds: Credentials) -> Any:
    """A kubernetes.client.Configuration for these credentials (no client retries; token file hooked)."""
    from kubernetes import client, config

    cfg = client.Configuration()
    token_file = creds.token_file
    if creds.kubeconfig:
        config.load_kube_config(config_file=creds.kubeconfig, context=creds.context,
                                client_configuration=cfg, persist_config=False)
        token_file = token_file or _kubeconfig_token_file(creds.kubeconfig, creds.context)
    elif creds.server:
        cfg.host = creds.server.rstrip("/")
        if creds.ca_file:
            cfg.ssl_ca_cert = creds.ca_file
    else:
        raise ValueError("no API credentials: set registry.kubeconfig, or registry.server with "
                         "registry.token_file, or ship a kubeconfig in the bundle")
    if token_file:
        tf = TokenFile(token_file)
        cfg.refresh_api_key_hook = tf.hook
        tf.hook(cfg)
    # One quiet retry for a pooled connection the server closed meanwhile; never for a status
    # (a 429 or 5xx goes back to the registrar's backoff, which honours Retry-After).
    import urllib3

    cfg.retries = urllib3.util.Retry(total=1, connect=1, read=1, status=0, redirect=0, other=0,
                                     raise_on_status=False, respect_retry_after_header=False)
    return cfg


def _kubeconfig_token_file(path: str, context: str | None) -> str | None:
    """The `tokenFile` of the kubeconfig's current user, which the client would read only once."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
        ctx_name = context or doc.get("current-context")
        ctx = next(c["context"] for c in doc.get("contexts") or [] if c.get("name") == ctx_name)
        user = next(u.get("user") or {} for u in doc.get("users") or [] if u.get("name") == ctx.get("user"))
    except (OSError, StopIteration, KeyError, TypeError, AttributeError, yaml.YAMLError):
        return None
    value = user.get("tokenFile")
    if value and not os.path.isabs(value):
        value = os.path.join(os.path.dirname(os.path.abspath(path)), value)
    return value


# --- the calls ------------------------------------------------------------------------------------

def _describe(res: Resource, namespace: str | None, name: str | None = None) -> str:
    group, _, plural = res
    text = f"{plural}.{group}"
    if name:
        text += f' "{name}"'
    if namespace:
        text += f" in namespace {namespace}"
    return text


# How a server-side apply is sent (see the module docstring), in the order tried.
PER_CALL = "per-call content type"          # _content_type=..., dict body
DEFAULT_HEADER = "default header"           # a second ApiClient's default Content-Type, dict body
DEFAULT_HEADER_TEXT = "default header, text body"  # the same, body pre-serialised to JSON
APPLY_STYLES = (PER_CALL, DEFAULT_HEADER, DEFAULT_HEADER_TEXT)


class _Sent(Exception):
    """Raised by the recorder in place of sending: what the REST layer would have put on the wire."""

    def __init__(self, headers: Any, body: Any) -> None:
        super().__init__("recorded")
        self.headers, self.body = dict(headers or {}), body


class _Recorder:
    """Stands in for the client's urllib3 pool during the probe: nothing is sent anywhere."""

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        raise _Sent(kwargs.get("headers"), kwargs.get("body"))

    def clear(self) -> None:
        pass


def _apply_api(client_mod: Any, configuration: Any, style: str) -> tuple[Any, Any]:
    """(CustomObjectsApi, ApiClient) through which `style` applies are sent."""
    api_client = client_mod.ApiClient(configuration)
    if style != PER_CALL:
        api_client.set_default_header("Content-Type", APPLY_PATCH)
    return client_mod.CustomObjectsApi(api_client), api_client


def _apply_args(style: str, obj: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The body and extra keyword arguments of an apply sent in `style`."""
    if style == PER_CALL:
        return obj, {"_content_type": APPLY_PATCH}
    return (json.dumps(obj) if style == DEFAULT_HEADER_TEXT else obj), {}


def _sends_apply(api: Any, style: str) -> bool:
    """Does this style make the client put the apply type and the object itself on the wire?"""
    probe = {"apiVersion": "example.com/v1", "kind": "Probe", "metadata": {"name": "p", "namespace": "n"},
             "spec": {"x": 1}}
    body, extra = _apply_args(style, probe)
    for fn in (api.patch_namespaced_custom_object, api.patch_namespaced_custom_object_status):
        try:
            fn("example.com", "v1", "n", "probes", "p", body, field_manager="probe", force=True,
               _preload_content=False, **extra)
        except _Sent as sent:
            ctype = next((v for k, v in sent.headers.items() if k.lower() == "content-type"), "")
            data = sent.body.decode() if isinstance(sent.body, bytes) else sent.body
            try:
                decoded = json.loads(data) if isinstance(data, str) else None
            except ValueError:
                decoded = None
            if ctype != APPLY_PATCH or decoded != probe:
                return False
        except Exception:  # an unknown keyword, a body the REST layer refuses: not this style
            return False
        else:
            return False
    return True


@functools.cache
def apply_style() -> str:
    """How this process's kubernetes client must be called to send a server-side apply."""
    from kubernetes import client

    for style in APPLY_STYLES:
        cfg = client.Configuration()
        cfg.host = "http://probe.invalid"
        api, api_client = _apply_api(client, cfg, style)
        api_client.rest_client.pool_manager = _Recorder()
        try:
            if _sends_apply(api, style):
                log.debug("server-side apply: %s", style)
                return style
        finally:
            api_client.rest_client.pool_manager = _Recorder()
    raise RuntimeError("this kubernetes client sends no server-side apply the API server accepts "
                       f"(tried: {', '.join(APPLY_STYLES)})")


class Kube:
    """The API calls the registrar, the reaper and the group watcher make; dicts in, dicts out.

    Thread-safe (the client's connection pool is). Each call raises one of the ApiError subclasses.
    """

    def __init__(self, configuration: Any, timeout: float = 10.0) -> None:
        from kubernetes import client

        self.configuration = configuration
        self.api_client = client.ApiClient(configuration)
        self.custom = client.CustomObjectsApi(self.api_client)
        self.timeout = timeout
        self._apply_style = apply_style()
        if self._apply_style == PER_CALL:
            self._apply_custom, self._apply_client = self.custom, None
        else:
            self._apply_custom, self._apply_client = _apply_api(client, configuration, self._apply_style)

    @classmethod
    def from_credentials(cls, creds: Credentials, timeout: float = 10.0) -> Kube:
        return cls(make_configuration(creds), timeout)

    def close(self) -> None:
        for c in (self.api_client, self._apply_client):
            try:
                if c is not None:
                    c.close()
            except Exception:  # closing a pool must never mask the reason we are closing
                pass

    def _call(self, verb: str, res: Resource, namespace: str | None, name: str | None,
              fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("_request_timeout", (min(5.0, self.timeout), self.timeout))
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # every client failure is mapped; nothing leaks unclassified
            raise map_error(exc, verb, _describe(res, namespace, name)) from exc

    # generic
    def get(self, res: Resource, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return self._call("get", res, namespace, name, self.custom.get_namespaced_custom_object,
                              *res[:2], namespace, res[2], name)
        except NotFound:
            return None

    def list(self, res: Resource, namespace: str, label_selector: str | None = None,
             field_selector: str | None = None) -> dict[str, Any]:
        kwargs = {"label_selector": label_selector} if label_selector else {}
        if field_selector:
            kwargs["field_selector"] = field_selector
        return self._call("list", res, namespace, None, self.custom.list_namespaced_custom_object,
                          *res[:2], namespace, res[2], **kwargs)

    def get_for_watch(self, res: Resource, namespace: str, name: str) -> tuple[dict[str, Any] | None, str]:
        """The object (or None) and the list's resourceVersion to watch from. An object's own
        resourceVersion can be older than the server's watch history (410 Gone at once)."""
        out = self.list(res, namespace, field_selector=f"metadata.name={name}")
        items = out.get("items") or []
        return (items[0] if items else None), (out.get("metadata") or {}).get("resourceVersion", "")

    def apply(self, res: Resource, obj: dict[str, Any], force: bool = True,
              subresource: str | None = None, field_manager: str = "mesh-agent") -> dict[str, Any]:
        """Server-side apply with field manager mesh-agent. A metadata.resourceVersion in obj is a
        precondition: the server answers 409 if the object changed since it was read."""
        meta = obj["metadata"]
        ns, name = meta["namespace"], meta["name"]
        api = self._apply_custom
        fn = api.patch_namespaced_custom_object_status if subresource == "status" \
            else api.patch_namespaced_custom_object
        body, extra = _apply_args(self._apply_style, obj)
        # The raw body: the new client drops a 201 (apply that created the object) as "no content".
        raw = self._call("patch" if subresource is None else f"patch {subresource} of", res, ns, name,
                         fn, *res[:2], ns, res[2], name, body,
                         field_manager=field_manager, force=force, _preload_content=False, **extra)
        try:
            return json.loads(raw.data)
        except (ValueError, TypeError, AttributeError) as exc:
            raise Unavailable("patch", _describe(res, ns, name), 0, f"unreadable answer: {exc}") from exc

    def create(self, res: Resource, obj: dict[str, Any]) -> dict[str, Any]:
        """Create; Conflict (409) when it already exists, which an apply would silently take over."""
        meta = obj["metadata"]
        return self._call("create", res, meta["namespace"], meta["name"],
                          self.custom.create_namespaced_custom_object, *res[:2], meta["namespace"], res[2],
                          obj, field_manager="mesh-agent")

    def delete(self, res: Resource, namespace: str, name: str, uid: str | None = None,
               resource_version: str | None = None) -> bool:
        """Delete; False when it was already gone. With uid/resourceVersion, only that very object
        (409 if it was replaced or changed meanwhile)."""
        pre: dict[str, str] = {}
        if uid:
            pre["uid"] = uid
        if resource_version:
            pre["resourceVersion"] = resource_version
        body = {"preconditions": pre} if pre else None
        kwargs: dict[str, Any] = {"body": body} if body else {}
        try:
            self._call("delete", res, namespace, name, self.custom.delete_namespaced_custom_object,
                       *res[:2], namespace, res[2], name, **kwargs)
        except NotFound:
            return False
        return True

    def watch(self, res: Resource, namespace: str, name: str, resource_version: str | None,
              timeout_seconds: int) -> Iterator[tuple[str, dict[str, Any]]]:
        """Watch one object from resource_version; yields (type, object) until the server ends it."""
        from kubernetes import watch

        w = watch.Watch()
        kwargs: dict[str, Any] = {"field_selector": f"metadata.name={name}",
                                  "timeout_seconds": timeout_seconds,
                                  "_request_timeout": (min(5.0, self.timeout), timeout_seconds + 10)}
        if resource_version:
            kwargs["resource_version"] = resource_version
        try:
            for event in w.stream(self.custom.list_namespaced_custom_object, *res[:2], namespace, res[2],
                                  **kwargs):
                yield event["type"], event["object"]
        except ApiError:
            raise
        except Exception as exc:
            from kubernetes.client.exceptions import ApiException

            if isinstance(exc, ApiException) and exc.status == 410:
                # The new client turns a 410 event into an exception; the old one yields it.
                yield "ERROR", {"code": 410, "reason": "Expired"}
                return
            raise map_error(exc, "watch", _describe(res, namespace, name)) from exc
        finally:
            w.stop()


SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def in_cluster_credentials(env: dict[str, str] | None = None, sa_dir: str = SA_DIR) -> Credentials | None:
    """A pod's own credentials (the projected token rotates; TokenFile re-reads it), or None outside."""
    env = dict(os.environ) if env is None else env
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
    if not host or not os.path.exists(os.path.join(sa_dir, "token")):
        return None
    if ":" in host:
        host = f"[{host}]"
    return Credentials(server=f"https://{host}:{port}", ca_file=os.path.join(sa_dir, "ca.crt"),
                       token_file=os.path.join(sa_dir, "token"))
