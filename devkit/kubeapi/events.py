"""Events as the API server serves them: one stored object, two views. events.k8s.io/v1 is where they
are written (with its strict validation, pkg/apis/core/validation/events.go); core/v1 is the same
objects under their old field names (regarding -> involvedObject, note -> message, reportingController
-> reportingComponent, deprecated* -> the plain names), which is what `kubectl describe` and
`kubectl get events` read. The core/v1 view is read-only here (get, list, watch).

Validation errors name the fields as the server's internal type does (`message`, `involvedObject`),
as a real server's answers do."""

from __future__ import annotations

from typing import Any

from devkit.kubeapi.meta import qualified_name_errors
from devkit.kubeapi.openapi import Schema, parse_time
from devkit.kubeapi.status import FieldError, invalid, required

GROUP = "events.k8s.io"
REPORTING_INSTANCE_LIMIT = 128
ACTION_LIMIT = 128
REASON_LIMIT = 128
NOTE_LIMIT = 1024

_STR = {"type": "string"}
_MICRO = {"type": "string", "format": "micro-time"}
_TIME = {"type": "string", "format": "date-time"}
_REF: Schema = {"type": "object", "properties": {k: _STR for k in (
    "apiVersion", "kind", "namespace", "name", "uid", "resourceVersion", "fieldPath")}}

EVENT_V1_SCHEMA: Schema = {
    "type": "object",
    "properties": {
        "eventTime": _MICRO,
        "series": {"type": "object", "properties": {"count": {"type": "integer", "format": "int32"},
                                                    "lastObservedTime": _MICRO}},
        "reportingController": _STR,
        "reportingInstance": _STR,
        "action": _STR,
        "reason": _STR,
        "regarding": _REF,
        "related": _REF,
        "note": _STR,
        "type": _STR,
        "deprecatedSource": {"type": "object", "properties": {"component": _STR, "host": _STR}},
        "deprecatedFirstTimestamp": _TIME,
        "deprecatedLastTimestamp": _TIME,
        "deprecatedCount": {"type": "integer", "format": "int32"},
    },
}

# The same object in core/v1 (read only here, so only for discovery and the printer).
EVENT_CORE_SCHEMA: Schema = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}

# events.k8s.io/v1 field -> core/v1 field
_CORE_NAMES = {"regarding": "involvedObject", "note": "message", "reportingController": "reportingComponent",
               "deprecatedSource": "source", "deprecatedFirstTimestamp": "firstTimestamp",
               "deprecatedLastTimestamp": "lastTimestamp", "deprecatedCount": "count"}
# Field selectors the server supports on core/v1 events (pkg/registry/core/event/strategy.go).
CORE_FIELDS = ("metadata.name", "metadata.namespace", "involvedObject.kind", "involvedObject.namespace",
               "involvedObject.name", "involvedObject.uid", "involvedObject.apiVersion",
               "involvedObject.resourceVersion", "involvedObject.fieldPath", "reason", "reportingComponent",
               "source", "type")
V1_FIELDS = ("metadata.name", "metadata.namespace", "regarding.kind", "regarding.namespace", "regarding.name",
             "regarding.uid", "regarding.apiVersion", "regarding.resourceVersion", "regarding.fieldPath",
             "reason", "reportingController", "type")


def core_view(obj: dict[str, Any]) -> dict[str, Any]:
    """The stored (events.k8s.io/v1) object under its core/v1 field names."""
    out = {_CORE_NAMES.get(k, k): v for k, v in obj.items()}
    out.setdefault("involvedObject", {})
    out.setdefault("source", {})
    out.setdefault("firstTimestamp", None)
    out.setdefault("lastTimestamp", None)
    out["source"] = {**out["source"], "component": out["source"].get("component", "")} \
        if out["source"] else {}
    return out


def _selectable_core(obj: dict[str, Any]) -> dict[str, Any]:
    view = core_view(obj)
    # `source` selects on the component, as the server's field set has it.
    view["source"] = (view.get("source") or {}).get("component", "")
    return view


def selectable(core: bool, obj: dict[str, Any]) -> dict[str, Any]:
    """The object as a field selector sees it."""
    return _selectable_core(obj) if core else obj


def _unset(body: dict[str, Any], name: str, path: str) -> list[FieldError]:
    value = body.get(name)
    if value in (None, "", 0, {}):
        return []
    if isinstance(value, dict) and not any(value.values()):
        return []
    return [invalid(path, "", "needs to be unset")]


def _series_errors(body: dict[str, Any]) -> list[FieldError]:
    series = body.get("series")
    if series is None:
        return []
    errors = []
    if int(series.get("count") or 0) < 2:
        errors.append(invalid("series.count", "", "should be at least 2"))
    if not series.get("lastObservedTime"):
        errors.append(required("series.lastObservedTime"))
    return errors


def _legacy_errors(body: dict[str, Any], namespace: str) -> list[FieldError]:
    """What every event must satisfy (legacyValidateEvent, for an event with an eventTime)."""
    errors: list[FieldError] = []
    regarding = body.get("regarding") or {}
    if not regarding.get("namespace") and namespace not in ("default", "kube-system"):
        errors.append(invalid("involvedObject.namespace", "", "does not match event.namespace"))
    elif regarding.get("namespace") and regarding["namespace"] != namespace:
        errors.append(invalid("involvedObject.namespace", regarding["namespace"], "does not match event.namespace"))
    controller = body.get("reportingController") or ""
    if not controller:
        errors.append(required("reportingController"))
    errors += qualified_name_errors(controller, "reportingController")
    instance = body.get("reportingInstance") or ""
    if not instance:
        errors.append(required("reportingInstance"))
    if len(instance) > REPORTING_INSTANCE_LIMIT:
        errors.append(invalid("reportingInstance", "", f"can have at most {REPORTING_INSTANCE_LIMIT} characters"))
    action = body.get("action") or ""
    if not action:
        errors.append(required("action"))
    if len(action) > ACTION_LIMIT:
        errors.append(invalid("action", "", f"can have at most {ACTION_LIMIT} characters"))
    reason = body.get("reason") or ""
    if not reason:
        errors.append(required("reason"))
    if len(reason) > REASON_LIMIT:
        errors.append(invalid("reason", "", f"can have at most {REASON_LIMIT} characters"))
    if len((body.get("note") or "").encode()) > NOTE_LIMIT:
        errors.append(invalid("message", "", f"can have at most {NOTE_LIMIT} characters"))
    return errors


def create_errors(body: dict[str, Any], namespace: str) -> list[FieldError]:
    """ValidateEventCreate for events.k8s.io/v1 (metadata is checked by the caller)."""
    errors = _legacy_errors(body, namespace) if body.get("eventTime") else []
    errors += _series_errors(body)
    if not body.get("eventTime"):
        errors.append(required("eventTime"))
    if body.get("type") not in ("Normal", "Warning"):
        errors.append(invalid("type", "", f"has invalid value: {body.get('type') or ''}"))
    errors += _unset(body, "deprecatedFirstTimestamp", "firstTimestamp")
    errors += _unset(body, "deprecatedLastTimestamp", "lastTimestamp")
    errors += _unset(body, "deprecatedCount", "count")
    errors += _unset(body, "deprecatedSource", "source")
    return errors


# events.k8s.io/v1 fields that never change after creation (as core names in the errors).
_IMMUTABLE = ("regarding", "reason", "note", "deprecatedSource", "deprecatedFirstTimestamp",
              "deprecatedLastTimestamp", "deprecatedCount", "type", "eventTime", "action", "related",
              "reportingController", "reportingInstance")


def update_errors(new: dict[str, Any], old: dict[str, Any], namespace: str) -> list[FieldError]:
    """ValidateEventUpdate for events.k8s.io/v1: only the series may change."""
    errors = _legacy_errors(new, namespace) if new.get("eventTime") else []
    if new.get("series") != old.get("series"):
        errors += _series_errors(new)
    for name in _IMMUTABLE:
        if _norm(name, new.get(name)) != _norm(name, old.get(name)):
            errors.append(invalid(_CORE_NAMES.get(name, name), new.get(name) if isinstance(new.get(name), str)
                                  else "", "field is immutable"))
    return errors


def _norm(name: str, value: Any) -> Any:
    if name == "eventTime" and isinstance(value, str):
        return parse_time(value)
    return value if value not in ("", {}, None, 0) else None


# --- server-side printing (core/v1 and events.k8s.io/v1, as `kubectl get events` shows them) ----------

def _last_seen(obj: dict[str, Any]) -> str | None:
    series = obj.get("series") or {}
    return series.get("lastObservedTime") or obj.get("deprecatedLastTimestamp") or obj.get("lastTimestamp") \
        or obj.get("eventTime") or (obj.get("metadata") or {}).get("creationTimestamp")


def _object(obj: dict[str, Any]) -> str:
    ref = obj.get("regarding") or obj.get("involvedObject") or {}
    return f"{str(ref.get('kind', '')).lower()}/{ref.get('name', '')}"


def printer_columns() -> tuple[dict[str, Any], ...]:
    """Columns computed from the stored object (`value`), which the table printer calls."""
    return (
        {"name": "Last Seen", "type": "date", "jsonPath": "", "description": "", "value": _last_seen},
        {"name": "Type", "type": "string", "jsonPath": ".type", "description": ""},
        {"name": "Reason", "type": "string", "jsonPath": ".reason", "description": ""},
        {"name": "Object", "type": "string", "jsonPath": "", "description": "", "value": _object},
        {"name": "Message", "type": "string", "jsonPath": "", "description": "",
         "value": lambda o: o.get("note", o.get("message", ""))},
        {"name": "Name", "type": "string", "format": "name", "jsonPath": ".metadata.name", "description": "",
         "priority": 1},
    )
