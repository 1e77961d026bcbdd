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


def label_selector(text: str | None) -> Predicate:
    if not text:
        return lambda obj: True
    preds: list[Callable[[dict[str, str]], bool]] = []
    for part in _split(text):
        m = _REQ.match(part)
        if not m:
            raise SelectorError(f"unable to parse requirement: {part!r}")
        key, op, val, neg = m["key"], (m["op"] or "").strip(), m["val"], m["neg"]
        if neg:
            if op:
                raise SelectorError(f"unable to parse requirement: {part!r}")
            preds.append(lambda labels, k=key: k not in labels)
        elif not op:
            preds.append(lambda labels, k=key: k in labels)
        elif op in ("=", "=="):
            preds.append(lambda labels, k=key, v=val: labels.get(k) == v)
        elif op == "!=":
            preds.append(lambda labels, k=key, v=val: labels.get(k) != v)
        else:
            if not val or not val.startswith("("):
                raise SelectorError(f"unable to parse requirement: {part!r}")
            values = {v.strip() for v in val[1:-1].split(",") if v.strip()}
            if op == "in":
                preds.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                preds.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
    return lambda obj: all(p(obj.get("metadata", {}).get("labels") or {}) for p in preds)


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

        def get(obj: dict[str, Any], path: str = field) -> Any:
            node: Any = obj
            for key in path.split("."):
                node = node.get(key) if isinstance(node, dict) else None
            return "" if node is None else str(node)

        if op == "!=":
            preds.append(lambda obj, g=get, v=value: g(obj) != v)
        else:
            preds.append(lambda obj, g=get, v=value: g(obj) == v)
    return lambda obj: all(p(obj) for p in preds)
