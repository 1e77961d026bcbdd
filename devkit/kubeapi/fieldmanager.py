"""Server-side apply: field sets, managedFields, merge, ownership conflicts.

A field set is a set of paths; a path is a tuple of elements in the managedFields (FieldsV1)
spelling: "f:<field>", "k:<json of the key fields>" for an item of a list of type map,
"v:<json value>" for an item of a list of type set, and "." for the list item itself.
Lists are atomic unless the schema says otherwise (x-kubernetes-list-type), maps are granular.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from devkit.kubeapi.openapi import Schema, at

Path = tuple[str, ...]
MISSING = object()

# The metadata fields apply tracks; the rest of metadata belongs to the server.
METADATA_SCHEMA: Schema = {
    "type": "object",
    "properties": {
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "ownerReferences": {"type": "array", "x-kubernetes-list-type": "map",
                            "x-kubernetes-list-map-keys": ["uid"],
                            "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
        "finalizers": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}},
    },
}


def object_schema(body_schema: Schema) -> Schema:
    return {"type": "object",
            "properties": {**body_schema.get("properties", {}), "metadata": METADATA_SCHEMA}}


def _key_element(item: dict[str, Any], keys: list[str]) -> str:
    return "k:" + json.dumps({k: item.get(k) for k in sorted(keys)}, separators=(",", ":"))


def _value_element(value: Any) -> str:
    return "v:" + json.dumps(value, separators=(",", ":"), sort_keys=True)


def flatten(obj: dict[str, Any], schema: Schema, *, status: bool | None = None) -> dict[Path, Any]:
    """Leaf paths of an object with their values. status: True only status, False no status,
    None both (for resources without a status subresource)."""
    out: dict[Path, Any] = {}
    for key, value in obj.items():
        if key in ("apiVersion", "kind"):
            continue
        if (status is True and key != "status") or (status is False and key == "status"):
            continue
        if key == "metadata":
            tracked = {k: v for k, v in (value or {}).items() if k in METADATA_SCHEMA["properties"]}
            _flatten(tracked, METADATA_SCHEMA, ("f:metadata",), out, top=True)
            continue
        _flatten(value, at(schema, key), ("f:" + key,), out)
    return out


def _flatten(value: Any, schema: Schema | None, path: Path, out: dict[Path, Any], top: bool = False) -> None:
    schema = schema or {}
    if isinstance(value, dict) and schema.get("x-kubernetes-map-type") != "atomic":
        if not value:
            if not top:
                out[path] = {}
            return
        for key, sub in value.items():
            _flatten(sub, at(schema, key), (*path, "f:" + key), out)
        return
    if isinstance(value, list):
        list_type = schema.get("x-kubernetes-list-type", "atomic")
        if list_type == "map":
            keys = schema.get("x-kubernetes-list-map-keys", [])
            for item in value:
                if isinstance(item, dict):
                    elem = (*path, _key_element(item, keys))
                    out[(*elem, ".")] = None
                    for key, sub in item.items():
                        _flatten(sub, at(schema, 0) and at(at(schema, 0), key), (*elem, "f:" + key), out)
            return
        if list_type == "set":
            for item in value:
                out[(*path, _value_element(item))] = item
            return
    out[path] = value


def to_fields_v1(paths: set[Path]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for path in sorted(paths):
        node = root
        for elem in path:
            node = node.setdefault(elem, {})
    return root


def from_fields_v1(fields: dict[str, Any], prefix: Path = ()) -> set[Path]:
    paths: set[Path] = set()
    for elem, sub in fields.items():
        path = (*prefix, elem)
        if elem == "." or not sub:
            paths.add(path)
        else:
            paths |= from_fields_v1(sub, path)
    return paths


@dataclass
class Entry:
    manager: str
    operation: str  # "Apply" or "Update"
    api_version: str
    time: str
    fields: set[Path]
    subresource: str = ""

    def same_owner(self, other: Entry) -> bool:
        return (self.manager, self.operation, self.subresource) == (other.manager, other.operation,
                                                                    other.subresource)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"manager": self.manager, "operation": self.operation,
                               "apiVersion": self.api_version, "time": self.time, "fieldsType": "FieldsV1",
                               "fieldsV1": to_fields_v1(self.fields)}
        if self.subresource:
            out["subresource"] = self.subresource
        return out


def read_entries(obj: dict[str, Any]) -> list[Entry]:
    entries = []
    for e in obj.get("metadata", {}).get("managedFields", []) or []:
        entries.append(Entry(e.get("manager", ""), e.get("operation", "Update"), e.get("apiVersion", ""),
                             e.get("time", ""), from_fields_v1(e.get("fieldsV1", {})),
                             e.get("subresource", "")))
    return entries


def write_entries(obj: dict[str, Any], entries: list[Entry]) -> None:
    kept = [e.as_dict() for e in entries if e.fields]
    if kept:
        obj.setdefault("metadata", {})["managedFields"] = kept
    else:
        obj.get("metadata", {}).pop("managedFields", None)


@dataclass(frozen=True)
class Conflict:
    manager: str
    api_version: str
    path: Path
    operation: str = "Update"

    def field(self) -> str:
        return "." + ".".join(_readable(e) for e in self.path if e != ".")


def _readable(elem: str) -> str:
    kind, _, rest = elem.partition(":")
    if kind == "f":
        return rest
    if kind == "k":
        pairs = json.loads(rest)
        return "[" + ",".join(f"{k}={json.dumps(v)}" for k, v in pairs.items()) + "]"
    return f"[={rest}]"


class ApplyConflict(Exception):
    def __init__(self, conflicts: list[Conflict]) -> None:
        super().__init__(f"{len(conflicts)} conflicts")
        self.conflicts = conflicts


# --- editing objects by path ---------------------------------------------------------------------


def _find_item(items: list[Any], elem: str) -> int | None:
    kind, _, rest = elem.partition(":")
    want = json.loads(rest)
    for i, item in enumerate(items):
        if kind == "k" and isinstance(item, dict) and all(item.get(k) == v for k, v in want.items()):
            return i
        if kind == "v" and item == want:
            return i
    return None


def remove_path(obj: Any, path: Path) -> None:
    """Remove the field (or list item) a path names; a missing field is fine."""
    if path and path[-1] == ".":
        path = path[:-1]
    node = obj
    for elem in path[:-1]:
        if isinstance(node, dict) and elem.startswith("f:"):
            node = node.get(elem[2:])
        elif isinstance(node, list):
            i = _find_item(node, elem)
            node = None if i is None else node[i]
        else:
            return
        if node is None:
            return
    last = path[-1]
    if isinstance(node, dict) and last.startswith("f:"):
        node.pop(last[2:], None)
    elif isinstance(node, list):
        i = _find_item(node, last)
        if i is not None:
            del node[i]


def _drop_emptied_parents(obj: dict[str, Any], path: Path) -> None:
    """A map left empty by removing the last field a manager owned goes too (below the top level)."""
    parents = [p for p in path[:-1] if p.startswith("f:")]
    while len(parents) > 1 and parents == list(path[:len(parents)]):
        node: Any = obj
        for elem in parents[:-1]:
            node = node.get(elem[2:]) if isinstance(node, dict) else None
        key = parents[-1][2:]
        if isinstance(node, dict) and node.get(key) == {}:
            del node[key]
        parents.pop()


def merge(target: dict[str, Any], applied: dict[str, Any], schema: Schema | None) -> None:
    """Merge an applied configuration into target: maps deep, atomic lists replaced, keyed lists by key."""
    for key, value in applied.items():
        sub = at(schema, key)
        if value is None:
            target.pop(key, None)
        elif (isinstance(value, dict) and isinstance(target.get(key), dict)
              and (sub or {}).get("x-kubernetes-map-type") != "atomic"):
            merge(target[key], value, sub)
        elif isinstance(value, list) and isinstance(target.get(key), list) and sub:
            target[key] = _merge_list(target[key], value, sub)
        else:
            target[key] = copy.deepcopy(value)


def _merge_list(live: list[Any], applied: list[Any], schema: Schema) -> list[Any]:
    list_type = schema.get("x-kubernetes-list-type", "atomic")
    if list_type == "set":
        return live + [v for v in applied if v not in live]
    if list_type != "map":
        return copy.deepcopy(applied)
    keys = schema.get("x-kubernetes-list-map-keys", [])
    out = copy.deepcopy(live)
    for item in applied:
        i = _find_item(out, _key_element(item, keys)) if isinstance(item, dict) else None
        if i is None:
            out.append(copy.deepcopy(item))
        else:
            merge(out[i], item, at(schema, 0))
    return out


# --- the two operations ---------------------------------------------------------------------------


def prune_entries(entries: list[Entry], present: dict[Path, Any]) -> list[Entry]:
    for e in entries:
        e.fields = {p for p in e.fields if p in present}
    return [e for e in entries if e.fields]


def apply(live: dict[str, Any], applied: dict[str, Any], schema: Schema, *, manager: str, api_version: str,
          now: str, force: bool, status: bool | None, subresource: str = "") -> dict[str, Any]:
    """The object after `manager` applies `applied` to `live`; raises ApplyConflict unless force."""
    entries = read_entries(live)
    mine = Entry(manager, "Apply", api_version, now, set(), subresource)
    previous = next((e for e in entries if e.same_owner(mine)), None)
    others = [e for e in entries if not e.same_owner(mine)]
    applied_flat = flatten(applied, schema, status=status)
    new_set = set(applied_flat)

    merged = copy.deepcopy(live)
    merged.setdefault("metadata", {})
    owned_by_others = set().union(*(e.fields for e in others)) if others else set()
    if previous:
        for path in sorted(previous.fields - new_set, key=len, reverse=True):
            if path not in owned_by_others:
                remove_path(merged, path)
                _drop_emptied_parents(merged, path)
    body = {k: v for k, v in applied.items() if k not in ("apiVersion", "kind", "metadata")}
    if status is True:
        body = {k: v for k, v in body.items() if k == "status"}
    elif status is False:
        body.pop("status", None)
    merge(merged, body, schema)
    tracked_meta = {k: v for k, v in (applied.get("metadata") or {}).items()
                    if k in METADATA_SCHEMA["properties"]}
    merge(merged["metadata"], tracked_meta, METADATA_SCHEMA)

    live_flat = flatten(live, schema, status=status)
    merged_flat = flatten(merged, schema, status=status)
    conflicts = []
    for other in others:
        for path in sorted(other.fields & new_set):
            if live_flat.get(path, MISSING) != merged_flat.get(path, MISSING):
                conflicts.append(Conflict(other.manager, other.api_version, path, other.operation))
    if conflicts and not force:
        raise ApplyConflict(conflicts)
    for other in others:
        # Forcing takes the conflicting fields; fields with equal values stay shared.
        other.fields -= {c.path for c in conflicts if c.manager == other.manager}
    mine.fields = new_set
    entries = prune_entries([*others, mine], flatten(merged, schema))
    order = [e for e in read_entries(live) if any(e.same_owner(x) for x in entries)]
    write_entries(merged, _ordered(entries, order))
    return merged


def record_update(old: dict[str, Any] | None, new: dict[str, Any], schema: Schema, *, manager: str,
                  api_version: str, now: str, status: bool | None, subresource: str = "") -> None:
    """Give `manager` the fields an update (create, put, patch) changed, taking them from others."""
    entries = read_entries(old) if old else []
    old_flat = flatten(old, schema, status=status) if old else {}
    new_flat = flatten(new, schema, status=status)
    changed = {p for p in old_flat.keys() | new_flat.keys()
               if old_flat.get(p, MISSING) != new_flat.get(p, MISSING)}
    mine = Entry(manager, "Update", api_version, now, set(), subresource)
    existing = next((e for e in entries if e.same_owner(mine)), None)
    for e in entries:
        e.fields -= changed
    if existing:
        existing.fields |= {p for p in changed if p in new_flat}
        existing.time, existing.api_version = now, api_version
    else:
        mine.fields = {p for p in changed if p in new_flat}
        entries.append(mine)
    write_entries(new, prune_entries(entries, flatten(new, schema)))


def _ordered(entries: list[Entry], previous_order: list[Entry]) -> list[Entry]:
    def rank(e: Entry) -> int:
        for i, p in enumerate(previous_order):
            if p.same_owner(e):
                return i
        return len(previous_order)

    return sorted(entries, key=rank)
