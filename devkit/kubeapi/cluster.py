"""What the API server does with objects, independent of HTTP: create, read, update, patch, apply,
delete, finalizers, namespaces, garbage collection, tokens and access reviews."""

from __future__ import annotations

import builtins
import copy
import datetime as dt
import json
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import yaml

from devkit.kubeapi import admission, events, fieldmanager, meta, openapi
from devkit.kubeapi.auth import API_AUDIENCE, Authenticator, Identity, Rule
from devkit.kubeapi.patch import PatchError, json_patch, merge_patch, strategic_merge_patch
from devkit.kubeapi.resources import ResourceType, builtin_types, crd_type
from devkit.kubeapi.selectors import SelectorError, field_selector, label_selector
from devkit.kubeapi.status import (
    ApiError,
    Cause,
    FieldError,
    already_exists,
    bad_request,
    conflict,
    forbidden_field,
    invalid,
    not_found,
    required,
    unprocessable,
)
from devkit.kubeapi.store import Store

SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
MODIFIED = "the object has been modified; please apply your changes to the latest version and try again"


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Request:
    """Who asks, and how (query options shared by the write verbs)."""

    identity: Identity
    manager: str = ""
    dry_run: bool = False
    field_validation: str = "Warn"  # Ignore | Warn | Strict


class Cluster:
    def __init__(self, crds: tuple[openapi.CRD, ...] = (), history: int = 1000) -> None:
        self.store = Store(history)
        self.auth = Authenticator()
        self.types: dict[tuple[str, str], ResourceType] = {}
        for rt in [*builtin_types(), *(crd_type(c) for c in crds)]:
            self.types[(rt.group, rt.plural)] = rt
        self.auth.extra_rules = self.rbac_rules
        self.warnings = threading.local()
        self.gc_wakeup = threading.Event()
        self.audit: list[str] = []  # denials of ValidatingAdmissionPolicy bindings with action Audit
        for ns in SYSTEM_NAMESPACES:
            self.create_namespace(ns)

    # --- lookup ----------------------------------------------------------------------------------

    def resource(self, group: str, version: str, plural: str) -> ResourceType | None:
        rt = self.types.get((group, plural))
        return rt if rt and version in rt.versions else None

    def by_kind(self, kind: str) -> ResourceType:
        for rt in self.types.values():
            if rt.kind == kind:
                return rt
        raise KeyError(kind)

    def _warn(self, text: str) -> None:
        if not hasattr(self.warnings, "items"):
            self.warnings.items = []
        self.warnings.items.append(text)

    def take_warnings(self) -> list[str]:
        items = getattr(self.warnings, "items", [])
        self.warnings.items = []
        return items

    def _out(self, rt: ResourceType, version: str, obj: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        if rt.view is not None:
            obj = rt.view(obj)
        obj["apiVersion"] = rt.api_version(version)
        obj["kind"] = rt.kind
        return obj

    def _ns_check(self, rt: ResourceType, ns: str, name: str = "") -> None:
        """The namespace must exist and, for new content, not be terminating."""
        if not rt.namespaced:
            return
        nsobj = self.store.get(("", "namespaces"), "", ns)
        if nsobj is None:
            raise not_found("namespaces", "", ns)
        if nsobj["metadata"].get("deletionTimestamp"):
            what = f"{rt.plural}.{rt.group}" if rt.group else rt.plural
            raise ApiError(403, "Forbidden", f'{what} "{name}" is forbidden: unable to create new content in '
                                             f"namespace {ns} because it is being terminated",
                           {"name": name, "group": rt.group, "kind": rt.plural,
                            "causes": [Cause("", f"namespace {ns} is being terminated",
                                             "NamespaceTerminating").as_dict()]})

    # --- validation --------------------------------------------------------------------------------

    def _check_type_meta(self, rt: ResourceType, version: str, body: Any) -> None:
        if not isinstance(body, dict):
            raise bad_request(f"the body of the request was in an unknown format - expected a {rt.kind}")
        want = rt.api_version(version)
        if body.get("apiVersion") not in (None, want) or body.get("kind") not in (None, rt.kind):
            raise bad_request(f"the API version in the data ({body.get('apiVersion')}) does not match the "
                              f"expected API version ({want})" if body.get("apiVersion") != want else
                              f"the kind in the data ({body.get('kind')}) does not match the expected kind "
                              f"({rt.kind})")
        if body.get("metadata") is not None and not isinstance(body.get("metadata"), dict):
            raise bad_request("metadata must be an object")

    def _clean(self, rt: ResourceType, version: str, obj: dict[str, Any], fv: str,
               old: dict[str, Any] | None = None) -> dict[str, Any]:
        """Prune undeclared fields (warn or refuse per fieldValidation), validate, or raise 422. `old`:
        the stored object, for an update."""
        schema = rt.schema(version)
        body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
        unknown = openapi.find_unknown(schema, body)
        if unknown and fv == "Strict":
            raise bad_request(f"{rt.kind} in version \"{version}\" cannot be handled as a {rt.kind}: strict "
                              "decoding error: " + ", ".join(f'unknown field "{p}"' for p in unknown))
        if fv == "Warn":
            for p in unknown:
                self._warn(f'unknown field "{p}"')
        for p in openapi.find_unknown({"type": "object", "properties": {"metadata": _META_KEYS}},
                                      {"metadata": obj.get("metadata", {})}):
            if fv == "Strict":
                raise bad_request(f'strict decoding error: unknown field "{p}"')
            if fv == "Warn":
                self._warn(f'unknown field "{p}"')
        micro = [e for e in openapi.check(schema, body) if "micro-time" in e.detail]
        if micro:
            # The server fails to decode such a time before validation, with a 400.
            value = micro[0].detail.rsplit(": ", 1)[-1]
            raise bad_request(f"{rt.kind} in version \"{version}\" cannot be handled as a {rt.kind}: "
                              f'parsing time {value} as "2006-01-02T15:04:05.000000Z07:00": cannot parse '
                              "as a MicroTime (exactly six fractional digits are required)")
        pruned = openapi.prune(schema, body)
        _apply_defaults(rt, pruned)
        m = {k: v for k, v in (obj.get("metadata") or {}).items()
             if k in _META_KEYS["properties"] and v is not None}
        if rt.plural == "namespaces" and m.get("name"):
            # The server keeps this label on every namespace (what namespaceSelectors use to name one).
            m["labels"] = {**(m.get("labels") or {}), "kubernetes.io/metadata.name": m["name"]}
        errors = meta.metadata_errors(m, rt.name_rule) + openapi.check(schema, pruned)
        if rt.group == admission.GROUP:
            errors += admission.policy_errors(rt.plural, pruned)
        if rt.group == events.GROUP:
            ns = (old or obj)["metadata"].get("namespace", "")
            errors += events.create_errors(pruned, ns) if old is None else events.update_errors(pruned, old, ns)
        if errors:
            raise unprocessable(rt.kind, rt.group, m.get("name", ""), errors)
        out = {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "metadata": m, **pruned}
        return out

    # --- create ------------------------------------------------------------------------------------

    def create(self, rt: ResourceType, version: str, ns: str, body: Any, req: Request) -> dict[str, Any]:
        self._check_type_meta(rt, version, body)
        body = copy.deepcopy(body)
        m = body.setdefault("metadata", {})
        if rt.namespaced:
            if m.get("namespace") not in (None, "", ns):
                raise bad_request("the namespace of the provided object does not match the namespace sent on "
                                  "the request")
            m["namespace"] = ns
        else:
            m.pop("namespace", None)
        if m.get("resourceVersion"):
            raise bad_request("resourceVersion should not be set on objects to be created")
        for system_field in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds",
                             "generation", "selfLink", "managedFields"):
            m.pop(system_field, None)  # the server sets these, whatever a client sends
        if not m.get("name"):
            if m.get("generateName"):
                m["name"] = m["generateName"] + uuid.uuid4().hex[:5]
            else:
                raise unprocessable(rt.kind, rt.group, "", [required("metadata.name",
                                                                     "name or generateName is required")])
        with self.store.lock:
            self._ns_check(rt, ns, m["name"])
            if self.store.get((rt.group, rt.plural), ns if rt.namespaced else "", m["name"]):
                raise already_exists(rt.plural, rt.group, m["name"])
            body["apiVersion"], body["kind"] = rt.api_version(version), rt.kind
            obj = self._clean(rt, version, body, req.field_validation)
            if rt.status_subresource and rt.custom:
                obj.pop("status", None)  # status is only written through /status
            self._stamp_new(rt, obj)
            fieldmanager.record_update(None, obj, self._fm_schema(rt, version), manager=req.manager,
                                       api_version=rt.api_version(version), now=now_rfc3339(),
                                       status=None)
            self._admit(rt, version, "CREATE", ns, m["name"], obj, None, req)
            if req.dry_run:
                return self._out(rt, version, obj)
            stored = self.store.put((rt.group, rt.plural), obj, "ADDED")
        self._after_write(rt, stored)
        return self._out(rt, version, stored)

    def _admit(self, rt: ResourceType, version: str, operation: str, ns: str, name: str,
               obj: dict[str, Any] | None, old: dict[str, Any] | None, req: Request,
               subresource: str = "") -> None:
        """ValidatingAdmissionPolicies (devkit/kubeapi/admission.py): raise the server's Status on a denial."""
        attrs = admission.Attributes(
            operation, rt.group, version, rt.plural, rt.kind, subresource, ns if rt.namespaced else "", name,
            req.identity, self._out(rt, version, obj) if obj is not None else None,
            self._out(rt, version, old) if old is not None else None, req.dry_run)
        admission.admit(self.store, attrs, rt.versions, self._warn, self.audit)

    def _stamp_new(self, rt: ResourceType, obj: dict[str, Any]) -> None:
        m = obj["metadata"]
        m["uid"] = str(uuid.uuid4())
        m["creationTimestamp"] = now_rfc3339()
        if rt.custom:
            m["generation"] = 1
        if rt.plural == "namespaces":
            obj["spec"] = {"finalizers": ["kubernetes"]}
            obj["status"] = {"phase": "Active"}

    def _fm_schema(self, rt: ResourceType, version: str) -> openapi.Schema:
        return fieldmanager.object_schema(rt.schema(version))

    def _after_write(self, rt: ResourceType, obj: dict[str, Any]) -> None:
        if rt.plural == "namespaces" and not obj["metadata"].get("deletionTimestamp"):
            # The service-account controller gives every namespace a "default" account.
            name = obj["metadata"]["name"]
            if self.store.get(("", "serviceaccounts"), name, "default") is None:
                sa = {"apiVersion": "v1", "kind": "ServiceAccount",
                      "metadata": {"name": "default", "namespace": name}}
                self._stamp_new(self.types[("", "serviceaccounts")], sa)
                self.store.put(("", "serviceaccounts"), sa, "ADDED")
        if obj["metadata"].get("ownerReferences") or rt.plural == "namespaces":
            self.gc_wakeup.set()

    def create_namespace(self, name: str) -> dict[str, Any]:
        rt = self.types[("", "namespaces")]
        return self.create(rt, "v1", "", {"metadata": {"name": name}},
                           Request(Identity("system:admin"), manager="kube-apiserver"))

    # --- read --------------------------------------------------------------------------------------

    def get(self, rt: ResourceType, version: str, ns: str, name: str) -> dict[str, Any]:
        obj = self.store.get(rt.store_key, ns if rt.namespaced else "", name)
        if obj is None:
            raise not_found(rt.plural, rt.group, name)
        return self._out(rt, version, obj)

    def list(self, rt: ResourceType, version: str, ns: str | None, label: str | None = None,
             field: str | None = None, limit: int = 0, cont: str | None = None) -> dict[str, Any]:
        match = self.selector(rt, label, field)
        with self.store.lock:
            rv = self.store.rv
            items = [o for o in self.store.items(rt.store_key, ns) if match(o)]
        start = 0
        if cont:
            try:
                token = json.loads(bytes.fromhex(cont))
                start = int(token["start"])
            except (ValueError, KeyError, TypeError) as exc:
                raise bad_request("continue key is not valid") from exc
        list_meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if limit and limit > 0:
            page = items[start:start + limit]
            if start + limit < len(items):
                list_meta["continue"] = json.dumps({"start": start + limit, "rv": rv}).encode().hex()
                list_meta["remainingItemCount"] = len(items) - start - limit
            items = page
        else:
            items = items[start:]
        return {"apiVersion": rt.api_version(version), "kind": rt.list_kind, "metadata": list_meta,
                "items": [self._out(rt, version, o) for o in items]}

    def selector(self, rt: ResourceType, label: str | None, field: str | None) -> Any:
        try:
            by_label = label_selector(label)
            by_field = field_selector(field, (("metadata.name", "metadata.namespace") if rt.namespaced
                                              else ("metadata.name",)) + rt.field_labels)
        except SelectorError as exc:
            raise bad_request(str(exc)) from exc
        core_events = rt.stored_as == (events.GROUP, "events")
        return lambda o: by_label(o) and by_field(events.selectable(core_events, o))

    # --- update, patch, apply --------------------------------------------------------------------------

    def update(self, rt: ResourceType, version: str, ns: str, name: str, body: Any, req: Request,
               subresource: str = "") -> dict[str, Any]:
        self._check_type_meta(rt, version, body)
        body = copy.deepcopy(body)
        m = body.setdefault("metadata", {})
        if m.get("name") != name:
            raise bad_request(f"the name of the object ({m.get('name')}) does not match the name on the URL "
                              f"({name})")
        if rt.namespaced and m.get("namespace") not in (None, "", ns):
            raise bad_request("the namespace of the provided object does not match the namespace sent on the "
                              "request")
        with self.store.lock:
            old = self._existing(rt, ns, name)
            if not m.get("resourceVersion") and not rt.allow_unconditional_update:
                raise unprocessable(rt.kind, rt.group, name, [invalid(
                    "metadata.resourceVersion", 0, "must be specified for an update")])
            return self._commit(rt, version, old, body, req, subresource, operation="Update")

    def patch(self, rt: ResourceType, version: str, ns: str, name: str, content_type: str, raw: bytes,
              req: Request, subresource: str = "", force: bool = False) -> dict[str, Any]:
        ctype = content_type.split(";")[0].strip()
        if ctype == "application/apply-patch+yaml":
            return self.apply(rt, version, ns, name, raw, req, subresource, force)
        if force:
            raise bad_request("force is only allowed for apply requests")
        known = ("application/merge-patch+json", "application/json-patch+json",
                 "application/strategic-merge-patch+json")
        if ctype not in known:
            raise ApiError(415, "UnsupportedMediaType",
                           "the body of the request was in an unknown format - accepted media types include: "
                           "application/json-patch+json, application/merge-patch+json, "
                           "application/apply-patch+yaml")
        if ctype == "application/strategic-merge-patch+json" and rt.custom:
            raise ApiError(415, "UnsupportedMediaType",
                           "strategic merge patch is not supported for custom resources")
        try:
            patch = json.loads(raw or b"null")
        except ValueError as exc:
            raise bad_request(f"error decoding patch: {exc}") from exc
        with self.store.lock:
            old = self._existing(rt, ns, name)
            current = self._out(rt, version, old)
            try:
                if ctype == "application/merge-patch+json":
                    new = merge_patch(current, patch)
                elif ctype == "application/json-patch+json":
                    new = json_patch(current, patch)
                else:
                    new = strategic_merge_patch(current, patch)
            except PatchError as exc:
                raise ApiError(422, "Invalid", str(exc)) from exc
            if not isinstance(new, dict):
                raise bad_request("patch did not produce an object")
            return self._commit(rt, version, old, new, req, subresource, operation="Update")

    def apply(self, rt: ResourceType, version: str, ns: str, name: str, raw: bytes, req: Request,
              subresource: str = "", force: bool = False) -> dict[str, Any]:
        if not req.manager:
            raise bad_request("PATCH, fieldManager is required for apply requests")
        try:
            applied = yaml.safe_load(raw or b"")
        except yaml.YAMLError as exc:
            raise bad_request(f"error decoding YAML: {exc}") from exc
        if not isinstance(applied, dict):
            raise bad_request("the body of an apply request must be an object")
        want = rt.api_version(version)
        if applied.get("apiVersion") != want or applied.get("kind") != rt.kind:
            raise bad_request(f"apiVersion and kind must be {want} {rt.kind} "
                              f"(got {applied.get('apiVersion')} "
                              f"{applied.get('kind')})")
        am = applied.get("metadata") or {}
        if am.get("name") not in (None, name):
            raise bad_request(f"the name of the object ({am.get('name')}) does not match the name on the URL "
                              f"({name})")
        if rt.namespaced and am.get("namespace") not in (None, "", ns):
            raise bad_request("the namespace of the provided object does not match the namespace sent on the "
                              "request")
        if am.get("managedFields") is not None:
            raise bad_request("metadata.managedFields must be nil")
        fm_schema = self._fm_schema(rt, version)
        status_mode = self._status_mode(rt, subresource)
        with self.store.lock:
            key = (rt.group, rt.plural)
            live = self.store.get(key, ns if rt.namespaced else "", name)
            creating = live is None
            if live is None:
                self._ns_check(rt, ns, name)
                live = {"apiVersion": want, "kind": rt.kind,
                        "metadata": {"name": name, **({"namespace": ns} if rt.namespaced else {})}}
                if subresource:
                    raise not_found(rt.plural, rt.group, name)
            elif am.get("resourceVersion") and am["resourceVersion"] != live["metadata"]["resourceVersion"]:
                raise conflict(rt.plural, rt.group, name, MODIFIED)
            elif am.get("uid") and am["uid"] != live["metadata"]["uid"]:
                raise conflict(rt.plural, rt.group, name, f"Precondition failed: UID in precondition: "
                               f"{am['uid']}, UID in object meta: {live['metadata']['uid']}")
            live = self._out(rt, version, live)
            try:
                merged = fieldmanager.apply(live, applied, fm_schema, manager=req.manager, api_version=want,
                                            now=now_rfc3339(), force=force, status=status_mode,
                                            subresource=subresource)
            except fieldmanager.ApplyConflict as exc:
                raise _apply_conflict(rt, name, exc.conflicts) from exc
            if creating:
                obj = self._clean(rt, version, merged, req.field_validation)
                obj["metadata"]["managedFields"] = merged["metadata"].get("managedFields", [])
                self._stamp_new(rt, obj)
                self._admit(rt, version, "CREATE", ns, name, obj, None, req)
                if req.dry_run:
                    return self._out(rt, version, obj)
                stored = self.store.put(key, obj, "ADDED")
                self._after_write(rt, stored)
                return self._out(rt, version, stored)
            merged["metadata"]["resourceVersion"] = live["metadata"]["resourceVersion"]
            old = self.store.get(key, ns if rt.namespaced else "", name)
            assert old is not None  # read above under the same lock, and not created here
            return self._commit(rt, version, old, merged, req, subresource, operation="Apply")

    def _status_mode(self, rt: ResourceType, subresource: str) -> bool | None:
        if not rt.status_subresource:
            return None
        return subresource == "status"

    def _existing(self, rt: ResourceType, ns: str, name: str) -> dict[str, Any]:
        old = self.store.get((rt.group, rt.plural), ns if rt.namespaced else "", name)
        if old is None:
            raise not_found(rt.plural, rt.group, name)
        return old

    def _commit(self, rt: ResourceType, version: str, old: dict[str, Any], new: dict[str, Any], req: Request,
                subresource: str, operation: str) -> dict[str, Any]:
        """Validate and store an update of old to new (caller holds the store lock)."""
        name = old["metadata"]["name"]
        nm = new.setdefault("metadata", {})
        if nm.get("resourceVersion") and nm["resourceVersion"] != old["metadata"]["resourceVersion"]:
            raise conflict(rt.plural, rt.group, name, MODIFIED)
        errors: list[FieldError] = meta.immutable_errors(old["metadata"], nm)
        if "roleRef" in old and new.get("roleRef") != old["roleRef"]:
            errors.append(invalid("roleRef", new.get("roleRef"), "cannot change roleRef"))
        if errors:
            raise unprocessable(rt.kind, rt.group, name, errors)
        if subresource == "status":
            # The status endpoint changes only status; everything else is kept from the stored object.
            candidate = copy.deepcopy(old)
            if "status" in new:
                candidate["status"] = new["status"]
            else:
                candidate.pop("status", None)
        else:
            candidate = copy.deepcopy(new)
            if rt.status_subresource:
                if "status" in old:
                    candidate["status"] = copy.deepcopy(old["status"])
                else:
                    candidate.pop("status", None)
        candidate["apiVersion"], candidate["kind"] = rt.api_version(version), rt.kind
        cleaned = self._clean(rt, version, candidate, req.field_validation, old)
        m = cleaned["metadata"]
        for kept in ("uid", "creationTimestamp", "generation", "deletionTimestamp",
                     "deletionGracePeriodSeconds"):
            if kept in old["metadata"]:
                m[kept] = old["metadata"][kept]
        m["namespace"] = old["metadata"].get("namespace", "")
        if not rt.namespaced:
            m.pop("namespace")
        if old["metadata"].get("deletionTimestamp"):
            added = set(m.get("finalizers", [])) - set(old["metadata"].get("finalizers", []))
            if added:
                raise unprocessable(rt.kind, rt.group, name, [forbidden_field(
                    "metadata.finalizers", "no new finalizers can be added if the object is being deleted, "
                    f"found new finalizers {sorted(added)!r}")])
        fm_schema = self._fm_schema(rt, version)
        if operation == "Apply":
            m["managedFields"] = new["metadata"].get("managedFields", [])
        else:
            m["managedFields"] = old["metadata"].get("managedFields", [])
            fieldmanager.record_update(old, cleaned,
                                       fm_schema, manager=req.manager, api_version=rt.api_version(version),
                                       now=now_rfc3339(), status=self._status_mode(rt, subresource),
                                       subresource=subresource)
        if rt.custom and _spec_part(cleaned) != _spec_part(old):
            m["generation"] = old["metadata"].get("generation", 1) + 1
        self._admit(rt, version, "UPDATE", m.get("namespace", ""), name, cleaned, old, req, subresource)
        if _same(cleaned, old):
            return self._out(rt, version, old)  # a no-op write stores nothing and bumps nothing
        if req.dry_run:
            return self._out(rt, version, cleaned)
        key = (rt.group, rt.plural)
        if m.get("deletionTimestamp") and not m.get("finalizers"):
            gone = self.store.remove(key, m.get("namespace", ""), name)
            self.gc_wakeup.set()
            return self._out(rt, version, gone or cleaned)
        stored = self.store.put(key, cleaned, "MODIFIED")
        self._after_write(rt, stored)
        return self._out(rt, version, stored)

    # --- delete ------------------------------------------------------------------------------------

    def delete(self, rt: ResourceType, version: str, ns: str, name: str, options: Any,
               req: Request) -> dict[str, Any]:
        options = options if isinstance(options, dict) else {}
        pre = options.get("preconditions") or {}
        policy = options.get("propagationPolicy") or "Background"
        if policy not in ("Background", "Foreground", "Orphan"):
            raise unprocessable("DeleteOptions", "", "", [
                invalid("propagationPolicy", policy, "must be Background, Foreground or Orphan")])
        key = (rt.group, rt.plural)
        with self.store.lock:
            old = self._existing(rt, ns, name)
            om = old["metadata"]
            if pre.get("uid") and pre["uid"] != om["uid"]:
                raise conflict(rt.plural, rt.group, name, f"Precondition failed: UID in precondition: "
                               f"{pre['uid']}, UID in object meta: {om['uid']}")
            if pre.get("resourceVersion") and pre["resourceVersion"] != om["resourceVersion"]:
                raise conflict(rt.plural, rt.group, name, "Precondition failed: ResourceVersion in "
                               f"precondition: {pre['resourceVersion']}, ResourceVersion in object meta: "
                               f"{om['resourceVersion']}")
            if rt.plural == "namespaces" and name in SYSTEM_NAMESPACES:
                raise ApiError(403, "Forbidden",
                               f'namespaces "{name}" is forbidden: this namespace may not be deleted',
                               {"name": name, "kind": "namespaces"})
            self._admit(rt, version, "DELETE", ns if rt.namespaced else "", name, None, old, req)
            if req.dry_run:
                return self._out(rt, version, old)
            if policy == "Orphan":
                self._orphan(om["uid"], om.get("namespace", ""))
            if rt.plural == "namespaces":
                if not om.get("deletionTimestamp"):
                    om["deletionTimestamp"] = now_rfc3339()
                    old["status"] = {"phase": "Terminating"}
                    stored = self.store.put(key, old, "MODIFIED")
                    self.gc_wakeup.set()
                    return self._out(rt, version, stored)
                return self._out(rt, version, old)
            if om.get("finalizers"):
                if not om.get("deletionTimestamp"):
                    om["deletionTimestamp"] = now_rfc3339()
                    om["deletionGracePeriodSeconds"] = 0
                    old = self.store.put(key, old, "MODIFIED")
                return self._out(rt, version, old)
            gone = self.store.remove(key, om.get("namespace", ""), name)
        self.gc_wakeup.set()
        return self._out(rt, version, gone or old)

    def _orphan(self, uid: str, ns: str) -> None:
        for key, obj in self.store.all_items():
            refs = obj["metadata"].get("ownerReferences") or []
            if any(r.get("uid") == uid for r in refs):
                obj["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != uid]
                if not obj["metadata"]["ownerReferences"]:
                    del obj["metadata"]["ownerReferences"]
                rt = self.types[key]
                schema = self._fm_schema(rt, rt.storage_version)
                entries = fieldmanager.read_entries(obj)
                present = fieldmanager.flatten(obj, schema)
                fieldmanager.write_entries(obj, fieldmanager.prune_entries(entries, present))
                self.store.put(key, obj, "MODIFIED")

    # --- garbage collection --------------------------------------------------------------------------

    def collect_garbage(self) -> int:
        """One pass: delete dependents whose owners are all gone, and empty terminating namespaces.
        Returns how many objects it deleted."""
        deleted = 0
        with self.store.lock:
            everything = self.store.all_items()
            uids = {(o["metadata"].get("namespace", ""), o["metadata"]["uid"]) for _, o in everything}
            cluster_uids = {o["metadata"]["uid"] for _, o in everything}
            terminating = {o["metadata"]["name"] for k, o in everything
                           if k == ("", "namespaces") and o["metadata"].get("deletionTimestamp")}
            for key, obj in everything:
                om = obj["metadata"]
                ns = om.get("namespace", "")
                refs = om.get("ownerReferences") or []
                dangling = refs and not any(
                    (ns, r.get("uid")) in uids or (not ns and r.get("uid") in cluster_uids) for r in refs)
                if dangling or (ns and ns in terminating):
                    if om.get("finalizers"):
                        if not om.get("deletionTimestamp"):
                            om["deletionTimestamp"] = now_rfc3339()
                            self.store.put(key, obj, "MODIFIED")
                        continue
                    self.store.remove(key, ns, om["name"])
                    deleted += 1
            for name in terminating:
                if not any(o["metadata"].get("namespace") == name for _, o in self.store.all_items()):
                    self.store.remove(("", "namespaces"), "", name)
                    deleted += 1
        return deleted

    # --- RBAC ------------------------------------------------------------------------------------------

    def rbac_rules(self, ident: Identity) -> builtins.list[Rule]:  # Cluster.list shadows list here
        """The rules stored RoleBindings and ClusterRoleBindings give an identity."""
        def bound(binding: dict[str, Any]) -> bool:
            for subject in binding.get("subjects") or []:
                kind, name = subject.get("kind"), subject.get("name")
                if kind == "User" and name == ident.user:
                    return True
                if kind == "Group" and name in ident.all_groups:
                    return True
                sa_ns = subject.get("namespace") or binding["metadata"].get("namespace")
                if kind == "ServiceAccount" and ident.user == f"system:serviceaccount:{sa_ns}:{name}":
                    return True
            return False

        def role_rules(kind: str, name: str, ns: str) -> list[dict[str, Any]]:
            role = (self.store.get(("rbac.authorization.k8s.io", "roles"), ns, name) if kind == "Role"
                    else self.store.get(("rbac.authorization.k8s.io", "clusterroles"), "", name))
            return (role or {}).get("rules") or []

        out: list[Rule] = []
        for key, scoped in ((("rbac.authorization.k8s.io", "rolebindings"), True),
                            (("rbac.authorization.k8s.io", "clusterrolebindings"), False)):
            for binding in self.store.items(key):
                if not bound(binding):
                    continue
                ns = binding["metadata"].get("namespace", "")
                ref = binding.get("roleRef") or {}
                for r in role_rules(ref.get("kind", ""), ref.get("name", ""), ns):
                    out.append(Rule(tuple(r.get("verbs") or ()), tuple(r.get("apiGroups") or ()),
                                    tuple(r.get("resources") or ()), (ns,) if scoped else None,
                                    tuple(r.get("resourceNames") or ())))
        return out

    # --- tokens and reviews ---------------------------------------------------------------------------

    def sa_uid(self, ns: str, name: str) -> str | None:
        sa = self.store.get(("", "serviceaccounts"), ns, name)
        return sa["metadata"]["uid"] if sa else None

    def token_request(self, ns: str, sa_name: str, body: Any, req: Request | None = None) -> dict[str, Any]:
        """TokenRequest (serviceaccounts/token); with `req` (a client's request) admitted first, as the
        API server does (a policy can pin the audiences a caller may ask for)."""
        if not isinstance(body, dict) or body.get("kind") not in (None, "TokenRequest"):
            raise bad_request("the body must be a TokenRequest")
        sa = self.store.get(("", "serviceaccounts"), ns, sa_name)
        if sa is None:
            raise not_found("serviceaccounts", "", sa_name)
        spec = body.get("spec") or {}
        if req is not None:
            shown = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                     "metadata": {"name": sa_name, "namespace": ns}, "spec": spec}
            attrs = admission.Attributes("CREATE", "", "v1", "serviceaccounts", "TokenRequest", "token", ns, sa_name,
                                         req.identity, shown, None, req.dry_run)
            admission.admit(self.store, attrs, ("v1",), self._warn, self.audit)
        audiences = spec.get("audiences") or [API_AUDIENCE]
        seconds = spec.get("expirationSeconds", 3600)
        if not isinstance(seconds, int) or isinstance(seconds, bool):
            raise bad_request("spec.expirationSeconds must be an integer")
        if seconds < 600:
            raise unprocessable("TokenRequest", "authentication.k8s.io", "", [invalid(
                "spec.expirationSeconds", seconds, "may not specify a duration less than 10 minutes")])
        if seconds > 2**32:
            raise unprocessable("TokenRequest", "authentication.k8s.io", "", [invalid(
                "spec.expirationSeconds", seconds, "may not specify a duration larger than 2^32 seconds")])
        token, exp = self.auth.mint(ns, sa_name, sa["metadata"]["uid"], list(audiences), seconds)
        return {"kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"name": sa_name, "namespace": ns, "creationTimestamp": None},
                "spec": {"audiences": list(audiences), "expirationSeconds": seconds,
                         "boundObjectRef": spec.get("boundObjectRef")},
                "status": {"token": token, "expirationTimestamp":
                           dt.datetime.fromtimestamp(exp, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}}

    def access_review(self, ident: Identity, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("spec"), dict):
            raise bad_request("the body must be a SelfSubjectAccessReview")
        spec = body["spec"]
        attrs = spec.get("resourceAttributes")
        if attrs is None and spec.get("nonResourceAttributes") is None:
            raise unprocessable("SelfSubjectAccessReview", "authorization.k8s.io", "", [required(
                "spec.resourceAttributes",
                "exactly one of nonResourceAttributes or resourceAttributes must be specified")])
        if attrs is not None:
            resource = attrs.get("resource", "")
            if attrs.get("subresource"):
                resource = f"{resource}/{attrs['subresource']}"
            allowed = self.auth.allowed(ident, attrs.get("verb", ""), attrs.get("group", ""), resource,
                                        attrs.get("namespace", ""), attrs.get("name", ""))
        else:
            verb = spec["nonResourceAttributes"].get("verb", "")
            allowed = self.auth.allowed(ident, verb, "*", "*", "", "")
        status: dict[str, Any] = {"allowed": allowed}
        if not allowed:
            status["reason"] = "no rule grants it"
        return {"kind": "SelfSubjectAccessReview", "apiVersion": "authorization.k8s.io/v1",
                "metadata": {"creationTimestamp": None}, "spec": spec, "status": status}


_META_KEYS: openapi.Schema = {
    "type": "object",
    "properties": {k: {} for k in (
        "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
        "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels", "annotations",
        "ownerReferences", "finalizers", "managedFields")},
}


def _apply_defaults(rt: ResourceType, body: dict[str, Any]) -> None:
    """The defaults the real server fills in for the built-in types served here."""
    if rt.plural == "services" and isinstance(body.get("spec"), dict):
        spec = body["spec"]
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        for port in spec.get("ports") or []:
            if isinstance(port, dict):
                port.setdefault("protocol", "TCP")
                port.setdefault("targetPort", port.get("port"))


def _spec_part(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    def strip(o: dict[str, Any]) -> dict[str, Any]:
        o = {k: v for k, v in o.items() if k not in ("apiVersion", "kind")}
        m = dict(o.get("metadata", {}))
        m.pop("resourceVersion", None)
        m["managedFields"] = [{k: v for k, v in e.items() if k != "time"} for e in m.get("managedFields", [])]
        o["metadata"] = m
        return o

    return strip(a) == strip(b)


def _apply_conflict(rt: ResourceType, name: str, conflicts: list[fieldmanager.Conflict]) -> ApiError:
    causes = [Cause(c.field(), f'conflict with "{c.manager}" using {c.api_version}', "FieldManagerConflict")
              for c in conflicts]
    if len(conflicts) == 1:
        c = conflicts[0]
        text = f'Apply failed with 1 conflict: conflict with "{c.manager}" using {c.api_version}: {c.field()}'
    else:
        lines = "".join(f"\n- {c.field()}" for c in conflicts)
        managers = ", ".join(sorted({f'"{c.manager}"' for c in conflicts}))
        text = f"Apply failed with {len(conflicts)} conflicts: conflicts with {managers}:{lines}"
    return ApiError(409, "Conflict", text, {"name": name, "group": rt.group, "kind": rt.plural,
                                            "causes": [c.as_dict() for c in causes]})
