"""Typed loading of YAML into frozen dataclasses, with errors that name file, line and key.

The configuration schema (config.py) is plain dataclasses; this module walks the YAML node tree
(yaml.compose keeps line numbers, yaml.safe_load does not) against the dataclass annotations and
collects every error in the file instead of stopping at the first.

Whatever the input, the only exception that leaves `decode`, `compose` and `Loader.load` is
SchemaErrors: the file's size, its nesting and its aliases are capped before they can cost time,
memory or the interpreter's stack.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from agent.units import Duration, Size, format_duration, parse_duration, parse_size

# Far above any real agent.yaml (the commented example is under 6 KiB); bounds the memory a wrong file,
# e.g. a log given by mistake, can cost.
MAX_BYTES = 1024 * 1024
# The schema nests 7 levels deep (app.probe.http_get.http_headers[0].name); the cap keeps a hostile
# file far from Python's recursion limit.
MAX_DEPTH = 32
# Keys and values; a file setting every key has about 250. Composing costs some 25 µs per node, so
# this, not the size, bounds the time (a quarter second) a wrong file can cost.
MAX_NODES = 10_000
# Past this many problems the file is not agent.yaml at all; listing more helps no one.
MAX_ERRORS = 100
_MAX_SHOWN = 60  # characters of a value quoted in a message

# Characters that would split a message over lines (str.splitlines() breaks at all of these) or
# garble a terminal; they are shown escaped so that each problem stays one line.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(text: str) -> str:
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


@dataclass(frozen=True)
class SchemaError:
    file: str
    line: int  # 1-based; 0 when there is no line (the file cannot be read)
    path: str  # dotted key path, "" for the document
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        text = f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"
        return _escape(text)


class SchemaErrors(Exception):
    def __init__(self, errors: list[SchemaError]) -> None:
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = errors


# A check run on a loaded dataclass; returns (key, message) pairs for problems between fields.
Check = Callable[[Any], list[tuple[str, str]]]


def _type_name(tp: Any) -> str:
    if tp is Duration:
        return 'a duration like "40s"'
    if tp is Size:
        return 'a size like "1MiB"'
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(tp))
    if origin in (tuple, list):
        return "a list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    return str(tp)


def _short(text: str) -> str:
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN - 3] + "..."


def _shown(node: yaml.Node) -> str:
    if isinstance(node, yaml.ScalarNode):
        return f'"{_short(node.value)}"'
    return "a list" if isinstance(node, yaml.SequenceNode) else "a mapping"


def _line_at(text: str, pos: int) -> int:
    """1-based line of text[pos], counting line breaks as YAML does."""
    return len(re.findall(r"\r\n|[\r\n\x85\u2028\u2029]", text[:pos])) + 1


def decode(data: bytes, file: str) -> str:
    """The text of a YAML file's bytes; SchemaErrors when it is too large or not UTF-8."""
    if len(data) > MAX_BYTES:
        raise SchemaErrors([SchemaError(file, 1, "", f"larger than {MAX_BYTES // 1024 // 1024} MiB: "
                                                     "not a configuration file")])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = len(re.findall(rb"\r\n|[\r\n]", data[:exc.start])) + 1
        raise SchemaErrors([SchemaError(file, line, "", f"not UTF-8 text (byte 0x{data[exc.start]:02x} "
                                                        f"at offset {exc.start})")]) from None


class _Refused(yaml.MarkedYAMLError):
    """Valid YAML that a configuration file may not use."""


class _Composer(yaml.SafeLoader):
    """yaml.compose's loader, with nesting capped and anchors and aliases refused.

    An alias makes the node tree a graph: a few lines can expand to billions of nodes, or to a
    cycle. A configuration has no need for them."""

    depth = 0
    nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused(problem="anchors (&name) and aliases (*name) are not supported: "
                           "write the value out", problem_mark=event.start_mark)
        if self.depth >= MAX_DEPTH:
            raise _Refused(problem=f"nested deeper than {MAX_DEPTH} levels", problem_mark=event.start_mark)
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _Refused(problem=f"more than {MAX_NODES} keys and values: not a configuration file",
                           problem_mark=event.start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def compose(text: str, file: str) -> yaml.Node | None:
    """The node tree of a single YAML document (None when there is none); SchemaErrors naming the
    line of anything that is not one plain YAML document."""

    def fail(line: int, message: str) -> SchemaErrors:
        return SchemaErrors([SchemaError(file, max(line, 1), "", message)])

    if len(text) > MAX_BYTES:
        raise fail(1, f"larger than {MAX_BYTES // 1024 // 1024} MiB: not a configuration file")
    nul = text.find("\0")
    if nul >= 0:  # YAML would refuse it too, but this says what it means
        raise fail(_line_at(text, nul), "NUL byte: not a text file")
    loader = None
    try:
        loader = _Composer(text)  # its reader checks every character at once
        return loader.get_single_node()
    except _Refused as exc:
        raise fail(exc.problem_mark.line + 1 if exc.problem_mark else 1, str(exc.problem)) from None
    except yaml.composer.ComposerError as exc:
        if exc.context == "expected a single document in the stream":
            mark = exc.problem_mark
            raise fail(mark.line + 1 if mark else 1, "a second YAML document: the file must hold one") from None
        raise fail(*_syntax_error(exc)) from None
    except yaml.reader.ReaderError as exc:
        raise fail(_line_at(text, exc.position), f"character U+{exc.character:04X} is not allowed "
                   "in YAML") from None
    except yaml.YAMLError as exc:
        raise fail(*_syntax_error(exc)) from None
    except RecursionError:  # not reached through compose_node's cap; a second fence
        raise fail(1, "nested too deep") from None
    finally:
        if loader is not None:
            loader.dispose()


def _syntax_error(exc: yaml.YAMLError) -> tuple[int, str]:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc)
    if "\\t" in problem:
        problem += " (indent with spaces: YAML does not allow tabs there)"
    return (mark.line + 1 if mark else 1), f"YAML syntax error: {problem}"


class _TooMany(Exception):
    pass


class Loader:
    """Converts one YAML document into a dataclass instance, collecting errors."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.errors: list[SchemaError] = []

    def error(self, node: yaml.Node | None, path: str, message: str) -> None:
        mark = node.start_mark if node is not None else None
        line = mark.line + 1 if mark is not None else 1
        if len(self.errors) >= MAX_ERRORS:
            self.errors.sort(key=lambda e: e.line)
            self.errors.append(SchemaError(self.file, line, "", f"stopped after {MAX_ERRORS} problems"))
            raise _TooMany
        self.errors.append(SchemaError(self.file, line, path, message))

    def load(self, text: str, cls: type) -> Any:
        node = compose(text, self.file)
        if node is None or _is_null(node):  # empty, only comments, or `---`: all defaults
            node = yaml.MappingNode("tag:yaml.org,2002:map", [], yaml.Mark(self.file, 0, 0, 0, None, 0))
        try:
            value = self.convert(node, cls, "")
        except _TooMany:
            raise SchemaErrors(self.errors) from None  # already sorted, the last line saying so
        except RecursionError:  # compose() caps nesting far below the limit; a second fence
            self.errors.append(SchemaError(self.file, 1, "", "nested too deep"))
        if self.errors:
            self.errors.sort(key=lambda e: e.line)
            raise SchemaErrors(self.errors)
        return value

    def convert(self, node: yaml.Node, tp: Any, path: str) -> Any:
        origin = get_origin(tp)
        if origin in (Union, types.UnionType):
            inner = [a for a in get_args(tp) if a is not type(None)]
            if _is_null(node):
                return None
            return self.convert(node, inner[0], path)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            return self.dataclass(node, tp, path)
        if origin in (tuple, list):
            if not isinstance(node, yaml.SequenceNode):
                return self.mismatch(node, tp, path)
            (item,) = get_args(tp)[:1]
            return tuple(self.convert(n, item, f"{path}[{i}]") for i, n in enumerate(node.value))
        if origin is dict:
            if not isinstance(node, yaml.MappingNode):
                return self.mismatch(node, tp, path)
            _, val_tp = get_args(tp)
            out: dict[str, Any] = {}
            for k, v in node.value:
                if not isinstance(k, yaml.ScalarNode):
                    self.error(k, path, f"keys must be strings, got {_shown(k)}")
                    continue
                key = str(k.value)
                if key in out:
                    self.error(k, f"{path}.{_short(key)}", "duplicate key")
                out[key] = self.convert(v, val_tp, f"{path}.{_short(key)}")
            return out
        if not isinstance(node, yaml.ScalarNode):
            return self.mismatch(node, tp, path)
        return self.scalar(node, tp, path)

    def mismatch(self, node: yaml.Node, tp: Any, path: str) -> Any:
        self.error(node, path, f"expected {_type_name(tp)}, got {_shown(node)}")
        return None

    def scalar(self, node: yaml.ScalarNode, tp: Any, path: str) -> Any:
        tag, text = node.tag, node.value
        plain = tag == "tag:yaml.org,2002:str"
        try:
            if get_origin(tp) is Literal:
                if text not in get_args(tp):
                    raise ValueError
                return text
            if tp is Duration:
                if not plain:
                    raise ValueError
                return Duration(parse_duration(text))
            if tp is Size:
                return Size(parse_size(text))
            if tp is bool:
                if tag != "tag:yaml.org,2002:bool":
                    raise ValueError
                return text.lower() in ("true", "yes", "on")
            if tp is int:
                if tag != "tag:yaml.org,2002:int":
                    raise ValueError
                return int(text, 0)
            if tp is float:
                if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
                    raise ValueError
                return float(text)
            if tp is str:
                # Numbers and booleans where a string is expected are almost always a mistake
                # (`version: 1.10` silently becomes 1.1): ask for quotes.
                if tag not in ("tag:yaml.org,2002:str",):
                    raise ValueError
                return text
        except ValueError:
            return self.mismatch(node, tp, path)
        raise TypeError(f"unsupported schema type {tp!r}")

    def dataclass(self, node: yaml.Node, cls: type, path: str) -> Any:
        if not isinstance(node, yaml.MappingNode):
            return self.mismatch(node, cls, path)
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        errors_before = len(self.errors)
        values: dict[str, Any] = {}
        key_nodes: dict[str, yaml.Node] = {}
        for knode, vnode in node.value:
            if not isinstance(knode, yaml.ScalarNode):
                self.error(knode, path, f"keys must be strings, got {_shown(knode)}")
                continue
            key = str(knode.value)
            name = _short(key) or '""'
            sub = f"{path}.{name}" if path else name
            if key in key_nodes:
                self.error(knode, sub, "duplicate key")
                continue
            key_nodes[key] = knode
            if key not in fields:
                hint = _close_match(key, fields)
                self.error(knode, sub, "unknown key" + (f' (did you mean "{hint}"?)' if hint else ""))
                continue
            tp = hints[key]
            if _is_null(vnode) and not is_optional(tp):
                if dataclasses.is_dataclass(tp) or get_origin(tp) in (dict, tuple, list):
                    # `app:` with everything below commented out means "all defaults".
                    vnode = yaml.MappingNode("tag:yaml.org,2002:map", [], vnode.start_mark) \
                        if get_origin(tp) not in (tuple, list) else \
                        yaml.SequenceNode("tag:yaml.org,2002:seq", [], vnode.start_mark)
                else:
                    self.error(vnode, sub, f"expected {_type_name(tp)}, got null")
                    continue
            value = self.convert(vnode, tp, sub)
            if value is None and not is_optional(tp):
                continue  # the conversion reported it
            if value is not None:
                self.bounds(vnode, sub, fields[key], value)
            values[key] = value
        for name, f in fields.items():
            if name not in values and f.default is dataclasses.MISSING and \
                    f.default_factory is dataclasses.MISSING and name not in key_nodes:
                sub = f"{path}.{name}" if path else name
                self.error(node, sub, "required key is missing")
        try:
            obj = cls(**values)
        except TypeError:
            return None  # missing required values: already reported
        if len(self.errors) > errors_before:
            return obj  # cross-field checks on half-read values would only add noise
        for key, message in getattr(cls, "checks", lambda _o: [])(obj):
            sub = f"{path}.{key}" if path else key
            self.error(_node_at(node, key), sub, message)
        return obj

    def bounds(self, node: yaml.Node, path: str, f: dataclasses.Field, value: Any) -> None:
        """A field's min and max; on a list, they bound each element, and every bad one is named."""
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        if lo is None and hi is None:
            return
        if isinstance(value, tuple) and isinstance(node, yaml.SequenceNode):
            for i, (item, item_node) in enumerate(zip(value, node.value, strict=True)):
                if item is not None:
                    self.bound(item_node, f"{path}[{i}]", lo, hi, item)
            return
        self.bound(node, path, lo, hi, value)

    def bound(self, node: yaml.Node, path: str, lo: Any, hi: Any, value: Any) -> None:
        if lo is not None and value < lo:
            shown = format_duration(lo) if isinstance(value, Duration) else lo
            self.error(node, path, f"must be at least {shown}, got {_shown(node)}")
        if hi is not None and value > hi:
            shown = format_duration(hi) if isinstance(value, Duration) else hi
            self.error(node, path, f"must be at most {shown}, got {_shown(node)}")


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def is_optional(tp: Any) -> bool:
    """`X | None`."""
    return get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp)


def _close_match(key: str, fields: dict[str, Any]) -> str | None:
    found = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.75)
    return found[0] if found else None


def field(default: Any = dataclasses.MISSING, *, help: str = "", min: Any = None, max: Any = None,
          factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with a help text and bounds the loader enforces."""
    meta = {"help": help, "min": min, "max": max}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _node_at(node: yaml.Node, key: str) -> yaml.Node:
    """The node a check's key (`registry.group`, `apps[1].ports`) names, as deep as the file has it, so
    the error's line is that key's; a key the file does not have is reported at its parent's key."""
    import re

    found, at = node, node
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", key):
        if part.startswith("[") and isinstance(found, yaml.SequenceNode) and int(part[1:-1]) < len(found.value):
            found = at = found.value[int(part[1:-1])]
        elif isinstance(found, yaml.MappingNode) and not part.startswith("["):
            match = next(((k, v) for k, v in found.value if isinstance(k, yaml.ScalarNode) and k.value == part), None)
            if match is None:
                break
            at, found = match
        else:
            break
    return at
