"""What the agent wrote outside its own directories, so that `apt purge` and `mesh-agent deprovision
--all` remove exactly that and nothing else.

The manifest is <state>/written, a text file read by the package's postrm too (a shell script: at purge
time the Python code is already gone), so its format is one entry per line:

    file SHA256 PATH      a file the agent wrote, with the sha256 of what it wrote last
    log PATH              a log file the agent created for the proxy (appended to, so no hash)
    dir PATH              a directory the agent created (removed only when empty)
    hosts PATH            the file holding the agent's managed block (/etc/hosts)
    hosts-begin TEXT      the block's first line, and
    hosts-end TEXT        its last line (the installer's constants, recorded so the postrm needs no copy)

PATHs are the VM's absolute paths (without a test's root prefix). The installer records an entry before
it writes the file (agent.fsutil's atomic write of the whole manifest), so a crash between the two
leaves at most an entry whose hash does not match, which removal skips.

Removal leaves alone a file whose content changed since the agent wrote it (someone else's edit is not
the agent's to delete; it is named in the output) and one that a Debian package owns (e.g. the
istio-sidecar package's); a directory is removed only when empty and not a package's. A log is the
agent's whatever it holds, and goes unless a package owns it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from agent import proc
from agent.fsutil import atomic_write
from agent.paths import Layout

NAME = "written"
HEADER = ("# mesh-agent: files it wrote outside its own directories; `apt purge mesh-agent` and\n"
          "# `mesh-agent deprovision --all` remove them (see agent/manifest.py for the format)\n")


@dataclass
class Manifest:
    files: dict[str, str] = field(default_factory=dict)  # VM path -> sha256 of what the agent wrote
    logs: list[str] = field(default_factory=list)        # VM paths of logs it created
    dirs: list[str] = field(default_factory=list)        # VM paths, in the order they were created
    hosts: str | None = None                             # VM path of the file with the managed block
    markers: tuple[str, str] | None = None               # the block's first and last lines

    def empty(self) -> bool:
        return not self.files and not self.logs and not self.dirs and self.hosts is None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_path(layout: Layout) -> Path:
    return layout.state / NAME


def vm_path(layout: Layout, path: Path) -> str:
    """The VM's view of a path under the layout's root."""
    if not path.is_relative_to(layout.root):
        return str(path)
    relative = path.relative_to(layout.root)
    return "/" if relative == Path(".") else f"/{relative}"


def parse(text: str) -> Manifest:
    m = Manifest()
    begin = end = None
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "file":
            digest, _, path = rest.partition(" ")
            if path:
                m.files[path] = digest
        elif kind in ("dir", "log") and rest:
            entries = m.dirs if kind == "dir" else m.logs
            if rest not in entries:
                entries.append(rest)
        elif kind == "hosts" and rest:
            m.hosts = rest
        elif kind == "hosts-begin":
            begin = rest
        elif kind == "hosts-end":
            end = rest
    if begin and end:
        m.markers = (begin, end)
    return m


def render(m: Manifest) -> str:
    lines = [f"dir {d}" for d in m.dirs]
    lines += [f"file {digest} {path}" for path, digest in sorted(m.files.items())]
    lines += [f"log {path}" for path in m.logs]
    if m.hosts is not None:
        lines.append(f"hosts {m.hosts}")
        if m.markers:
            lines += [f"hosts-begin {m.markers[0]}", f"hosts-end {m.markers[1]}"]
    return HEADER + "".join(f"{ln}\n" for ln in lines)


def load(layout: Layout) -> Manifest:
    try:
        return parse(manifest_path(layout).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Manifest()


def save(layout: Layout, m: Manifest) -> None:
    """Write the manifest atomically; an empty one is removed."""
    path = manifest_path(layout)
    if m.empty():
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    atomic_write(path, render(m).encode("utf-8"), 0o644)


def record(layout: Layout, *, files: dict[Path, bytes] | None = None, dirs: Iterable[Path] = (),
           logs: Iterable[Path] = (), hosts: Path | None = None,
           markers: tuple[str, str] | None = None) -> None:
    """Add what is about to be written (call before writing). Writes the manifest only on a change."""
    m = load(layout)
    before = render(m)
    for d in dirs:
        p = vm_path(layout, d)
        if p != "/" and p not in m.dirs:  # "/": a test's root prefix not made yet
            m.dirs.append(p)
    for path, data in (files or {}).items():
        m.files[vm_path(layout, path)] = sha256(data)
    for path in logs:
        if vm_path(layout, path) not in m.logs:
            m.logs.append(vm_path(layout, path))
    if hosts is not None:
        m.hosts, m.markers = vm_path(layout, hosts), markers
    if render(m) != before:
        save(layout, m)


def roll_back(layout: Layout, saved: Manifest) -> None:
    """After a failed install whose files were put back: the manifest as it was, plus the directories
    the attempt created (they stay, and are the agent's)."""
    attempt = load(layout)
    for d in attempt.dirs:
        if d not in saved.dirs and layout.under(d).is_dir():
            saved.dirs.append(d)
    save(layout, saved)


def missing_dirs(path: Path) -> list[Path]:
    """The directories that creating `path` (a directory) would make, outermost first."""
    out: list[Path] = []
    p = path
    while not p.exists() and p != p.parent:
        out.append(p)
        p = p.parent
    return out[::-1]


def owned_by_package(layout: Layout, vm: str) -> bool:
    """Whether a Debian package ships this path (dpkg-query -S), in the layout's dpkg database."""
    argv = ["dpkg-query", "-S", vm]
    if layout.root != Path("/"):
        argv.insert(1, f"--admindir={layout.under('/var/lib/dpkg')}")
    try:
        return proc.run(argv, timeout=30.0).ok
    except OSError:  # no dpkg at all: nothing is a package's
        return False


Owned = Callable[[str], bool]


def remove_files(layout: Layout, m: Manifest, owned: Owned) -> tuple[list[str], list[str]]:
    """Remove the recorded files that still hold what the agent wrote. Returns (done, left) lines;
    `m.files` keeps only the files left behind."""
    done, left = [], []
    for vm, digest in sorted(m.files.items()):
        path = layout.under(vm)
        if not os.path.lexists(path):
            del m.files[vm]
            continue
        if path.is_symlink() or not path.is_file():
            left.append(f"left {path}: not a regular file any more")
        elif sha256(path.read_bytes()) != digest:
            left.append(f"left {path}: changed since mesh-agent wrote it")
        elif owned(vm):
            left.append(f"left {path}: a Debian package owns it")
        else:
            path.unlink()
            del m.files[vm]
            done.append(f"removed {path}")
    for vm in list(m.logs):
        path = layout.under(vm)
        if not path.is_file() or path.is_symlink():
            m.logs.remove(vm)
        elif owned(vm):
            left.append(f"left {path}: a Debian package owns it")
        else:
            path.unlink()
            m.logs.remove(vm)
            done.append(f"removed {path}")
    return done, left


def remove_dirs(layout: Layout, m: Manifest, owned: Owned) -> list[str]:
    """Remove the recorded directories that are empty and no package's, innermost first."""
    done = []
    for vm in sorted(m.dirs, key=lambda d: -d.count("/")):
        path = layout.under(vm)
        if not path.is_dir() or path.is_symlink():
            m.dirs.remove(vm)
            continue
        if any(path.iterdir()) or owned(vm):
            continue
        path.rmdir()
        m.dirs.remove(vm)
        done.append(f"removed {path}/")
    return done
