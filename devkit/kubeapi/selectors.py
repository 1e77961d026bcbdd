"""Label and field selectors, with the syntax the API server accepts."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

Predicate = Callable[[dict[str, Any]], bool]

_REQ = re.compile(
    r"^\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9_./-]+)\s*"
    r"(?:(?P<op>==|=|!=|\s+in\s+|\s+notin\s+)\s*(?P<val>\([^)]*\)|[A-Za-z0-9_.-]*))?\s*$")


class SelectorError(ValueError):
    pass


def _split(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return parts


def _requirement(part: str) -> Callable[[dict[str, str]], bool]:
    """One requirement of a label selector, as a test of an object's labels."""
    m = _REQ.match(part)
    if not m:
        raise SelectorError(f"unable to parse requirement: {part!r}")
    key, op, val, neg = m["key"], (m["op"] or "").strip(), m["val"], m["neg"]
    if neg:
        if op:
            raise SelectorError(f"unable to parse requirement: {part!r}")
        return lambda labels: key not in labels
    if not op:
        return lambda labels: key in labels
    if op in ("=", "=="):
        return lambda labels: labels.get(key) == val
    if op == "!=":
        return lambda labels: labels.get(key) != val
    if not val or not val.startswith("("):
        raise SelectorError(f"unable to parse requirement: {part!r}")
    values = {v.strip() for v in val[1:-1].split(",") if v.strip()}
    if op == "in":
        return lambda labels: labels.get(key) in values
    return lambda labels: labels.get(key) not in values


def label_selector(text: str | None) -> Predicate:
    if not text:
        return lambda obj: True
    preds = [_requirement(part) for part in _split(text)]
    return lambda obj: all(p(obj.get("metadata", {}).get("labels") or {}) for p in preds)


def _field_requirement(path: str, op: str, value: str) -> Predicate:
    """One requirement of a field selector: the field at a dotted path compared with a value."""
    def get(obj: dict[str, Any]) -> str:
        node: Any = obj
        for key in path.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        return "" if node is None else str(node)

    if op == "!=":
        return lambda obj: get(obj) != value
    return lambda obj: get(obj) == value


def field_selector(text: str | None, supported: tuple[str, ...] = ("metadata.name", "metadata.namespace")
                   ) -> Predicate:
    if not text:
        return lambda obj: True
    preds: list[Predicate] = []
    for part in text.split(","):
        m = re.match(r"^\s*([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*?)\s*$", part)
        if not m:
            raise SelectorError(f"invalid selector: {part!r}")
        field, op, value = m.groups()
        if field not in supported:
            raise SelectorError(f'field label not supported: {field}')
        preds.append(_field_requirement(field, op, value))
    return lambda obj: all(p(obj) for p in preds)
