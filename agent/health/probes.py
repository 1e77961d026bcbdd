"""Probes of the app, with the semantics of a WorkloadGroup probe (Kubernetes' readiness probe).

- http_get: GET on scheme://host:port/path; success is a status 200-399. HTTPS certificates are not
  verified (as kubelet does); redirects are not followed (a 3xx is a success, as kubelet counts it).
- tcp_socket: a TCP connection is accepted.
- exec: the command (argv, no shell) exits 0; at the timeout its whole process group is killed.
- grpc: grpc.health.v1.Health/Check answers SERVING; needs grpcio (Debian: python3-grpcio).

Every probe has one method, `check(timeout) -> ProbeResult`, and never raises for the app's
failures: a refused connection, a timeout or a bad status is a failed result with a reason.
Which probe and ports to use, from agent.yaml or from the mesh, is probe_spec.py's concern.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from agent import proc
from agent.health.config import ProbeConfig

USER_AGENT = "mesh-agent-probe/1"
_BODY_LIMIT = 10 * 1024  # read at most this much of a response (kubelet's limit too)


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    reason: str      # short, for status and logs: "HTTP 200", "connection refused", ...
    latency: float   # seconds the check took


class Probe(Protocol):
    description: str

    def check(self, timeout: float) -> ProbeResult: ...


def _hostport(host: str, port: int) -> str:
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


def _why(exc: BaseException) -> str:
    """A short reason for a network error."""
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "connection closed without a response"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host: {exc.strerror}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return f"{type(exc).__name__}: {exc}"


# --- the four kinds ---------------------------------------------------------------------------------

class _DeadlineReader(io.RawIOBase):
    """Reads a socket with one deadline for the whole response, as kubelet's client timeout is:
    a server that trickles its answer cannot stretch a probe beyond its timeout."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock, self._deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        self._sock.settimeout(left)
        return self._sock.recv_into(buf)


class _DeadlineSocket:
    """The parts of a socket http.client uses, with reads bounded by a deadline."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock, self._deadline = sock, deadline

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))

    def sendall(self, data: bytes) -> None:
        self._sock.settimeout(max(0.001, self._deadline - time.monotonic()))
        self._sock.sendall(data)

    def close(self) -> None:
        pass  # http.client closes before the body is read; HttpProbe.check closes the socket itself


def _unverified_tls() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class HttpProbe:
    def __init__(self, host: str, port: int, path: str = "/", scheme: str = "HTTP",
                 headers: Sequence[tuple[str, str]] = ()) -> None:
        self.host, self.port, self.scheme = host, port, scheme.upper()
        self.path = path if path.startswith("/") else "/" + path
        self.headers = tuple(headers)
        self.description = f"{self.scheme.lower()}://{_hostport(host, port)}{self.path}"
        # Certificates are not verified (as kubelet), so no CA store: create_default_context() would load
        # the system's whole store (~35 ms of CPU and its memory) on every probe, for nothing.
        self.tls = _unverified_tls() if self.scheme == "HTTPS" else None

    def check(self, timeout: float) -> ProbeResult:
        start = time.monotonic()
        conn: http.client.HTTPConnection
        raw: socket.socket | None = None
        if self.scheme == "HTTPS":
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=self.tls)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.connect()  # the TCP connect and the TLS handshake, each bounded by the timeout
            raw = conn.sock
            conn.sock = _DeadlineSocket(raw, start + timeout)
            conn.putrequest("GET", self.path, skip_accept_encoding=True,
                            skip_host=any(n.lower() == "host" for n, _ in self.headers))
            names = {n.lower() for n, _ in self.headers}
            if "user-agent" not in names:
                conn.putheader("User-Agent", USER_AGENT)
            if "accept" not in names:
                conn.putheader("Accept", "*/*")
            for name, value in self.headers:
                conn.putheader(name, value)
            conn.endheaders()
            resp = conn.getresponse()
            resp.read(_BODY_LIMIT)
            status = resp.status
        except (OSError, http.client.HTTPException) as exc:
            return ProbeResult(False, _why(exc), time.monotonic() - start)
        finally:
            conn.close()
            if raw is not None:
                raw.close()
        ok = 200 <= status < 400
        return ProbeResult(ok, f"HTTP {status}", time.monotonic() - start)


class TcpProbe:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.description = f"tcp://{_hostport(host, port)}"

    def check(self, timeout: float) -> ProbeResult:
        start = time.monotonic()
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout):
                pass
        except OSError as exc:
            return ProbeResult(False, f"port {self.port}: {_why(exc)}", time.monotonic() - start)
        return ProbeResult(True, f"port {self.port} accepted", time.monotonic() - start)


class AllPorts:
    """TCP checks on several ports (the default without a probe): all must accept."""

    def __init__(self, probes: Sequence[TcpProbe]) -> None:
        self.probes = tuple(probes)
        self.description = ", ".join(p.description for p in self.probes)

    def check(self, timeout: float) -> ProbeResult:
        start = time.monotonic()
        for p in self.probes:
            r = p.check(max(0.001, timeout - (time.monotonic() - start)))
            if not r.ok:
                return ProbeResult(False, r.reason, time.monotonic() - start)
        return ProbeResult(True, "accepted", time.monotonic() - start)


class CommandProbe:
    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = tuple(argv)
        self.description = "exec " + " ".join(self.argv)

    def check(self, timeout: float) -> ProbeResult:
        start = time.monotonic()
        try:
            r = proc.run(self.argv, timeout=timeout)
        except OSError as exc:
            return ProbeResult(False, f"cannot run {self.argv[0]}: {_why(exc)}", time.monotonic() - start)
        latency = time.monotonic() - start
        if r.ok:
            return ProbeResult(True, "exit 0", latency)
        if r.stderr.endswith(f"timed out after {timeout:g}s"):
            return ProbeResult(False, f"timed out after {timeout:g}s", latency)
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:]
        return ProbeResult(False, f"exit {r.returncode}" + (f": {tail[0][:200]}" if tail else ""), latency)


# grpc.health.v1 messages, encoded by hand so that grpcio alone is enough (no protobuf stubs):
# HealthCheckRequest { string service = 1; }  HealthCheckResponse { ServingStatus status = 1; }
_SERVING_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def encode_health_request(service: str) -> bytes:
    data = service.encode()
    return b"\x0a" + _varint(len(data)) + data if data else b""


def decode_health_response(data: bytes) -> int:
    """The `status` field of a HealthCheckResponse (0 when absent); ValueError if malformed."""
    status, i = 0, 0
    while i < len(data):
        key, i = _read_varint(data, i)
        field_no, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(data, i)
            if field_no == 1:
                status = value
        elif wire == 2:
            length, i = _read_varint(data, i)
            i += length
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if i > len(data):
            raise ValueError("truncated message")
    return status


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def grpc_available() -> bool:
    try:
        import grpc  # noqa: F401
    except ImportError:
        return False
    return True


class GrpcHealthProbe:
    def __init__(self, host: str, port: int, service: str = "") -> None:
        self.host, self.port, self.service = host, port, service
        self.description = f"grpc://{_hostport(host, port)}" + (f" service {service}" if service else "")

    def check(self, timeout: float) -> ProbeResult:
        start = time.monotonic()
        try:
            import grpc
        except ImportError:
            return ProbeResult(False, "a grpc probe needs grpcio (Debian: apt install python3-grpcio)", 0.0)
        channel = grpc.insecure_channel(_hostport(self.host, self.port))
        try:
            rpc = channel.unary_unary("/grpc.health.v1.Health/Check",
                                      request_serializer=encode_health_request,
                                      response_deserializer=decode_health_response)
            status = rpc(self.service, timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            name = code.name if code is not None else "error"
            detail = exc.details() if hasattr(exc, "details") else ""
            reason = "timed out" if name == "DEADLINE_EXCEEDED" else f"rpc {name}"
            if detail and name != "DEADLINE_EXCEEDED":
                reason += f": {detail[:200]}"
            return ProbeResult(False, reason, time.monotonic() - start)
        except ValueError as exc:
            return ProbeResult(False, f"bad health response: {exc}", time.monotonic() - start)
        finally:
            channel.close()
        name = _SERVING_STATUS.get(status, str(status))
        return ProbeResult(status == 1, name, time.monotonic() - start)


# --- building probes ----------------------------------------------------------------------------------

def build_probe(cfg: ProbeConfig, default_host: str = "127.0.0.1") -> Probe:
    """The probe a ProbeConfig describes; `default_host` is used when the probe names no host."""
    if cfg.http_get is not None:
        h = cfg.http_get
        return HttpProbe(h.host or default_host, h.port, h.path, h.scheme,
                         [(x.name, x.value) for x in h.http_headers])
    if cfg.tcp_socket is not None:
        return TcpProbe(cfg.tcp_socket.host or default_host, cfg.tcp_socket.port)
    if cfg.exec is not None:
        return CommandProbe(cfg.exec.command)
    if cfg.grpc is not None:
        return GrpcHealthProbe(default_host, cfg.grpc.port, cfg.grpc.service)
    raise ValueError("a probe needs exactly one of http_get, tcp_socket, exec, grpc")


def default_probe(ports: Sequence[int], host: str = "127.0.0.1") -> Probe:
    """Without a probe: a TCP check on every app port."""
    if not ports:
        raise ValueError("no probe and no app port to check: set app.ports or app.probe")
    probes = [TcpProbe(host, p) for p in ports]
    return probes[0] if len(probes) == 1 else AllPorts(probes)


def probe_ports(cfg: ProbeConfig | None) -> tuple[int, ...]:
    """The port a probe checks, if it checks one."""
    if cfg is None:
        return ()
    for kind in (cfg.http_get, cfg.tcp_socket, cfg.grpc):
        if kind is not None:
            return (kind.port,)
    return ()
