"""The one way documents from outside are parsed: JSON and YAML with a size cap, a nesting-depth cap and
a cap on the number of values, checked before the parser runs, so a hostile document gets one clear line
(LoadError) instead of a RecursionError, a memory blow-up or a NaN slipping through.

Used for every document a bundle carries (mesh.yaml, workloadgroup.yaml, kubeconfig, sidecar.yaml), the
JWT's header and claims (agent.jwtclaims), and the mesh configuration read from the cluster.

YAML is checked in two steps, because PyYAML's pure-Python scanner is quadratic in the flow nesting (20,000
brackets take minutes) and its composer and constructor recurse (a deep document ends in RecursionError):
first a line scan bounds the nesting (block indentation, compact `- - ` items and flow brackets outside
quotes and comments), which keeps the worst out of every parser; then libyaml's events (fast, and not
recursive) give the exact depth and count and refuse anchors and aliases; only then is the document
built."""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

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


# What makes one more level on a line: a run of compact block entries ("- - - a", "? ").
_COMPACT = re.compile(r"(?:[-?](?: +|$))+")
# Quoted scalars and comments on a line (brackets inside them do not nest), and the brackets themselves.
_FLOW_TOKENS = re.compile(r"""'(?:[^']|'')*'|"(?:[^"\\]|\\.)*"|(?:^|(?<=\s))#.*|[\[\]{}]""")
# A literal or folded block scalar's header at the end of a line: `key: |`, `- >-`, `|2 # comment`.
_BLOCK_SCALAR = re.compile(r"(?:^|[\s])[|>][-+0-9]*\s*(?:#.*)?$")
_EVENTS_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: fast events


def _line(event: yaml.Event) -> int:
    """The 1-based line an event starts on (the parser marks every event)."""
    return event.start_mark.line + 1 if event.start_mark else 1


def yaml_shape(text: str, what: str = "YAML", *, max_depth: int = MAX_DEPTH) -> None:
    """Refuse YAML nested deeper than max_depth, by a linear scan of its lines (no parser involved)."""
    block: list[int] = []  # indentation of the open block collections
    flow = 0
    scalar = -1  # inside a literal or folded scalar started at this indentation: its lines are text
    for lineno, line in enumerate(text.split("\n"), 1):
        body = line.lstrip(" ")
        indent = len(line) - len(body)
        if scalar >= 0:
            if not body.strip() or indent > scalar:
                continue
            scalar = -1
        if flow == 0 and body and not body.startswith("#"):
            if _BLOCK_SCALAR.search(body):
                scalar = indent
            while block and block[-1] >= indent:
                block.pop()
            block.append(indent)
            compact = _COMPACT.match(body)
            extra = len(compact.group(0).split()) if compact else 0
            if len(block) + extra > max_depth:
                raise LoadError(f"{what}:{lineno}: nested more than {max_depth} levels deep")
        if "[" in line or "{" in line or flow:
            for m in _FLOW_TOKENS.finditer(line):
                tok = m.group(0)
                if tok in ("[", "{"):
                    flow += 1
                    if len(block) + flow > max_depth:
                        raise LoadError(f"{what}:{lineno}: nested more than {max_depth} levels deep")
                elif tok in ("]", "}"):
                    flow = max(0, flow - 1)


def _yaml_problem(exc: yaml.YAMLError, what: str) -> LoadError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{what}:{mark.line + 1}" if mark else what
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]  # a ReaderError has no problem
    return LoadError(f"{where}: not valid YAML: {problem}")


def load_yaml(data: str | bytes, what: str = "YAML", *, max_size: int = MAX_SIZE, max_depth: int = MAX_DEPTH,
              max_items: int = MAX_ITEMS) -> Any:
    """Parse one YAML document from outside (yaml.safe_load semantics). Raises LoadError, whose message
    is `what:line: problem` when the line is known."""
    _check_size(data, what, max_size)
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError:
        raise LoadError(f"{what}: not UTF-8") from None
    yaml_shape(text, what, max_depth=max_depth)
    try:
        items = depth = 0
        for event in yaml.parse(text, Loader=_EVENTS_LOADER):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise LoadError(f"{what}:{_line(event)}: anchors and aliases (&, *) are not "
                                "allowed; write the values out")
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > max_depth:  # the exact count, where the line scan was fooled
                    raise LoadError(f"{what}:{_line(event)}: nested more than {max_depth} "
                                    "levels deep")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
            if isinstance(event, yaml.NodeEvent):
                items += 1
                if items > max_items:
                    raise LoadError(f"{what}: more than {max_items} values")
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _yaml_problem(exc, what) from None
    except RecursionError:  # not reachable after the depth scan; kept so nothing escapes as a traceback
        raise LoadError(f"{what}: nested too deeply") from None
