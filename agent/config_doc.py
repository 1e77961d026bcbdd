"""Writes docs/configuration.md from the schema (every key, its type, default and help), so the
reference cannot drift from the code.

    python -m agent.config_doc > docs/configuration.md
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

from agent.config import Config
from agent.schema import MAX_BYTES, MAX_DEPTH, MAX_ERRORS, MAX_NODES, is_optional
from agent.units import Duration, Size, format_duration

HEADER = f"""\
# Configuration reference: /etc/mesh-agent/agent.yaml

Generated from `agent/config.py` by `python -m agent.config_doc`; do not edit by hand.

The file is one YAML document in UTF-8. Only `bundle.source` is required. Durations are written `500ms`,
`10s`, `5m`, `1h` or `1m30s`; sizes `1048576`, `512KiB`, `1MiB`. Unknown keys are errors (a misspelt key
would otherwise be silently ignored). The file is found at `--config FILE`, else `$MESH_AGENT_CONFIG`, else
`/etc/mesh-agent/agent.yaml`.

Check a file without starting anything: `mesh-agent config check FILE`. Every problem (up to {MAX_ERRORS}) is
reported, one line each, as `FILE:LINE: KEY: MESSAGE`, and the exit status is 78 (EX_CONFIG); `mesh-agent
run` does the same at start and on reload (a bad file on reload keeps the running configuration). The
systemd unit does not restart the agent on status 78. An empty file, or one holding only comments, is
reported the same way (`bundle: required key is missing`). So that no file can make the agent hang or
crash, a file larger than {MAX_BYTES // 1024 // 1024} MiB, nested deeper than {MAX_DEPTH} levels or holding more than
{MAX_NODES} keys and values is refused, and so are anchors and aliases (`&name`, `*name`), tabs in
indentation, NUL bytes and invalid UTF-8.

`configured: false` (as in the example the package ships) keeps the service from starting: the unit's
`ExecCondition` runs `mesh-agent config is-configured`. Set it to `true` once the file is filled in.
`mesh-agent config check` says so for a valid file that still has it: `ok, but configured: false: the
service will not start until it is true` (exit status 0).

A probe override (`app.probe`) uses the names of Istio's WorkloadGroup probe in snake_case
(`httpGet` -> `http_get`, `periodSeconds` -> `period`, ...).

| key | type | default | meaning |
|---|---|---|---|
"""


@dataclass(frozen=True)
class KeyDoc:
    path: str
    type: str
    default: str
    help: str


def describe(cls: type, prefix: str = "", defaults: Any = None) -> list[KeyDoc]:
    """Every key of a schema, depth first, for the configuration reference.

    `defaults` is the section's default instance, when its parent gives it other defaults than the
    class's own (registry.backoff is not sidecar.backoff)."""
    out: list[KeyDoc] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        tp = hints[f.name]
        if defaults is not None:
            default_value: Any = getattr(defaults, f.name)
        elif f.default is not dataclasses.MISSING:
            default_value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default_value = f.default_factory()
        else:
            default_value = dataclasses.MISSING
        inner = [a for a in get_args(tp) if a is not type(None)] if is_optional(tp) else [tp]
        if isinstance(inner[0], type) and dataclasses.is_dataclass(inner[0]) and get_origin(tp) not in (tuple, list):
            section = f.metadata.get("help") or (inner[0].__doc__ or "").split("\n")[0]
            out.append(KeyDoc(path, "mapping", "", section))
            nested = default_value if dataclasses.is_dataclass(default_value) else None
            out.extend(describe(inner[0], path + ".", nested))
            continue
        default = "required" if default_value is dataclasses.MISSING else _show_default(default_value)
        out.append(KeyDoc(path, _doc_type(tp), default, f.metadata.get("help", "")))
        item = get_args(tp)[0] if get_origin(tp) in (tuple, list) and get_args(tp) else None
        if isinstance(item, type) and dataclasses.is_dataclass(item) and len(dataclasses.fields(item)) > 2:
            out.extend(describe(item, path + "[]."))  # each element's keys (not for pairs like headers)
    return out


def _doc_type(tp: Any) -> str:
    if is_optional(tp):
        return _doc_type(next(a for a in get_args(tp) if a is not type(None))) + " or null"
    if get_origin(tp) is Literal:
        return " \\| ".join(f"`{a}`" for a in get_args(tp))
    if get_origin(tp) in (tuple, list):
        (item,) = get_args(tp)[:1]
        return f"list of {_doc_type(item)}"
    if get_origin(tp) is dict:
        return "mapping of strings"
    return {Duration: "duration", Size: "size", bool: "boolean", int: "integer", float: "number",
            str: "string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _show_default(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Duration):
        return format_duration(value)
    if isinstance(value, Size):
        return f"{value // 1024**2}MiB" if value % 1024**2 == 0 else str(int(value))
    if isinstance(value, (tuple, list)):
        return "[]" if not value else str(list(value))
    if isinstance(value, dict):
        return "{}" if not value else str(value)
    if value == "":
        return '""'
    if dataclasses.is_dataclass(value):
        return ""
    return str(value)


def render() -> str:
    rows = []
    for k in describe(Config):
        default = f"`{k.default}`" if k.default not in ("", "required") else k.default
        rows.append(f"| `{k.path}` | {k.type} | {default} | {k.help} |")
    return HEADER + "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(render(), end="")
