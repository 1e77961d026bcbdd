"""Durations and sizes as agent.yaml writes them (`1m30s`, `512KiB`), and back."""

from __future__ import annotations

import re


class Duration(float):
    """Seconds, written in YAML as `500ms`, `10s`, `5m`, `1h` or `1m30s`."""


class Size(int):
    """Bytes, written in YAML as `1048576`, `512KiB`, `1MiB` or `2GiB`."""


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3,
               "KB": 1000, "MB": 1000**2, "GB": 1000**3}


def parse_duration(text: str) -> float:
    """`1m30s` -> 90.0. Raises ValueError for anything else."""
    text = text.strip()
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos == 0 or pos != len(text):
        raise ValueError(text)
    return total


def format_duration(seconds: float) -> str:
    if seconds and seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return f"{seconds:g}s"


def parse_size(text: str) -> int:
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(text)
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


def duration(text: str) -> Duration:
    """A Duration written as in agent.yaml, for the schema's defaults."""
    return Duration(parse_duration(text))
