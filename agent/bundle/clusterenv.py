"""cluster.env, read and written as istioctl does: a shell-safe scanner that reports every bad line as
`file:line: message` (never raising), istioctl's exact quoting and line format (the one writer of it,
used by agent.bundle.generate), and dropping one key while keeping every other byte. Pure.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class EnvEntry:
    key: str
    value: str
    line: int  # 1-based line where the entry starts
    span: tuple[int, int]  # character offsets of the whole line(s), newline included


_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# What a shell leaves alone outside quotes; the same set istioctl's quoting leaves unquoted.
_SAFE_UNQUOTED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_@%+=:,./-")
_DOUBLE_QUOTE_UNSAFE = frozenset('$`\\"')


def _scan_value(text: str, pos: int, line: int) -> tuple[str | None, int, int, str | None]:
    """Read one shell word at pos. Returns (value, end, end_line, problem); value None on a problem.

    Accepted: 'single quoted' (literal, may span lines), "double quoted" without $ ` \\ (so nothing
    is expanded; this is how istioctl writes a quote: '"'"'), and unquoted safe characters.
    """
    out: list[str] = []
    n = len(text)
    while pos < n:
        ch = text[pos]
        if ch == "'":
            end = text.find("'", pos + 1)
            if end < 0:
                return None, n, line, "unterminated single quote"
            chunk = text[pos + 1:end]
            out.append(chunk)
            line += chunk.count("\n")
            pos = end + 1
        elif ch == '"':
            end = text.find('"', pos + 1)
            if end < 0:
                return None, n, line, "unterminated double quote"
            chunk = text[pos + 1:end]
            bad = sorted(set(chunk) & _DOUBLE_QUOTE_UNSAFE)
            if bad:
                return None, end + 1, line, (f"{bad[0]!r} inside double quotes would be expanded by a shell; "
                                             "use single quotes")
            out.append(chunk)
            line += chunk.count("\n")
            pos = end + 1
        elif ch in _SAFE_UNQUOTED or ch == "#":  # inside a word, # is literal to a shell
            out.append(ch)
            pos += 1
        elif ch in " \t\n":
            break
        elif ch == "\r":
            return None, pos, line, "carriage return (DOS line ending); save the file with Unix line endings"
        elif ch == "$" or ch == "`":
            return None, pos, line, (f"unquoted {ch!r}: a shell would expand it (command or variable "
                                     "substitution); quote the value with single quotes")
        else:
            return None, pos, line, (f"unquoted {ch!r} is special to a shell; "
                                     "quote the value with single quotes")
    return "".join(out), pos, line, None


def _skip_line(text: str, pos: int) -> int:
    end = text.find("\n", pos)
    return len(text) if end < 0 else end + 1


def scan_cluster_env(text: str, file: str = "cluster.env") -> tuple[list[EnvEntry], list[str]]:
    """Entries in file order, and problems as `file:line: message`. Never raises."""
    entries: list[EnvEntry] = []
    problems: list[str] = []
    first_line: dict[str, int] = {}
    pos, line, n = 0, 1, len(text)
    while pos < n:
        start, start_line = pos, line
        while pos < n and text[pos] in " \t":
            pos += 1
        if pos >= n:
            break
        if text[pos] == "\n":
            pos, line = pos + 1, line + 1
            continue
        if text[pos] == "#":
            pos, line = _skip_line(text, pos), line + 1
            continue
        m = _KEY.match(text, pos)
        if text[pos] == "\r":
            problems.append(f"{file}:{line}: carriage return (DOS line ending); "
                            "save the file with Unix line endings")
            pos, line = _skip_line(text, pos), line + 1
            continue
        if not m or m.end() >= n or text[m.end()] != "=":
            shown = text[pos:_skip_line(text, pos)].rstrip("\r\n")[:60]
            problems.append(f"{file}:{line}: expected KEY='value', got {shown!r}")
            pos, line = _skip_line(text, pos), line + 1
            continue
        key = m.group(0)
        value, pos, line, problem = _scan_value(text, m.end() + 1, line)
        if problem is None:
            # Only blanks, or blanks then a comment, may follow the value.
            while pos < n and text[pos] in " \t":
                pos += 1
            if pos < n and text[pos] == "\r":
                problem = "carriage return (DOS line ending); save the file with Unix line endings"
            elif pos < n and text[pos] not in "\n#":
                problem = ("text after the value (a shell would run it as a command); "
                           "quote the whole value with single quotes")
        if problem is not None:
            problems.append(f"{file}:{line}: {key}: {problem}")
            pos = _skip_line(text, pos)
            line += 1
            continue
        pos = _skip_line(text, pos)
        line += 1
        if key in first_line:
            problems.append(f"{file}:{start_line}: {key}: duplicate key (first on line {first_line[key]})")
            continue
        first_line[key] = start_line
        assert value is not None
        entries.append(EnvEntry(key, value, start_line, (start, pos)))
    return entries, problems


# istioctl's quoting (Go, ported from a Python shellescape): its "safe" set is written in a raw string
# as `\\w`, so it means a backslash and the letter w, not word characters. Nearly every value ends up
# single-quoted (istioctl's own golden files: CA_ADDR='istiod.istio-system.svc:15012'); only values made
# of these characters alone stay bare.
_ISTIOCTL_SAFE = frozenset("\\w@%+=:,./-")


def quote_value(value: str) -> str:
    """A value quoted as istioctl does: '' when empty, bare only when every character is in its
    (accidentally tiny) safe set, else single-quoted with ' written '"'"'."""
    if not value:
        return "''"
    if all(ch in _ISTIOCTL_SAFE for ch in value):
        return value
    return "'" + value.replace("'", "'\"'\"'") + "'"


def format_cluster_env(pairs: Mapping[str, str] | list[tuple[str, str]], sort: bool = True) -> str:
    """cluster.env text in istioctl's exact format: `KEY=value` lines sorted as whole lines, each value
    quoted as istioctl does, a final newline (istioctl writes just "\\n" for an empty map)."""
    items = list(pairs.items()) if isinstance(pairs, Mapping) else list(pairs)
    lines = [f"{k}={quote_value(v)}" for k, v in items]
    if sort:
        lines.sort()
    return "\n".join(lines) + "\n"


def drop_env_key(text: str, entries: list[EnvEntry], key: str) -> str:
    """text without the line(s) holding key; every other byte kept."""
    for e in entries:
        if e.key == key:
            return text[:e.span[0]] + text[e.span[1]:]
    return text
