"""The one place that runs subprocesses.

Short commands go through run(); long-lived children (the sidecar) through spawn(). Both take an
argv list, never a shell string, and every run has a timeout. describe_exit() is the one wording of
how a process ended (the app's, the proxy's).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class CommandError(Exception):
    def __init__(self, result: Result) -> None:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        super().__init__(f"{' '.join(result.argv)} exited {result.returncode}: {' | '.join(tail)}")
        self.result = result


def run(argv: Sequence[str], *, timeout: float, check: bool = False, env: Mapping[str, str] | None = None,
        input: str | None = None, cwd: str | None = None) -> Result:
    """Run a command to completion; on timeout its whole process group is killed."""
    log.debug("running %s", " ".join(argv))
    with subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                          env=dict(env) if env is not None else None, cwd=cwd, text=True,
                          start_new_session=True) as p:
        try:
            out, err = p.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            result = Result(tuple(argv), -signal.SIGKILL, out, err + f"\ntimed out after {timeout:g}s")
            if check:
                raise CommandError(result) from None
            return result
    result = Result(tuple(argv), p.returncode, out, err)
    if check and not result.ok:
        raise CommandError(result)
    return result


def spawn(argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | None = None,
          user: str | None = None, stdout: int | None = None, stderr: int | None = None,
          pass_fds: Sequence[int] = ()) -> subprocess.Popen[bytes]:
    """Start a long-lived child in its own process group (so it can be signalled as a whole).

    With `user`, the child also gets that user's primary and supplementary groups (as login, sudo
    and systemd's User= do), not the agent's root groups. Raises KeyError for an unknown user.
    """
    log.debug("spawning %s", " ".join(argv))
    group: int | None = None
    extra_groups: list[int] | None = None
    if user is not None:
        import pwd

        entry = pwd.getpwnam(user)
        group = entry.pw_gid
        extra_groups = os.getgrouplist(entry.pw_name, entry.pw_gid)
    return subprocess.Popen(list(argv), env=dict(env) if env is not None else None, cwd=cwd,
                            user=user, group=group, extra_groups=extra_groups,
                            stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                            start_new_session=True, pass_fds=tuple(pass_fds))


def kill_group(pid: int, sig: int) -> bool:
    """Signal a process group led by pid; False if it is gone already."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True


def describe_exit(pid: int, name: str, returncode: int | None) -> str:
    """`process 1234 (python3) exited: killed by SIGKILL` (returncode as Popen's: -N for signal N;
    None: unknown, e.g. a process that is not our child)."""
    who = f"process {pid}" + (f" ({name})" if name else "")
    if returncode is None:
        return f"{who} exited"
    if returncode < 0:
        try:
            sig = signal.Signals(-returncode).name
        except ValueError:
            sig = f"signal {-returncode}"
        return f"{who} exited: killed by {sig}"
    return f"{who} exited with status {returncode}"
