"""The Kubernetes API as mesh-agent uses it: a few calls, dicts in and dicts out, each with a timeout
and its failures mapped (agent.kube.errors).

Every object travels as a plain dict through the client's generic (custom object) calls, for the
WorkloadEntries and WorkloadGroups and for the Leases too: the typed Lease model of the client would
turn renewTime into a datetime and write it back in a format the server refuses (MicroTime needs six
fractional digits), and dicts behave the same in the old (Debian 12: 22.6) and new (37.x) clients.
Server-side applies are sent the way agent.kube.apply found this client needs; credentials and token
rotation are agent.kube.auth's.

Every request has an overall deadline (agent.deadline) on top of the client's connect and read timeouts,
which bound only each wait: a server that trickles its answer is cut when the deadline is up, the call
raises DeadlineExceeded (an Unavailable: callers back off as for any outage), and the cut connection
never goes back to the pool. A watch's deadline is the server-side timeout it asks for plus one
request's deadline, so a watch the server does not end in time is cut and the follower starts again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

from agent.deadline import Deadline, scope, track_pool_manager
from agent.kube.apply import PER_CALL, apply_api, apply_args, apply_style
from agent.kube.auth import Credentials, make_configuration
from agent.kube.errors import ApiError, DeadlineExceeded, NotFound, Unavailable, map_error

log = logging.getLogger(__name__)

ENTRIES = ("networking.istio.io", "v1", "workloadentries")
GROUPS = ("networking.istio.io", "v1", "workloadgroups")
LEASES = ("coordination.k8s.io", "v1", "leases")
EVENTS = ("events.k8s.io", "v1", "events")
SELF_SUBJECT_REVIEWS = ("authentication.k8s.io", "v1", "selfsubjectreviews")
MERGE_PATCH = "application/merge-patch+json"
DEADLINE = 30.0   # a whole request, retries included (registry.request_deadline)
_END = object()
Resource = tuple[str, str, str]


def _describe(res: Resource, namespace: str | None, name: str | None = None) -> str:
    group, _, plural = res
    text = f"{plural}.{group}"
    if name:
        text += f' "{name}"'
    if namespace:
        text += f" in namespace {namespace}"
    return text


class Kube:
    """The API calls the registrar, the reaper, the followers and the cluster source make.

    Thread-safe (the client's connection pool is). Each call raises one of the ApiError subclasses.
    """

    def __init__(self, configuration: Any, timeout: float = 10.0, deadline: float = DEADLINE) -> None:
        from kubernetes import client

        self.configuration = configuration
        self.api_client = client.ApiClient(configuration)
        self.custom = client.CustomObjectsApi(self.api_client)
        self.timeout = timeout
        self.deadline = deadline
        self._username: str | None = None
        self._asked_username = False
        self._apply_style = apply_style()
        if self._apply_style == PER_CALL:
            self._apply_custom, self._apply_client = self.custom, None
        else:
            self._apply_custom, self._apply_client = apply_api(client, configuration, self._apply_style)
        for c in (self.api_client, self._apply_client):
            if c is not None:  # every generation keeps its urllib3 PoolManager here
                track_pool_manager(c.rest_client.pool_manager)

    @classmethod
    def from_credentials(cls, creds: Credentials, timeout: float = 10.0, deadline: float = DEADLINE) -> Kube:
        return cls(make_configuration(creds), timeout, deadline)

    def close(self) -> None:
        for c in (self.api_client, self._apply_client):
            try:
                if c is not None:
                    c.close()
            except Exception:  # closing a pool must never mask the reason we are closing
                pass

    def request(self, verb: str, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One generated call through this client (`fn(*args, **kwargs)`), under the request deadline,
        its failures mapped. With `_preload_content=False` the raw answer comes back with its body
        already read (`.data`), within the deadline too."""
        kwargs.setdefault("_request_timeout", (min(5.0, self.timeout), self.timeout))
        with Deadline(self.deadline) as deadline:
            try:
                with scope(deadline):
                    out = fn(*args, **kwargs)
                    if kwargs.get("_preload_content") is False:
                        out.data  # noqa: B018 -- the body is read (and kept) here, under the deadline
                return out
            except Exception as exc:  # every client failure is mapped; nothing leaks unclassified
                if deadline.expired:  # the cut, not the broken read it caused, is what happened
                    raise cut(verb, what, self.deadline) from None
                raise map_error(exc, verb, what) from exc

    def _call(self, verb: str, res: Resource, namespace: str | None, name: str | None,
              fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.request(verb, _describe(res, namespace, name), fn, *args, **kwargs)

    def whoami(self) -> str | None:
        """This credential's API username, as the API server authenticates it (SelfSubjectReview,
        authentication.k8s.io/v1): asked once per client, that is once per credential (a rotated token
        of the same identity keeps its username). Sent through the generic call, which every client
        generation has (Debian 12's lacks the typed one). None when the server does not serve the review
        (before Kubernetes 1.28); a failure raises ApiError and is asked again next time."""
        if not self._asked_username:
            body = {"apiVersion": "/".join(SELF_SUBJECT_REVIEWS[:2]), "kind": "SelfSubjectReview"}
            try:
                raw = self._call("create", SELF_SUBJECT_REVIEWS, None, None,
                                 self.custom.create_cluster_custom_object, *SELF_SUBJECT_REVIEWS, body,
                                 _preload_content=False)
                review = json.loads(raw.data)
                if not isinstance(review, dict):
                    raise ValueError("not an object")
            except NotFound:
                review = {}
            except (ValueError, TypeError, AttributeError) as exc:
                raise Unavailable("create", "selfsubjectreviews.authentication.k8s.io", 0,
                                  f"unreadable answer: {exc}") from exc
            user = ((review.get("status") or {}).get("userInfo") or {}).get("username")
            self._username = user if isinstance(user, str) and user else None
            self._asked_username = True
        return self._username

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
        body, extra = apply_args(self._apply_style, obj)
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

    def merge_patch(self, res: Resource, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """A JSON merge patch (RFC 7386). The older client generations send merge-patch for this call
        whatever they are told; the regenerated one is told per call."""
        extra = {"_content_type": MERGE_PATCH} if self._apply_style == PER_CALL else {}
        return self._call("patch", res, namespace, name, self.custom.patch_namespaced_custom_object,
                          *res[:2], namespace, res[2], name, patch, **extra)

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
        return watch_one(self.custom.list_namespaced_custom_object, (*res[:2], namespace, res[2]), name,
                         resource_version, timeout_seconds, self.timeout, _describe(res, namespace, name),
                         self.deadline)


def cut(verb: str, what: str, seconds: float, message: str = "") -> DeadlineExceeded:
    """The error of a call its deadline cut. Logged by the caller, in its one line for any failed call
    (the registrar's state, the group's follower), with its backoff."""
    err = DeadlineExceeded(verb, what, seconds, message)
    log.debug("%s", err)
    return err


def watch_one(list_fn: Callable[..., Any], args: tuple[Any, ...], name: str, resource_version: str | None,
              timeout_seconds: int, timeout: float, what: str,
              grace: float = DEADLINE) -> Iterator[tuple[str, dict[str, Any]]]:
    """Watch the object `name` through a generated list call (`list_fn(*args)`): yields (type, object as
    a dict) until the server ends the watch. An expired resourceVersion comes out as an ERROR event with
    code 410 whichever client generation is installed (the new one raises it, the old one yields it);
    every other failure raises an ApiError. The server is asked to end the watch after timeout_seconds;
    one that has not `grace` seconds later is cut (DeadlineExceeded)."""
    from kubernetes import watch

    w = watch.Watch()
    kwargs: dict[str, Any] = {"field_selector": f"metadata.name={name}", "timeout_seconds": timeout_seconds,
                              "_request_timeout": (min(5.0, timeout), timeout_seconds + 10)}
    if resource_version:
        kwargs["resource_version"] = resource_version
    limit = timeout_seconds + grace
    stream = w.stream(list_fn, *args, **kwargs)
    with Deadline(limit) as deadline:
        try:
            while True:
                # Only the client's own work runs under the deadline's scope, never the caller's
                # between two events.
                with scope(deadline):
                    got = next(stream, _END)
                if got is _END:
                    return
                event: Any = got
                if not event:  # the newest client yields None for a blank line (a keep-alive)
                    continue
                raw = event.get("raw_object")  # typed calls (core/v1) deserialise `object` into a model
                yield event["type"], raw if isinstance(raw, dict) else event["object"]
        except ApiError:
            raise
        except Exception as exc:
            if deadline.expired:
                raise cut("watch", what, limit, f"not ended within its {limit:g}s deadline (the server was "
                          f"asked to end it after {timeout_seconds}s); connection cut") from None
            from kubernetes.client.exceptions import ApiException

            if isinstance(exc, ApiException) and exc.status == 410:
                yield "ERROR", {"code": 410, "reason": "Expired"}
                return
            raise map_error(exc, "watch", what) from exc
        finally:
            w.stop()
            stream.close()  # its response goes back (or, cut, is dropped) now, under this deadline
