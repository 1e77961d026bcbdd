"""Hosts: the bundle's `hosts` file (address and names per line), and the block of those lines the agent
keeps in /etc/hosts between its two marker lines.

The block is found by one pure rule, `split_block`, used by the installer, `mesh-agent deprovision` and
(in shell) the package's postrm on purge: a marker is a whole line equal to HOSTS_BEGIN or HOSTS_END,
optionally followed by a carriage return; lines end at "\n" only. A block is one HOSTS_BEGIN followed
later by one HOSTS_END. Any other count or order of markers (two blocks, a missing end marker, an end
before the begin) is damaged: nothing is edited, as removing "up to the end of the file" could delete an
admin's own lines. Everything outside the block is kept byte for byte.

/etc/hosts is not replaced but edited: when it is a bind mount (systemd's ReadWritePaths=/etc/hosts),
rename fails with EBUSY and it is rewritten in place.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from agent.fsutil import UnsafePathError, atomic_write

log = logging.getLogger("agent.bundle.hosts")

HOSTS_BEGIN = "# BEGIN mesh-agent: istiod address from the mesh bundle (managed; edits are replaced)"
HOSTS_END = "# END mesh-agent"


# --- the bundle's hosts file ----------------------------------------------------------------------

@dataclass(frozen=True)
class HostLine:
    address: str
    names: tuple[str, ...]

    def __str__(self) -> str:
        return " ".join((self.address, *self.names))


_LABEL = r"[A-Za-z0-9_][A-Za-z0-9_-]{0,62}"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?")


def scan_hosts(text: str, file: str = "hosts") -> tuple[list[HostLine], list[str]]:
    out: list[HostLine] = []
    problems: list[str] = []
    for i, raw in enumerate(text.split("\n"), 1):
        if raw.endswith("\r"):
            problems.append(f"{file}:{i}: carriage return (DOS line ending)")
            continue
        body = raw.split("#", 1)[0].strip()
        if not body:
            continue
        parts = body.split()
        if len(parts) < 2:
            problems.append(f"{file}:{i}: expected '<address> <hostname>', got {body!r}")
            continue
        try:
            ipaddress.ip_address(parts[0])
        except ValueError:
            problems.append(f"{file}:{i}: {parts[0]!r} is not an IPv4 or IPv6 address")
            continue
        bad = [h for h in parts[1:] if not _HOSTNAME.fullmatch(h)]
        if bad:
            problems.append(f"{file}:{i}: {bad[0]!r} is not a valid hostname")
            continue
        out.append(HostLine(parts[0], tuple(parts[1:])))
    return out, problems


# --- the managed block in /etc/hosts ---------------------------------------------------------------

class DamagedBlock(ValueError):
    """The marker lines of the managed block are damaged; the file is left as it is."""


@dataclass(frozen=True)
class Split:
    """A hosts file cut around the managed block: before + block + after is the file."""
    before: bytes
    block: tuple[str, ...] | None  # the lines inside (no line ends), None when there is no block
    after: bytes


def _rows(data: bytes) -> list[bytes]:
    """Lines with their "\n" kept; a last line without one is a line too (as sh, awk and sed see it)."""
    rows = [r + b"\n" for r in data.split(b"\n")]
    rows[-1] = rows[-1][:-1]
    return rows if rows[-1] else rows[:-1]


def _is(row: bytes, marker: bytes) -> bool:
    row = row[:-1] if row.endswith(b"\n") else row
    return row == marker or row == marker + b"\r"


def split_block(data: bytes) -> Split:
    """The one rule for finding the block (see the module's docstring). Raises DamagedBlock."""
    rows = _rows(data)
    begin, end = HOSTS_BEGIN.encode(), HOSTS_END.encode()
    begins = [i for i, r in enumerate(rows) if _is(r, begin)]
    ends = [i for i, r in enumerate(rows) if _is(r, end)]
    if not begins and not ends:
        return Split(data, None, b"")
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        where = ", ".join(f"{what} on line {i + 1}" for i, what in sorted(
            [(i, "begin") for i in begins] + [(i, "end") for i in ends]))
        raise DamagedBlock(f"the mesh-agent marker lines are damaged ({where})")
    b, e = begins[0], ends[0]
    inside = tuple(r.decode("latin-1").rstrip("\n").removesuffix("\r") for r in rows[b + 1:e])
    return Split(b"".join(rows[:b]), inside, b"".join(rows[e + 1:]))


def strip_block(data: bytes) -> tuple[bytes, bool]:
    """data without the block (its markers included), and whether there was one. Raises DamagedBlock."""
    split = split_block(data)
    return split.before + split.after, split.block is not None


def with_block(data: bytes, lines: Iterable[str]) -> bytes:
    """data with the block set to lines (removed when there are none), at its place or appended.
    Raises DamagedBlock."""
    split = split_block(data)
    lines = list(lines)
    block = "".join([HOSTS_BEGIN + "\n", *(ln + "\n" for ln in lines), HOSTS_END + "\n"]).encode() \
        if lines else b""
    before = split.before
    if split.block is None and block and before and not before.endswith(b"\n"):
        before += b"\n"
    return before + block + split.after


def block_lines(data: bytes) -> list[str] | None:
    """The lines inside the block; None when there is none or it is damaged."""
    try:
        inside = split_block(data).block
    except DamagedBlock:
        return None
    return None if inside is None else list(inside)


def shadowing_lines(current: bytes, lines: Iterable[str]) -> list[str]:
    """Lines outside our block that name one of our hosts with another address. The resolver takes the
    first match, so such a line (often left by the manual `cat hosts >> /etc/hosts` setup) wins."""
    ours: dict[str, str] = {}
    for ln in lines:
        addr, *names = ln.split()
        for n in names:
            ours.setdefault(n.lower(), addr)
    try:
        split = split_block(current)
    except DamagedBlock:
        return []  # the install refused it already
    rows = _rows(current)
    start = len(_rows(split.before))  # the block is rows start+1..stop, counting from 1
    stop = start + len(split.block) + 2 if split.block is not None else start
    out = []
    for i, row in enumerate(rows, 1):
        if start < i <= stop:
            continue
        fields = row.decode("latin-1").split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        for n in fields[1:]:
            if n.lower() in ours and fields[0] != ours[n.lower()]:
                out.append(f"/etc/hosts:{i}: {n} -> {fields[0]} outside the mesh-agent block takes "
                           f"precedence over {ours[n.lower()]}; remove that line")
    return out


def rewrite_in_place(path: Path, data: bytes) -> None:
    """Overwrite a file's contents without replacing the inode (a bind-mounted file cannot be renamed
    over). Not atomic against a crash, which is why it is used only where rename is impossible."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        view = memoryview(data)
        offset = 0
        while offset < len(data):
            offset += os.pwrite(fd, view[offset:], offset)
        os.ftruncate(fd, len(data))
        os.fsync(fd)
    finally:
        os.close(fd)


def write_hosts(path: Path, data: bytes) -> bool:
    """Write /etc/hosts keeping its mode and owner. Returns True when it had to be done in place."""
    try:
        st = path.lstat()
        mode, owner = stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid)
    except FileNotFoundError:
        mode, owner = 0o644, None
    if owner is not None and os.geteuid() != 0:
        owner = None
    try:
        atomic_write(path, data, mode, owner)
        return False
    except UnsafePathError:
        raise
    except OSError as exc:
        # EBUSY/EXDEV: a bind mount (systemd's ReadWritePaths=/etc/hosts); EROFS/EACCES: its directory
        # is read-only to us (ProtectSystem=strict) while the file itself is writable.
        if exc.errno not in (errno.EBUSY, errno.EXDEV, errno.EPERM, errno.EROFS, errno.EACCES):
            raise
        log.info("%s cannot be replaced (%s, a bind mount?): rewriting it in place", path, exc.strerror)
    rewrite_in_place(path, data)
    return True
