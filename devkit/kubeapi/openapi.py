"""The OpenAPI v3 subset a CRD's structural schema uses, validated the way the API server does.

`validate(schema, obj)` returns field-path errors as strings; `check()` returns them structured.
`prune()` drops what the schema does not declare (the server prunes unknown fields of custom
resources silently, or refuses them with fieldValidation=Strict). The CEL rules of the Istio CRDs
are translated by hand in `CEL_RULES`; a rule missing from that table is reported by
`untranslated_rules()` so a CRD update cannot slip through unnoticed.
"""

from __future__ import annotations

import copy
import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from devkit.kubeapi.status import (
    FieldError,
    invalid,
    not_supported,
    required,
    too_long,
    too_many,
)

Schema = dict[str, Any]

_TYPES = {
    "object": "object",
    "array": "array",
    "string": "string",
    "integer": "integer",
    "number": "number",
    "boolean": "boolean",
}


def type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def _type_ok(expected: str, value: Any) -> bool:
    actual = type_name(value)
    if expected == "number":
        return actual in ("number", "integer")
    return actual == expected


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# --- formats -----------------------------------------------------------------------------------

_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
# metav1.MicroTime is parsed with the fixed layout 2006-01-02T15:04:05.000000Z07:00: exactly six
# fractional digits. Python's isoformat() drops them when the microsecond is 0, which a real server
# rejects; this is checked so code that writes Leases is caught here.
_RFC3339_MICRO = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}(Z|[+-]\d{2}:\d{2})$")


def parse_time(text: str) -> dt.datetime | None:
    if not _RFC3339.match(text):
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("z", "Z").replace("t", "T").replace("Z", "+00:00"))
    except ValueError:
        return None


def _format_ok(fmt: str, value: Any) -> bool:
    if fmt == "int32" and isinstance(value, int):
        return -(2**31) <= value < 2**31
    if fmt == "int64" and isinstance(value, int):
        return -(2**63) <= value < 2**63
    if fmt == "date-time" and isinstance(value, str):
        return parse_time(value) is not None
    if fmt == "micro-time" and isinstance(value, str):
        return bool(_RFC3339_MICRO.match(value)) and parse_time(value) is not None
    return True


# --- hand-translated CEL rules ------------------------------------------------------------------

_PORT_NAME = re.compile(r"^[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?$")


def _uds_absolute(v: str) -> bool:
    # CEL's substring(7, 8) fails on "unix://" itself; a failing rule is a failed validation.
    return not v.startswith("unix://") or (len(v) >= 8 and v[7] in "/@")


def _se_cidr_only_static(v: dict[str, Any]) -> bool:
    has_cidr = any("/" in a for a in v.get("addresses", []))
    return not (has_cidr and v.get("resolution", "NONE") not in ("STATIC", "NONE"))


def _unique_numbers(items: list[dict[str, Any]]) -> bool:
    numbers = [i.get("number") for i in items]
    return all(numbers.count(n) == 1 for n in numbers)


def _norm(rule: str) -> str:
    return re.sub(r"\s+", " ", rule).strip()


CEL_RULES: dict[str, Callable[[Any], bool]] = {
    _norm('self.startsWith("unix://") ? (self.substring(7, 8) == "/" || self.substring(7, 8) == "@") '
          ': true'): _uds_absolute,
    _norm('self.startsWith("unix://") ? !self.endsWith("/") : true'):
        lambda v: not (v.startswith("unix://") and v.endswith("/")),
    _norm("0 < self && self <= 65535"): lambda v: 0 < v <= 65535,
    _norm('self.all(key, size(key) < 63 && key.matches("^[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?$"))'):
        lambda v: all(len(k) < 63 and _PORT_NAME.search(k) for k in v),
    _norm("has(self.address) || has(self.network)"): lambda v: "address" in v or "network" in v,
    _norm('(has(self.address) ? self.address : "").startsWith("unix://") ? !has(self.ports) : true'):
        lambda v: not (str(v.get("address", "")).startswith("unix://") and "ports" in v),
    _norm('self != "*"'): lambda v: v != "*",
    _norm("self.all(l1, self.exists_one(l2, l1.number == l2.number))"): _unique_numbers,
    _norm('!self.contains("*")'): lambda v: "*" not in v,
    _norm('self in ["", "HTTP", "HTTPS"]'): lambda v: v in ("", "HTTP", "HTTPS"),
    _norm("(has(self.workloadSelector) ? 1 : 0) + (has(self.endpoints) ? 1 : 0) <= 1"):
        lambda v: ("workloadSelector" in v) + ("endpoints" in v) <= 1,
    _norm('!((has(self.addresses) ? self.addresses : []).exists(k, k.contains("/")) && '
          '!((has(self.resolution) ? self.resolution : "NONE") in ["STATIC", "NONE"]))'):
        _se_cidr_only_static,
    _norm('((has(self.resolution) ? self.resolution : "NONE") == "NONE") ? !has(self.endpoints) : true'):
        lambda v: v.get("resolution", "NONE") != "NONE" or "endpoints" not in v,
    _norm('((has(self.resolution) ? self.resolution : "") == "DNS_ROUND_ROBIN") ? '
          '((has(self.endpoints) ? self.endpoints : []).size() <= 1) : true'):
        lambda v: v.get("resolution", "") != "DNS_ROUND_ROBIN" or len(v.get("endpoints", [])) <= 1,
}


def _cel_check(rule: dict[str, Any], value: Any, path: str) -> FieldError | None:
    fn = CEL_RULES.get(_norm(rule["rule"]))
    if fn is None:
        return None  # reported by untranslated_rules(); never silently treated as passing in tests
    try:
        ok = fn(value)
    except (TypeError, AttributeError, KeyError):
        ok = False
    if ok:
        return None
    message = rule.get("message") or f"failed rule: {rule['rule']}"
    return invalid(path, type_name(value) if isinstance(value, (dict, list)) else value, message)


def untranslated_rules(schema: Schema) -> list[str]:
    """Every x-kubernetes-validations rule in the schema that CEL_RULES does not translate."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for rule in node.get("x-kubernetes-validations", []) or []:
                if _norm(rule["rule"]) not in CEL_RULES:
                    found.append(rule["rule"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return found


# --- validation ---------------------------------------------------------------------------------


def check(schema: Schema, value: Any, path: str = "") -> list[FieldError]:
    """All schema and CEL errors for value at path (unknown fields are not errors here: see prune)."""
    errors: list[FieldError] = []
    _check(schema, value, path, errors)
    return errors


def validate(schema: Schema, obj: Any, path: str = "", *, unknown_fields: bool = True) -> list[str]:
    """Field-path errors as strings, e.g. 'spec.address: Too long: may not be more than 256 bytes'.

    With unknown_fields (the default) fields the schema does not declare are errors too, as a
    real server with fieldValidation=Strict would have them; without it they are ignored (pruned).
    """
    errors = [str(e) for e in check(schema, obj, path)]
    if unknown_fields:
        errors += [f"{p}: field not declared in schema" for p in find_unknown(schema, obj, path)]
    return errors


def _check(schema: Schema, value: Any, path: str, errors: list[FieldError]) -> None:
    if value is None:
        if not schema.get("nullable"):
            errors.append(invalid(path, None, f"{path or '<root>'} in body must be of type "
                                              f"{schema.get('type', 'object')}: \"null\""))
        return
    if schema.get("x-kubernetes-int-or-string") and type_name(value) not in ("integer", "string"):
        errors.append(invalid(path, value, f"{path} in body must be of type integer-or-string"))
        return
    expected = schema.get("type")
    if expected and not _type_ok(expected, value):
        errors.append(invalid(path, type_name(value),
                              f"{path} in body must be of type {expected}: {type_name(value)!r}".replace(
                                  "'", '"')))
        return
    before = len(errors)
    if "enum" in schema and value not in schema["enum"]:
        errors.append(not_supported(path, value, schema["enum"]))
    fmt = schema.get("format")
    if fmt and not _format_ok(fmt, value):
        errors.append(invalid(path, value, f"{path} in body must be of type {fmt}: \"{value}\""))
    if isinstance(value, str):
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(too_long(path, schema["maxLength"]))
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(invalid(path, value, f"{path} in body should be at least {schema['minLength']} "
                                               "chars long"))
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(invalid(path, value, f"{path} in body should match '{schema['pattern']}'"))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(invalid(path, value, f"{path} in body should be greater than or equal to "
                                               f"{schema['minimum']}"))
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(invalid(path, value, f"{path} in body should be less than or equal to "
                                               f"{schema['maximum']}"))
    if isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(too_many(path, len(value), schema["maxItems"]))
        if "minItems" in schema and len(value) < schema["minItems"]:
            errors.append(invalid(path, len(value), f"{path} in body should have at least "
                                                    f"{schema['minItems']} items"))
        items = schema.get("items")
        if items:
            for i, item in enumerate(value):
                _check(items, item, f"{path}[{i}]", errors)
        _check_list_type(schema, value, path, errors)
    if isinstance(value, dict):
        if "maxProperties" in schema and len(value) > schema["maxProperties"]:
            errors.append(too_many(path, len(value), schema["maxProperties"]))
        if "minProperties" in schema and len(value) < schema["minProperties"]:
            errors.append(invalid(path, len(value), f"{path} in body should have at least "
                                                    f"{schema['minProperties']} properties"))
        names = schema.get("propertyNames")
        if names and "pattern" in names:
            for key in value:
                if not re.search(names["pattern"], key):
                    detail = f"a valid key must match '{names['pattern']}'"
                    errors.append(invalid(join(path, key), key, detail))
        for name in schema.get("required", []):
            if name not in value:
                errors.append(required(join(path, name)))
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, sub in value.items():
            if key in props:
                _check(props[key], sub, join(path, key), errors)
            elif isinstance(extra, dict):
                _check(extra, sub, join(path, key), errors)
    _check_combinators(schema, value, path, errors)
    # CEL rules run beside the schema checks, except on a value of the wrong type (returned above).
    if not any(e.path == path for e in errors[before:]):
        for rule in schema.get("x-kubernetes-validations", []) or []:
            err = _cel_check(rule, value, path)
            if err:
                errors.append(err)


def _check_list_type(schema: Schema, value: list[Any], path: str, errors: list[FieldError]) -> None:
    list_type = schema.get("x-kubernetes-list-type")
    if list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen: set[str] = set()
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                continue
            for k in keys:
                if k not in item:
                    errors.append(required(f"{path}[{i}].{k}"))
            ident = repr(tuple(item.get(k) for k in keys))
            if ident in seen:
                errors.append(FieldError(f"{path}[{i}]", "FieldValueDuplicate",
                                         f"Duplicate value: {item_key(item, keys)}"))
            seen.add(ident)
    elif list_type == "set":
        seen_values: list[Any] = []
        for i, item in enumerate(value):
            if item in seen_values:
                errors.append(FieldError(f"{path}[{i}]", "FieldValueDuplicate",
                                         f"Duplicate value: {item!r}"))
            seen_values.append(item)


def item_key(item: dict[str, Any], keys: list[str]) -> str:
    return "map[" + " ".join(f"{k}:{item.get(k)}" for k in keys) + "]"


def _matches(schema: Schema, value: Any) -> bool:
    return not check(schema, value, "")


def _check_combinators(schema: Schema, value: Any, path: str, errors: list[FieldError]) -> None:
    # In a structural schema these only constrain values; types come from the outer schema.
    if "oneOf" in schema:
        count = sum(_matches(s, value) for s in schema["oneOf"])
        if count != 1:
            errors.append(invalid(path, type_name(value),
                                  f"{path} in body must validate one and only one schema (oneOf)"))
    if "anyOf" in schema and not schema.get("x-kubernetes-int-or-string") and not any(
            _matches(s, value) for s in schema["anyOf"]):
        errors.append(invalid(path, type_name(value), f"{path} in body must validate at least one schema "
                                                      "(anyOf)"))
    if "allOf" in schema:
        for s in schema["allOf"]:
            _check(s, value, path, errors)
    if "not" in schema and _matches(schema["not"], value):
        errors.append(invalid(path, type_name(value), f"{path} in body should not validate the schema (not)"))


# --- pruning ------------------------------------------------------------------------------------


def _declares(schema: Schema) -> bool:
    return bool(schema.get("properties")) or isinstance(schema.get("additionalProperties"), dict)


def find_unknown(schema: Schema, value: Any, path: str = "") -> list[str]:
    """Paths of fields the schema does not declare (where unknown fields are not preserved)."""
    found: list[str] = []
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        keep = schema.get("x-kubernetes-preserve-unknown-fields") or extra is True
        for key, sub in value.items():
            if key in props:
                found += find_unknown(props[key], sub, join(path, key))
            elif isinstance(extra, dict):
                found += find_unknown(extra, sub, join(path, key))
            elif not keep and (schema.get("type") == "object" or _declares(schema)):
                found.append(join(path, key))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += find_unknown(schema["items"], item, f"{path}[{i}]")
    return found


def prune(schema: Schema, value: Any) -> Any:
    """A copy of value without undeclared fields and without nulls the schema does not allow."""
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        keep = schema.get("x-kubernetes-preserve-unknown-fields") or extra is True
        out: dict[str, Any] = {}
        for key, sub in value.items():
            if key in props:
                sub_schema = props[key]
            elif isinstance(extra, dict):
                sub_schema = extra
            elif keep:
                out[key] = copy.deepcopy(sub)
                continue
            else:
                continue
            if sub is None and not sub_schema.get("nullable"):
                continue
            out[key] = prune(sub_schema, sub)
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [prune(schema["items"], item) for item in value]
    return copy.deepcopy(value)


def at(schema: Schema | None, key: str | int) -> Schema | None:
    """The sub-schema for a property name or a list index."""
    if schema is None:
        return None
    if isinstance(key, int):
        items = schema.get("items")
        return items if isinstance(items, dict) else None
    props = schema.get("properties", {})
    if key in props:
        return props[key]
    extra = schema.get("additionalProperties")
    return extra if isinstance(extra, dict) else None


# --- CRDs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CRDVersion:
    name: str
    served: bool
    storage: bool
    schema: Schema
    status_subresource: bool
    printer_columns: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class CRD:
    group: str
    kind: str
    list_kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    categories: tuple[str, ...]
    namespaced: bool
    versions: tuple[CRDVersion, ...]

    def version(self, name: str) -> CRDVersion | None:
        return next((v for v in self.versions if v.name == name and v.served), None)

    @property
    def storage_version(self) -> str:
        return next(v.name for v in self.versions if v.storage)


def parse_crd(doc: dict[str, Any]) -> CRD:
    spec = doc["spec"]
    names = spec["names"]
    versions = tuple(
        CRDVersion(
            name=v["name"],
            served=bool(v.get("served")),
            storage=bool(v.get("storage")),
            schema=v.get("schema", {}).get("openAPIV3Schema", {"type": "object"}),
            status_subresource="status" in (v.get("subresources") or {}),
            printer_columns=tuple(v.get("additionalPrinterColumns", [])),
        )
        for v in spec["versions"]
    )
    return CRD(
        group=spec["group"], kind=names["kind"], list_kind=names.get("listKind", names["kind"] + "List"),
        plural=names["plural"], singular=names.get("singular", names["kind"].lower()),
        short_names=tuple(names.get("shortNames", [])), categories=tuple(names.get("categories", [])),
        namespaced=spec.get("scope", "Namespaced") == "Namespaced", versions=versions,
    )


def default_crds_path() -> Path:
    """The Istio CRDs: $MESH_AGENT_CRDS, else the structural schemas kept beside this module."""
    import os

    if os.environ.get("MESH_AGENT_CRDS"):
        return Path(os.environ["MESH_AGENT_CRDS"])
    return Path(__file__).resolve().parent / "istio-crds.yaml"


@lru_cache(maxsize=8)
def _load(path: str) -> tuple[CRD, ...]:
    with open(path, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d and d.get("kind") == "CustomResourceDefinition"]
    return tuple(parse_crd(d) for d in docs)


def load_crds(path: str | Path | None = None) -> tuple[CRD, ...]:
    where = Path(path) if path else default_crds_path()
    if not where.exists():
        raise FileNotFoundError(f"no CRD file at {where}: set MESH_AGENT_CRDS (or pass crds=) to a file of "
                                "Istio CRDs")
    return _load(str(where))


def crd_schema(kind: str, version: str = "v1", path: str | Path | None = None) -> Schema:
    """The openAPIV3Schema of a CRD by kind ("WorkloadEntry") and served version ("v1")."""
    for crd in load_crds(path):
        if crd.kind == kind:
            v = crd.version(version)
            if v is None:
                raise KeyError(f"{kind} has no served version {version}")
            return v.schema
    raise KeyError(f"no CRD of kind {kind}")


def validate_object(obj: dict[str, Any], path: str | Path | None = None) -> list[str]:
    """Validate a whole custom object as the server would: apiVersion/kind pick the schema; metadata
    (name, labels, annotations, owner references, finalizers) is checked too; unknown fields are errors."""
    from devkit.kubeapi import meta

    group, _, version = obj.get("apiVersion", "").rpartition("/")
    for crd in load_crds(path):
        if crd.kind == obj.get("kind") and crd.group == group:
            v = crd.version(version)
            if v is None:
                return [f"apiVersion: no served version {version} of {crd.kind}"]
            body = {k: val for k, val in obj.items() if k not in ("apiVersion", "kind", "metadata")}
            metadata = obj.get("metadata") or {}
            errors = [str(e) for e in meta.metadata_errors(metadata, "subdomain")]
            if not metadata.get("name") and not metadata.get("generateName"):
                errors.append("metadata.name: Required value: name or generateName is required")
            return errors + validate(v.schema, body)
    return [f"kind: no CRD for {obj.get('apiVersion')} {obj.get('kind')}"]
