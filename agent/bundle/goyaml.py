"""YAML and JSON text as istioctl's Go libraries write them, so a generated bundle matches byte for byte.

istioctl writes mesh.yaml with sigs.k8s.io/yaml (go-yaml v2 underneath) and builds JSON values with
Go's encoding/json. Their choices differ from PyYAML's and Python's json in small, visible ways:

- mapping keys are sorted in go-yaml's "natural" order: at the first differing character a letter
  sorts after a non-letter, and runs of digits compare as numbers (so `ISTIO_META_X` comes before
  `ISTIO_METAJSON_LABELS`, where a byte sort puts it after);
- a string that would read back as another type (`"true"`, `"8080"`, `""`) is double-quoted, not
  single-quoted; a string with a newline is a literal block; lines are never wrapped;
- numbers went through JSON as float64: integral values print as integers, others in Go's shortest
  %g form (`1e-05`, `1.5e+06`);
- encoding/json escapes `<`, `>`, `&`, U+2028 and U+2029 and keeps other non-ASCII text as is.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from decimal import Decimal
from typing import Any

import yaml

_NULLS = {"", "~", "null", "Null", "NULL"}
_BOOLS = {"y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "true", "True", "TRUE",
          "false", "False", "FALSE", "on", "On", "ON", "off", "Off", "OFF"}
_SPECIAL_FLOATS = {".nan", ".NaN", ".NAN", ".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF",
                   "-.inf", "-.Inf", "-.INF"}
_INT = re.compile(r"^[-+]?(0[bB][01_]+|0[oO][0-7_]+|0[xX][0-9a-fA-F_]+|[0-9][0-9_]*)$")
_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")
_BASE60 = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")
_DATE = re.compile(r"^[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}([Tt ].*)?$")


def reads_as_non_string(s: str) -> bool:
    """True when go-yaml v2 would read this plain scalar as null, bool, number, timestamp or merge key."""
    if s in _NULLS or s in _BOOLS or s in _SPECIAL_FLOATS or s == "<<":
        return True
    return bool(_INT.match(s) or _FLOAT.match(s) or _BASE60.match(s) or _DATE.match(s))


def _is_letter(ch: str) -> bool:
    return unicodedata.category(ch).startswith("L")


def _digit_run(s: str, i: int) -> tuple[int, int]:
    """(value, end) of the run of decimal digits starting at i."""
    value, end = 0, i
    while end < len(s) and s[end].isdecimal():
        value = value * 10 + int(s[end])
        end += 1
    return value, end


def natural_less(a: str, b: str) -> bool:
    """go-yaml v2's ordering of two string keys."""
    for i in range(min(len(a), len(b))):
        ca, cb = a[i], b[i]
        if ca == cb:
            continue
        la, lb = _is_letter(ca), _is_letter(cb)
        if la and lb:
            return ca < cb
        if la or lb:
            return lb
        an, ai = _digit_run(a, i)
        bn, bi = _digit_run(b, i)
        if ca == "0" or cb == "0":
            # A zero inside a longer number (like the 0 of "10"): compare as if a digit precedes it.
            j = i - 1
            while j >= 0 and a[j].isdecimal():
                if a[j] != "0":
                    an, _ = _digit_run("1" + a[i:], 0)
                    bn, _ = _digit_run("1" + b[i:], 0)
                    break
                j -= 1
        if an != bn:
            return an < bn
        if ai != bi:
            return ai < bi
        return ca < cb
    return len(a) < len(b)


def sorted_keys(keys: Any) -> list[str]:
    import functools

    def compare(x: str, y: str) -> int:
        return -1 if natural_less(x, y) else (1 if natural_less(y, x) else 0)

    return sorted(keys, key=functools.cmp_to_key(compare))


def format_float(f: float) -> str:
    """A number as it comes out of JSON (float64) and go-yaml: integers plain, else Go's %g."""
    if math.isnan(f):
        return ".nan"
    if math.isinf(f):
        return ".inf" if f > 0 else "-.inf"
    if f == int(f) and abs(f) < 1e21:
        return str(int(f))
    sign, digits, exponent = Decimal(repr(f)).as_tuple()
    text = "".join(str(d) for d in digits).rstrip("0") or "0"
    exp = len(digits) + int(exponent) - 1  # exponent of the first significant digit
    if exp < -4 or exp >= 6:
        mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
        out = f"{mantissa}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    elif exp < 0:
        out = "0." + "0" * (-exp - 1) + text
    else:
        whole = text[:exp + 1].ljust(exp + 1, "0")
        frac = text[exp + 1:]
        out = whole + ("." + frac if frac else "")
    return ("-" if sign else "") + out


class _GoDumper(yaml.SafeDumper):
    """PyYAML's emitter (a port of the same libyaml emitter go-yaml uses) with go-yaml's tag rules."""

    def resolve(self, kind: Any, value: Any, implicit: Any) -> str:
        if kind is yaml.ScalarNode and implicit[0]:
            if not reads_as_non_string(value):
                return "tag:yaml.org,2002:str"
            return "tag:yaml.org,2002:null" if value in _NULLS else "tag:yaml.org,2002:bool"
        return super().resolve(kind, value, implicit)


_STR, _MAP, _SEQ = "tag:yaml.org,2002:str", "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"


def _node(obj: Any) -> yaml.Node:
    if isinstance(obj, dict):
        items = [(yaml.ScalarNode(_STR, k, style=_key_style(k)), _node(obj[k]))
                 for k in sorted_keys([str(k) for k in obj])]
        return yaml.MappingNode(_MAP, items, flow_style=not items)
    if isinstance(obj, (list, tuple)):
        return yaml.SequenceNode(_SEQ, [_node(x) for x in obj], flow_style=not obj)
    if obj is None:
        return yaml.ScalarNode("tag:yaml.org,2002:null", "null")
    if isinstance(obj, bool):
        return yaml.ScalarNode("tag:yaml.org,2002:bool", "true" if obj else "false")
    if isinstance(obj, (int, float)):
        text = format_float(float(obj)) if isinstance(obj, float) else str(obj)
        return yaml.ScalarNode("tag:yaml.org,2002:bool", text)  # any non-str tag the resolver agrees on
    s = str(obj)
    return yaml.ScalarNode(_STR, s, style=_str_style(s))


def _str_style(s: str) -> str | None:
    if "\n" in s:
        return "|"
    if reads_as_non_string(s):
        return '"'
    return None  # plain when the emitter allows it, else it falls back to quotes as go-yaml's does


def _key_style(s: str) -> str | None:
    return '"' if reads_as_non_string(s) else None


def dump(obj: Any) -> str:
    """YAML text of plain data (dicts, lists, strings, numbers, bools, None) as sigs.k8s.io/yaml writes it."""
    return yaml.serialize(_node(obj), Dumper=_GoDumper, indent=2,
                          width=2**31 - 1, allow_unicode=True)


def go_json(obj: Any) -> str:
    """Compact JSON as Go's json.Marshal writes it (map keys sorted by bytes, HTML-safe escapes)."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text
