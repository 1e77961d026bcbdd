"""What the kernel says about listening sockets and their owners (pure parsers, then the reads).

The listening TCP sockets of some ports and their inodes come from sock_diag over netlink (about
0.1 ms), else from /proc/net/tcp{,6} (walks every socket: milliseconds on a busy host); their owners
from /proc/*/fd, the costly step; a process's identity and state from /proc/PID/stat; a reaped
process's exit status from its pidfd (PIDFD_GET_INFO, Linux 6.15).
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

log = logging.getLogger(__name__)

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's `st` column


# --- /proc parsing (pure) ---------------------------------------------------------------------------

def parse_listeners(text: str, ports: Iterable[int]) -> dict[int, set[int]]:
    """Listening sockets in /proc/net/tcp{,6} text: port -> inodes, for the given ports only."""
    wanted = {f"{p:04X}": p for p in ports}
    out: dict[int, set[int]] = {}
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 10 or parts[3] != _LISTEN:
            continue
        port = wanted.get(parts[1].rpartition(":")[2])
        if port is not None and parts[9] != "0":
            out.setdefault(port, set()).add(int(parts[9]))
    return out


_PF_EXITING = 0x4  # include/linux/sched.h: the process is in do_exit()


@dataclass(frozen=True)
class ProcStat:
    state: str                # R, S, D, Z, ...
    flags: int
    start_ticks: int          # start time since boot, in clock ticks: tells a reused pid apart
    name: str
    exit_status: int | None   # a wait status, meaningful once the process is a zombie

    @property
    def exiting(self) -> bool:
        """Dead or dying: a zombie, or already past closing its files on the way out."""
        return self.state in ("Z", "X") or bool(self.flags & _PF_EXITING)


def parse_stat(text: str) -> ProcStat:
    """/proc/PID/stat -> ProcStat. Fields after the name, which may hold spaces and parentheses."""
    name = text[text.index("(") + 1:text.rindex(")")]
    rest = text[text.rindex(")") + 2:].split()
    # rest[0] is field 3 (state), rest[6] field 9 (flags), rest[19] field 22 (starttime),
    # rest[49] field 52 (exit_code, Linux >= 3.5).
    exit_status = int(rest[49]) if len(rest) > 49 else None
    return ProcStat(rest[0], int(rest[6]), int(rest[19]), name, exit_status)


def _read(path: str) -> str:
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read()


# sock_diag (netlink): the kernel lists only the listening sockets, from its small listening hash,
# where reading /proc/net/tcp walks every socket (milliseconds on a busy host, even for tcp6).
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST_DUMP = 0x1 | 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_TCP_LISTEN_BIT = 1 << 10


def _diag_request(family: int, seq: int) -> bytes:
    # inet_diag_req_v2: family, protocol, ext, pad, states; then a zeroed inet_diag_sockid (48 bytes).
    body = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, _TCP_LISTEN_BIT) + bytes(48)
    return struct.pack("=IHHII", 16 + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST_DUMP, seq, 0) + body


def parse_diag(data: bytes, ports: set[int], out: dict[int, set[int]]) -> bool:
    """Add the listening sockets in a sock_diag reply to out; True once the dump is done."""
    off = 0
    while off + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, off)
        if length < 16:
            raise OSError("malformed netlink message")
        if kind == _NLMSG_DONE:
            return True
        if kind == _NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", data, off + 16)
            raise OSError(-err, os.strerror(-err))
        if kind == _SOCK_DIAG_BY_FAMILY and length >= 16 + 72:
            msg = off + 16  # inet_diag_msg: sport (big-endian) at 4, inode at 68
            (port,) = struct.unpack_from("!H", data, msg + 4)
            (inode,) = struct.unpack_from("=I", data, msg + 68)
            if port in ports and inode:
                out.setdefault(port, set()).add(inode)
        off += (length + 3) & ~3
    return False


def read_listeners_diag(ports: Iterable[int]) -> dict[int, set[int]]:
    wanted = set(ports)
    out: dict[int, set[int]] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, _NETLINK_SOCK_DIAG) as s:
        s.settimeout(2.0)
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), 1):
            s.sendall(_diag_request(family, seq))
            while not parse_diag(s.recv(65536), wanted, out):
                pass
    return out


def read_listeners(ports: Iterable[int], proc: str = "/proc") -> dict[int, set[int]]:
    """Listening sockets on these ports: port -> inodes (sock_diag, else /proc/net/tcp{,6})."""
    ports = tuple(ports)
    if proc == "/proc" and _diag_works():
        try:
            return read_listeners_diag(ports)
        except OSError as exc:
            log.info("sock_diag failed (%s); reading /proc/net/tcp instead", exc)
            _diag_state["ok"] = False
    return read_listeners_proc(ports, proc)


_diag_state: dict[str, bool] = {}


def _diag_works() -> bool:
    return _diag_state.setdefault("ok", hasattr(socket, "AF_NETLINK"))


def sock_diag_in_use() -> bool:
    """True while read_listeners asks sock_diag (cheap) rather than walking /proc/net/tcp."""
    return _diag_works()


def read_listeners_proc(ports: Iterable[int], proc: str = "/proc") -> dict[int, set[int]]:
    ports = tuple(ports)
    out: dict[int, set[int]] = {}
    for name in ("tcp", "tcp6"):
        try:
            text = _read(f"{proc}/net/{name}")
        except OSError:
            continue  # no IPv6 in this kernel
        for port, inodes in parse_listeners(text, ports).items():
            out.setdefault(port, set()).update(inodes)
    return out


def find_owners(inodes: set[int], proc: str = "/proc") -> dict[int, set[int]]:
    """inode -> pids holding the socket, by reading every process's fd links (costly: call rarely)."""
    targets = {f"socket:[{i}]": i for i in inodes}
    out: dict[int, set[int]] = {}
    try:
        pids = [int(d) for d in os.listdir(proc) if d.isdigit()]
    except OSError:
        return out
    for pid in pids:
        fd_dir = f"{proc}/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # gone, or not ours to see
        for fd in fds:
            try:
                link = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            inode = targets.get(link)
            if inode is not None:
                out.setdefault(inode, set()).add(pid)
    return out


def read_stat(pid: int) -> ProcStat | None:
    """/proc/PID/stat, or None when the process is gone."""
    try:
        return parse_stat(_read(f"/proc/{pid}/stat"))
    except (OSError, ValueError, IndexError):
        return None


def pidfd_supported() -> bool:
    if not hasattr(os, "pidfd_open"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return False
    return True

# PIDFD_GET_INFO (Linux 6.15): struct pidfd_info is 64 bytes, mask first, exit_code at offset 60.
_PIDFD_GET_INFO = 0xC040FF0B  # _IOWR(0xFF, 11, 64 bytes)
_PIDFD_INFO_EXIT = 1 << 3


def pidfd_exit_status(pidfd: int) -> int | None:
    """A reaped process's wait status through its pidfd, or None (not reaped, or an older kernel)."""
    import fcntl

    buf = bytearray(struct.pack("=Q", _PIDFD_INFO_EXIT) + bytes(56))
    try:
        fcntl.ioctl(pidfd, _PIDFD_GET_INFO, buf)
    except OSError:
        return None
    (mask,) = struct.unpack_from("=Q", buf, 0)
    if not mask & _PIDFD_INFO_EXIT:
        return None
    (status,) = struct.unpack_from("=i", buf, 60)
    return status
