"""Network namespaces the system tests create: a VM of its own on the network, with nothing changed on
the host's side.

    with NetNamespace("mesh-test-1-a", "10.200.0.11/24") as ns:
        ns.forward(api.port)            # 127.0.0.1:PORT inside reaches 127.0.0.1:PORT on the host
        ns.forward(8080, to=fake.port)  # 127.0.0.1:8080 inside reaches this VM's own fake service
        Machine.boot(..., netns=ns.name)

Inside there is the loopback and `eth0`, which holds the address and the default route (the agent finds
the VM's address there, as on a cloud VM); eth0 is one end of a veth pair whose other end is in the same
namespace, so no packet leaves it. The host's loopback is reached only through `forward`: its listening
socket is made inside the namespace (setns(2) in a short-lived thread: a socket stays in the namespace it
was made in), and each connection is relayed to the host's 127.0.0.1. Needs root and iproute2.
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import threading
from contextlib import suppress
from pathlib import Path

CLONE_NEWNET = 0x40000000


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _listen_in(ns_path: Path, port: int) -> socket.socket:
    """A socket listening on 127.0.0.1:port inside the namespace at ns_path."""
    made: list[socket.socket | BaseException] = []

    def run() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(ns_path, os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns {ns_path}: {os.strerror(err)}")
            made.append(socket.create_server(("127.0.0.1", port), backlog=64))
        except BaseException as exc:  # handed to the caller's thread
            made.append(exc)
        finally:
            os.close(fd)

    thread = threading.Thread(target=run, name=f"setns-{port}")  # leaves the namespace when it ends
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


class Forward:
    """127.0.0.1:port in a namespace -> 127.0.0.1:to on the host, one relay per connection."""

    def __init__(self, ns_path: Path, port: int, to: int) -> None:
        self.port, self.to = port, to
        self.listener = _listen_in(ns_path, port)
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, name=f"forward-{port}", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                inside, _ = self.listener.accept()
            except OSError:
                return  # closed
            try:
                outside = socket.create_connection(("127.0.0.1", self.to), timeout=10)
                outside.settimeout(None)
            except OSError:
                inside.close()
                continue
            self._open += [inside, outside]
            threading.Thread(target=_pump, args=(inside, outside), daemon=True).start()
            threading.Thread(target=_pump, args=(outside, inside), daemon=True).start()

    def close(self) -> None:
        self.listener.close()
        for s in self._open:
            with suppress(OSError):
                s.close()


class NetNamespace:
    def __init__(self, name: str, address: str) -> None:
        self.name, self.address = name, address
        self.forwards: list[Forward] = []

    @property
    def path(self) -> Path:
        return Path("/run/netns") / self.name

    def create(self) -> NetNamespace:
        _ip("netns", "add", self.name)
        try:
            _ip("-n", self.name, "link", "set", "lo", "up")
            _ip("-n", self.name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
            _ip("-n", self.name, "addr", "add", self.address, "dev", "eth0")
            _ip("-n", self.name, "link", "set", "eth1", "up")
            _ip("-n", self.name, "link", "set", "eth0", "up")
            _ip("-n", self.name, "route", "add", "default", "dev", "eth0")
        except BaseException:
            self.delete()
            raise
        return self

    def forward(self, port: int, to: int | None = None) -> Forward:
        fwd = Forward(self.path, port, port if to is None else to)
        self.forwards.append(fwd)
        return fwd

    def delete(self) -> None:
        for fwd in self.forwards:
            fwd.close()
        self.forwards = []
        with suppress(RuntimeError):
            _ip("netns", "delete", self.name)  # the veth pair goes with it

    def __enter__(self) -> NetNamespace:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.delete()
