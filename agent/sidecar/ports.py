"""Who holds the proxy's ports: a quick bind test, then a socket scan (psutil) for pids and names."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import psutil

PORT_SETTLE = 1.0          # how long a port may stay held by a dying process before it is a conflict


@dataclass(frozen=True)
class PortHolder:
    port: int
    pid: int | None
    name: str

    def __str__(self) -> str:
        who = f"pid {self.pid} ({self.name})" if self.pid else "a process the agent cannot see"
        return f"port {self.port} is already in use by {who}"


def busy_ports(ports: Sequence[int]) -> list[int]:
    """Ports someone listens on, by trying to bind them on the wildcard address (fast, no pids)."""
    busy = []
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # TIME_WAIT does not count
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                busy.append(port)
    return busy


def port_holders(ports: Sequence[int], exclude: Collection[int] = ()) -> list[PortHolder]:
    """Processes (other than `exclude`) listening on any of `ports` (TCP, any address)."""
    wanted = set(busy_ports(ports))
    if not wanted:
        return []   # the quick test found every port free: no need for the costlier socket scan
    found: dict[int, PortHolder] = {}
    for conn in psutil.net_connections(kind="inet"):
        if conn.status != psutil.CONN_LISTEN or not conn.laddr or conn.laddr.port not in wanted:
            continue
        if conn.pid is not None and conn.pid in exclude:
            continue
        name = "?"
        if conn.pid is not None:
            with contextlib.suppress(psutil.Error):
                name = psutil.Process(conn.pid).name()
        found.setdefault(conn.laddr.port, PortHolder(conn.laddr.port, conn.pid, name))
    return [found[p] for p in sorted(found)]


def conflicts(ports: Sequence[int], settle: float = PORT_SETTLE) -> list[PortHolder]:
    """Other processes on `ports`. A proxy that was just killed may hold its sockets for a moment
    while it is torn down: give that `settle` seconds before calling it a conflict."""
    end = time.monotonic() + settle
    while True:
        found = port_holders(ports)
        if not found or time.monotonic() >= end:
            return found
        time.sleep(0.05)


def describe_conflicts(found: Sequence[PortHolder]) -> str:
    return "; ".join(map(str, found)) + ": free the port or change the proxy's ports"
