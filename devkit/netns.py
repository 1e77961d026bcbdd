"""A network namespace of the test's own, with an interface whose addresses the test adds and
removes live (`ip addr add/del`), and a way for the calling thread to step into it.

    with NetNs() as ns:
        ns.ip("addr", "add", "10.77.0.5/24", "dev", "eth0")
        with ns.entered():      # this thread, and the threads and processes it starts, live in ns
            ...

Stepping in is setns(2) on the calling thread only: what it starts meanwhile (threads, sockets,
subprocesses) belongs to the namespace for good, what ran before stays outside. /proc/net reads the
main thread's namespace, so step in from the main thread. Needs root (CAP_SYS_ADMIN) and iproute2;
`unavailable()` says why not.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

CLONE_NEWNET = 0x40000000


def unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    return None


def _setns(fd: int) -> None:
    if hasattr(os, "setns"):  # Python 3.12+
        os.setns(fd, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class NetNs:
    """A named namespace with `lo` up and `eth0` (one end of a veth pair whose other end stays inside;
    up, no address) for the test's addresses and default routes."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name or f"mesh-test-{uuid.uuid4().hex[:8]}"
        self.created = False

    def __enter__(self) -> NetNs:
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        self.created = True
        self.ip("link", "set", "lo", "up")
        # A veth pair with both ends inside: eth0 has a carrier, as a VM's NIC has (dummy devices need
        # a kernel module that is not always there).
        self.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth0-peer")
        self.ip("link", "set", "eth0-peer", "up")
        self.ip("link", "set", "eth0", "up")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.created:
            subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)
            self.created = False

    def ip(self, *args: str) -> str:
        """`ip -n NAME ARGS`; its output. A failure raises with ip's own message."""
        done = subprocess.run(["ip", "-n", self.name, *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"ip -n {self.name} {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def set_default_route(self, version: int = 4) -> None:
        self.ip(f"-{version}", "route", "replace", "default", "dev", "eth0")

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(own)
            os.close(target)
