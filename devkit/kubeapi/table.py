"""Server-side printing: the meta.k8s.io/v1 Table kubectl asks for, with the CRDs' printer columns."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from devkit.kubeapi.openapi import parse_time
from devkit.kubeapi.resources import ResourceType

AGE = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp",
       "description": "CreationTimestamp is a timestamp representing the server time when this object was "
                      "created."}


def wants_table(accept: str) -> bool:
    return "as=Table" in accept and "g=meta.k8s.io" in accept


def _lookup(obj: Any, path: str) -> Any:
    node = obj
    for key in path.strip(".").split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def human_age(stamp: str | None, now: dt.datetime | None = None) -> str | None:
    when = parse_time(stamp) if isinstance(stamp, str) else None
    if when is None:
        return None
    seconds = int(((now or dt.datetime.now(dt.UTC)) - when).total_seconds())
    if seconds < 0:
        return "0s"
    if seconds < 120:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    return f"{hours}h" if hours < 48 else f"{hours // 24}d"


def _cell(column: dict[str, Any], obj: dict[str, Any]) -> Any:
    value = column["value"](obj) if "value" in column else _lookup(obj, column["jsonPath"])
    if column.get("type") == "date":
        return human_age(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return value


def table(rt: ResourceType, version: str, objects: list[dict[str, Any]], resource_version: str,
          include_object: str = "Metadata") -> dict[str, Any]:
    columns = list(rt.printer_columns.get(version, ())) or [AGE]
    # The name comes first, unless the type places it itself (events: a wide column at the end).
    named = any(c["name"] == "Name" for c in columns)
    definitions = [] if named else [{"name": "Name", "type": "string", "format": "name", "priority": 0,
                                     "description": "Name must be unique within a namespace."}]
    definitions += [{"name": c["name"], "type": c.get("type", "string"), "format": c.get("format", ""),
                     "description": c.get("description", ""), "priority": c.get("priority", 0)}
                    for c in columns]
    rows = []
    for obj in objects:
        cells = [_cell(c, obj) for c in columns]
        row: dict[str, Any] = {"cells": cells if named else [obj["metadata"]["name"], *cells]}
        if include_object == "Object":
            row["object"] = obj
        elif include_object != "None":
            row["object"] = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                             "metadata": obj["metadata"]}
        rows.append(row)
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": resource_version}, "columnDefinitions": definitions, "rows": rows}
