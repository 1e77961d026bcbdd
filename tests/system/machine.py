"""A booted Debian test machine: systemd as PID 1 in new PID, mount and UTS namespaces.

    with Machine.boot("bookworm", workdir) as m:
        m.install_deb(deb)
        m.systemctl("start", "mesh-agent")
        m.wait_unit("mesh-agent", {"active"})
        print(m.journal("mesh-agent"))

Each boot runs on a throw-away overlay of the cached root file system (rootfs.py), so tests start
from a clean image and never change the cache. The machine shares the host's network namespace:
a server the test runs on the host's 127.0.0.1 is reachable from inside as 127.0.0.1.
Needs root, util-linux (unshare, nsenter) and overlayfs.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from agent.proc import Result  # a command's outcome, the same shape inside the machine as outside
from tests.system import rootfs

BOOT_SCRIPT = Path(__file__).with_name("boot.sh")
# What a file-tree comparison ignores: package databases, caches, logs, the journal, systemd's own
# bookkeeping, root's home (where the tests copy .debs).
FILE_TREE_SKIP = ("/var/lib/apt/", "/var/lib/dpkg/", "/var/cache/", "/var/log/", "/etc/ld.so.cache",
                  "/root/", "/var/tmp/", "/var/lib/systemd/random-seed", "/var/lib/systemd/catalog",
                  "/run/systemd/", "/run/log/", "/run/user/", "/run/lock/", "/run/credentials/")
# Python 3 compiled files: dependencies' caches that a purge does not touch.
PYCACHE = re.compile(r"/__pycache__(/|$)")
_serial = itertools.count(1)


class MachineError(AssertionError):
    """A command inside the machine failed, or a state was not reached in time."""


class Machine:
    def __init__(self, suite: str, workdir: Path, process: subprocess.Popen[bytes], pid: int) -> None:
        self.suite = suite
        self.workdir = workdir
        self._process = process  # the `unshare` process on the host
        self.pid = pid  # systemd, PID 1 inside, as the host sees it

    # --- lifecycle ---------------------------------------------------------------------------

    @classmethod
    @contextmanager
    def boot(cls, suite: str, workdir: Path, timeout: float = 90.0,
             archives: Sequence[str] = ()) -> Iterator[Machine]:
        """Boot `suite` (e.g. "bookworm"), wait for `systemctl is-system-running`, power off after.

        A workdir booted before boots as that machine left it (its overlay's upper layer is kept): a
        reboot of the same root file system. `archives` names the shared .deb caches apt reads (default:
        the suite's own); what the machine downloads is added to the first of them at power-off.
        """
        lower = rootfs.ensure(suite)
        caches = list(archives) or [suite]
        dirs = {name: workdir / name for name in ("upper", "work", "root", "debs", "debs-work")}
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        cgroup = f"mesh-agent-test-{os.getpid()}-{next(_serial)}"
        console = open(workdir / "console.log", "wb")  # noqa: SIM115 - closed after power-off
        process = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount", "--uts", "--propagation", "private",
             "sh", str(BOOT_SCRIPT), str(lower), str(dirs["upper"]), str(dirs["work"]),
             str(dirs["root"]), ":".join(str(rootfs.apt_archive(c)) for c in caches), str(dirs["debs"]),
             str(dirs["debs-work"]),
             cgroup],
            stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT, start_new_session=True)
        machine = None
        try:
            pid = _child_of(process, timeout=10.0)
            machine = cls(suite, workdir, process, pid)
            machine.wait_booted(timeout)
            yield machine
        finally:
            if machine is not None:
                machine.poweroff()
            else:
                _stop(process)
            console.close()
            _remove_cgroup(cgroup)
            rootfs.keep_downloads(caches[0], dirs["debs"])

    def wait_booted(self, timeout: float) -> str:
        """Wait until systemd finished booting; "running" or "degraded" (some unit failed) are fine."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise MachineError(f"{self.suite}: systemd exited during boot:\n{self.console_log()}")
            if self._is_systemd():
                state = self.run(["systemctl", "is-system-running"], check=False, timeout=10).stdout.strip()
                if state in ("running", "degraded"):
                    return state
            time.sleep(0.2)
        raise MachineError(f"{self.suite}: not booted after {timeout:g}s (state {state!r}):\n"
                           f"{self.console_log()}")

    def poweroff(self, timeout: float = 60.0) -> None:
        """`systemctl poweroff`, then wait for PID 1 to exit (killed if it does not)."""
        if self._process.poll() is None:
            self.run(["systemctl", "--no-block", "poweroff"], check=False, timeout=10)
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                _stop(self._process)

    def console_log(self, tail: int = 60) -> str:
        lines = (self.workdir / "console.log").read_text(errors="replace").splitlines()
        return "\n".join(lines[-tail:])

    # --- commands ----------------------------------------------------------------------------

    def run(self, argv: Sequence[str] | str, *, check: bool = True, timeout: float = 60.0,
            input: str | None = None, env: dict[str, str] | None = None) -> Result:
        """Run a command inside (a string goes to `sh -c`), as root, in the machine's namespaces."""
        cmd = ["sh", "-c", argv] if isinstance(argv, str) else list(argv)
        full_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "SYSTEMD_PAGER": "",
                    "DEBIAN_FRONTEND": "noninteractive", "SYSTEMD_COLORS": "0", **(env or {})}
        envargs = [f"{k}={v}" for k, v in full_env.items()]
        nsenter = ["nsenter", "-t", str(self.pid), "-m", "-u", "-p", "-r", "-w",
                   "env", "-i", *envargs, *cmd]
        try:
            p = subprocess.run(nsenter, input=input, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise MachineError(f"{self.suite}: timed out after {timeout:g}s: {_show(cmd)}") from exc
        result = Result(tuple(cmd), p.returncode, p.stdout, p.stderr)
        if check and not result.ok:
            raise MachineError(f"{self.suite}: exit {p.returncode}: {_show(cmd)}\n"
                               f"--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-4000:]}")
        return result

    def systemctl(self, *args: str, check: bool = True, timeout: float = 120.0) -> Result:
        return self.run(["systemctl", *args], check=check, timeout=timeout)

    def path(self, inside: str) -> Path:
        """The host's view of a path inside the machine (through /proc/PID/root)."""
        return Path(f"/proc/{self.pid}/root") / inside.lstrip("/")

    def copy_in(self, src: Path | str, dest: str, mode: int | None = None) -> None:
        target = self.path(dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
        if mode is not None:
            target.chmod(mode)

    def write(self, dest: str, text: str, mode: int = 0o644) -> None:
        target = self.path(dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    def read(self, inside: str) -> str:
        return self.path(inside).read_text()

    def exists(self, inside: str) -> bool:
        return os.path.lexists(self.path(inside))

    def file_tree(self, skip: tuple[str, ...] = ()) -> set[str]:
        """Every file, link and directory of the root file system and of /run, but for what changes by
        itself or is bookkeeping (FILE_TREE_SKIP) and `skip`: to compare before and after."""
        out = self.run("find / /run -xdev \\( -type f -o -type l -o -type d \\) -print", timeout=120).stdout
        return {p for p in out.splitlines()
                if not p.startswith(FILE_TREE_SKIP + skip) and not PYCACHE.search(p)}

    def processes(self) -> dict[int, str]:
        """pid -> command name of every process inside, read from the machine's /proc (a minimal
        Debian has no procps: no ps, pgrep or kill)."""
        out: dict[int, str] = {}
        for entry in self.path("/proc").iterdir():
            if entry.name.isdigit():
                with suppress(OSError):
                    out[int(entry.name)] = (entry / "comm").read_text().strip()
        return out

    # --- systemd -----------------------------------------------------------------------------

    def unit_properties(self, unit: str, *names: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={n}" for n in names)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def unit_property(self, unit: str, name: str) -> str:
        return self.unit_properties(unit, name).get(name, "")

    def wait_unit(self, unit: str, states: set[str], timeout: float = 60.0,
                  prop: str = "ActiveState") -> str:
        """Wait until the unit's ActiveState (or another property) is one of `states`."""
        deadline = time.monotonic() + timeout
        value = ""
        while time.monotonic() < deadline:
            value = self.unit_property(unit, prop)
            if value in states:
                return value
            time.sleep(0.2)
        raise MachineError(f"{self.suite}: {unit} {prop}={value!r}, wanted one of {sorted(states)} "
                           f"after {timeout:g}s\n{self.journal(unit, lines=40)}")

    def journal(self, unit: str | None = None, lines: int | None = None,
                after: str | None = None) -> str:
        """Journal text (of one unit), optionally only the last `lines` or entries after a cursor."""
        argv = ["journalctl", "--no-pager", "-o", "short-monotonic"]
        argv += ["-u", unit] if unit else []
        argv += ["-n", str(lines)] if lines else []
        argv += [f"--after-cursor={after}"] if after else []
        return self.run(argv, check=False, timeout=30).stdout

    def journal_cursor(self) -> str:
        """The journal's current position, for journal(after=...) later."""
        out = self.run(["journalctl", "-n", "0", "--show-cursor", "--no-pager"], timeout=30).stdout
        return out.rsplit("-- cursor: ", 1)[-1].strip()

    # --- packages ----------------------------------------------------------------------------

    def apt_update(self) -> None:
        self.run(["apt-get", "update", "-qq"], timeout=180)

    def install_deb(self, deb: Path, timeout: float = 600.0) -> Result:
        """`apt install ./x.deb`: dependencies come from the Debian archive."""
        inside = f"/root/{deb.name}"
        self.copy_in(deb, inside)
        return self.run(["apt-get", "install", "-y", "-q", inside], timeout=timeout)

    def purge(self, package: str, timeout: float = 300.0) -> Result:
        return self.run(["apt-get", "purge", "-y", "-q", package], timeout=timeout)

    # --- internals ---------------------------------------------------------------------------

    def _is_systemd(self) -> bool:
        try:
            return os.readlink(f"/proc/{self.pid}/exe").endswith("/systemd")
        except OSError:
            return False


def _child_of(process: subprocess.Popen[bytes], timeout: float) -> int:
    """The pid of unshare's forked child (PID 1 in the new namespace)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with suppress(OSError):
            children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
            if children:
                return int(children[0])
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise MachineError(f"unshare did not start its child (exit {process.poll()})")


def _remove_cgroup(name: str) -> None:
    """Remove a powered-off machine's cgroups (deepest first; a busy one is left, harmlessly)."""
    for hierarchy in (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")):
        top = hierarchy / name
        if not top.is_dir():
            continue
        for path in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with suppress(OSError):
                path.rmdir()
        with suppress(OSError):
            top.rmdir()


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Kill the machine's whole session: PID 1 dying takes every process of the namespace with it."""
    if process.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)


def _show(cmd: Sequence[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)
