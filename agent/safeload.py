"""The one way documents from outside are parsed: JSON and YAML with a size cap, a nesting-depth cap and
a cap on the number of values, checked before the parser runs, so a hostile document gets one clear line
(LoadError) instead of a RecursionError, a memory blow-up or a NaN slipping through.

Used for every document a bundle carries (mesh.yaml, workloadgroup.yaml, kubeconfig, sidecar.yaml), the
JWT's header and claims (agent.jwtclaims), and the agent's own records read back (meta.json)."""

from __future__ import annotations

import json
import re
from typing import Any

MAX_SIZE = 1024 * 1024  # bytes; a bundle file is a few KiB
MAX_DEPTH = 64  # nesting of lists and mappings; a WorkloadGroup needs about 8
MAX_ITEMS = 100_000  # values in one document

# A JSON string (escapes included), so brackets inside strings are not counted.
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_JSON_OPEN = frozenset("[{")


class LoadError(ValueError):
    """The document is too large, too deep, has too many values, or does not parse; one line."""


def _check_size(data: str | bytes, what: str, max_size: int) -> None:
    if len(data) > max_size:
        raise LoadError(f"{what}: {len(data)} bytes, more than the limit of {max_size}")


def json_shape(text: str, what: str = "JSON", *, max_depth: int = MAX_DEPTH,
               max_items: int = MAX_ITEMS) -> None:
    """Refuse JSON nested deeper than max_depth or holding more than max_items values, by a linear scan
    (json.loads itself recurses, and a deep document ends in RecursionError)."""
    depth = items = 0
    for m in re.finditer(r"[\[\]{},]", _JSON_STRING.sub('""', text)):
        ch = m.group(0)
        if ch in _JSON_OPEN:
            depth += 1
            items += 1
            if depth > max_depth:
                raise LoadError(f"{what}: nested more than {max_depth} levels deep")
        elif ch == ",":
            items += 1
        else:
            depth -= 1
        if items > max_items:
            raise LoadError(f"{what}: more than {max_items} values")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def load_json(data: str | bytes, what: str = "JSON", *, max_size: int = MAX_SIZE, max_depth: int = MAX_DEPTH,
              max_items: int = MAX_ITEMS) -> Any:
    """Parse JSON from outside. NaN and Infinity are refused (json.loads accepts them). Raises LoadError."""
    _check_size(data, what, max_size)
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError:
        raise LoadError(f"{what}: not UTF-8") from None
    json_shape(text, what, max_depth=max_depth, max_items=max_items)
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise LoadError(f"{what}: not valid JSON: {str(exc).splitlines()[0][:200]}") from None
