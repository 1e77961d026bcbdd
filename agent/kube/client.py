"""The Kubernetes API as mesh-agent uses it: a few calls, dicts in and dicts out, each with a timeout
and its failures mapped (agent.kube.errors).

Every object travels as a plain dict through the client's generic (custom object) calls, for the
WorkloadEntries and WorkloadGroups and for the Leases too: the typed Lease model of the client would
turn renewTime into a datetime and write it back in a format the server refuses (MicroTime needs six
fractional digits), and dicts behave the same in the old (Debian 12: 22.6) and new (37.x) clients.
Server-side applies are sent the way agent.kube.apply found this client needs; credentials and token
rotation are agent.kube.auth's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

from agent.kube.apply import PER_CALL, apply_api, apply_args, apply_style
from agent.kube.auth import Credentials, make_configuration
from agent.kube.errors import ApiError, NotFound, Unavailable, map_error

log = logging.getLogger(__name__)

ENTRIES = ("networking.istio.io", "v1", "workloadentries")
GROUPS = ("networking.istio.io", "v1", "workloadgroups")
LEASES = ("coordination.k8s.io", "v1", "leases")
EVENTS = ("events.k8s.io", "v1", "events")
SELF_SUBJECT_REVIEWS = ("authentication.k8s.io", "v1", "selfsubjectreviews")
MERGE_PATCH = "application/merge-patch+json"
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

    def __init__(self, configuration: Any, timeout: float = 10.0) -> None:
        from kubernetes import client

        self.configuration = configuration
        self.api_client = client.ApiClient(configuration)
        self.custom = client.CustomObjectsApi(self.api_client)
        self.timeout = timeout
        self._username: str | None = None
        self._asked_username = False
        self._apply_style = apply_style()
        if self._apply_style == PER_CALL:
            self._apply_custom, self._apply_client = self.custom, None
        else:
            self._apply_custom, self._apply_client = apply_api(client, configuration, self._apply_style)

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
                         resource_version, timeout_seconds, self.timeout, _describe(res, namespace, name))


def watch_one(list_fn: Callable[..., Any], args: tuple[Any, ...], name: str, resource_version: str | None,
              timeout_seconds: int, timeout: float, what: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Watch the object `name` through a generated list call (`list_fn(*args)`): yields (type, object as
    a dict) until the server ends the watch. An expired resourceVersion comes out as an ERROR event with
    code 410 whichever client generation is installed (the new one raises it, the old one yields it);
    every other failure raises an ApiError."""
    from kubernetes import watch

    w = watch.Watch()
    kwargs: dict[str, Any] = {"field_selector": f"metadata.name={name}", "timeout_seconds": timeout_seconds,
                              "_request_timeout": (min(5.0, timeout), timeout_seconds + 10)}
    if resource_version:
        kwargs["resource_version"] = resource_version
    try:
        for event in w.stream(list_fn, *args, **kwargs):
            raw = event.get("raw_object")  # typed calls (core/v1) deserialise `object` into a model
            yield event["type"], raw if isinstance(raw, dict) else event["object"]
    except ApiError:
        raise
    except Exception as exc:
        from kubernetes.client.exceptions import ApiException

        if isinstance(exc, ApiException) and exc.status == 410:
            yield "ERROR", {"code": 410, "reason": "Expired"}
            return
        raise map_error(exc, "watch", what) from exc
    finally:
        w.stop()
