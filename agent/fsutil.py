"""The one way files are written: a temp file beside the target, fsync, rename, fsync the directory. A
reader (or a crash) sees the old file or the new one, never half of one.

No symbolic link is ever followed when writing. The directory is opened by walking its path one name at
a time from `/` (a link met on the way is followed only because it sits in a directory that passed the
check), and the file is then created and renamed relative to that directory's descriptor, with
O_NOFOLLOW|O_EXCL: a link planted where the file goes is replaced, never written through. With `secure`
(the default: the live tree and the state directory), every directory on the way must be owned by root,
by this process's user or by the file's owner, and not writable by group or others unless sticky; so no
other user can swap a directory under the agent. Mode and owner are set on every write, before the first
byte, whether or not the file existed (the temp file is always new).

Temp files are named `.<name>.<random>.tmp`; `clear_temp_files` removes exactly those (left by a crash)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

MAX_LINKS = 40  # as the kernel's own limit on links in one lookup


class UnsafePathError(OSError):
    """A directory on the way is not safe to write under, or a link sits where a file goes."""


def _rename(dir_fd: int, src: str, dst: str) -> None:
    os.rename(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


# The rename, replaceable in tests that simulate a target which cannot be renamed over (a bind mount).
_replace: Callable[[int, str, str], None] = _rename

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _check_dir(fd: int, where: str, trusted: Iterable[int]) -> None:
    st = os.fstat(fd)
    if st.st_uid not in trusted:
        raise UnsafePathError(errno.EPERM, f"{where}: owned by uid {st.st_uid}, not root: refusing to write "
                              "under a directory another user controls")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise UnsafePathError(errno.EPERM, f"{where}: writable by group or others "
                              f"(mode {stat.S_IMODE(st.st_mode):04o}): refusing to write under it")


def open_dir(path: Path | str, *, secure: bool = True, owner: tuple[int, int] | None = None) -> int:
    """A descriptor of directory `path`, reached without trusting any link an untrusted user could have
    planted (see the module docstring). The caller closes it. Raises OSError (UnsafePathError)."""
    trusted = {0, os.geteuid()} | ({owner[0]} if owner else set())
    parts = [p for p in os.path.abspath(path).split("/") if p]
    stack = [os.open("/", _DIR_FLAGS)]
    shown: list[str] = []
    links = 0
    try:
        if secure:
            _check_dir(stack[0], "/", trusted)
        while parts:
            name = parts.pop(0)
            if name == ".":
                continue
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                    shown.pop()
                continue
            st = os.stat(name, dir_fd=stack[-1], follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > MAX_LINKS:
                    raise OSError(errno.ELOOP, f"too many symbolic links in {path}")
                target = os.readlink(name, dir_fd=stack[-1])
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                    shown.clear()
                parts = [p for p in target.split("/") if p] + parts
                continue
            fd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=stack[-1])
            stack.append(fd)
            shown.append(name)
            if secure:
                _check_dir(fd, "/" + "/".join(shown), trusted)
        return stack.pop()
    finally:
        for fd in stack:
            os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(name: str) -> str:
    return f".{name}.{secrets.token_hex(4)}.tmp"


_RANDOM = r"[0-9a-z_]{8}"  # secrets.token_hex(4) here, tempfile.mkstemp's 8 characters before


def is_temp_of(entry: str, name: str) -> bool:
    """Whether `entry` is a temp file this module made while writing `name`."""
    return re.fullmatch(rf"\.{re.escape(name)}\.{_RANDOM}\.tmp", entry) is not None


def write_in(dir_fd: int, name: str, data: bytes, mode: int, owner: tuple[int, int] | None = None) -> None:
    """Replace `name` in the open directory atomically (temp file, fsync, rename, fsync the directory)."""
    tmp = temp_name(name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                 dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, *owner)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        _replace(dir_fd, tmp, name)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.fsync(dir_fd)


def atomic_write(path: Path, data: bytes, mode: int, owner: tuple[int, int] | None = None, *,
                 secure: bool = True) -> None:
    """Replace path with data. Mode and owner are set before any byte is written, so a token is never
    readable by others; a link at path is replaced, never followed. Raises OSError."""
    dfd = open_dir(path.parent, secure=secure, owner=owner)
    try:
        write_in(dfd, path.name, data, mode, owner)
    finally:
        os.close(dfd)


def read_nofollow(path: Path) -> bytes | None:
    """A file's bytes, None when it is missing; a link there is refused (UnsafePathError), not read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(errno.ELOOP, f"{path}: a symbolic link where a file belongs; "
                                  "refusing to read through it") from None
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise UnsafePathError(errno.EINVAL, f"{path}: not a regular file")
        return f.read()


def clear_temp_files(directory: Path, names: Iterable[str]) -> list[str]:
    """Remove the temp files a crash left in directory while writing one of `names`; nothing else (no
    other name, no directory, no link is touched). Returns what was removed."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    for e in entries:
        if e.is_file(follow_symlinks=False) and any(is_temp_of(e.name, n) for n in names):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(e.path)
            removed.append(e.name)
    return removed
