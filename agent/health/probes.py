"""Probes of the app, with the semantics of a WorkloadGroup probe (Kubernetes' readiness probe).

- http_get: GET on scheme://host:port/path; success is a status 200-399. HTTPS certificates are not
  verified (as kubelet does); redirects are not followed (a 3xx is a success, as kubelet counts it).
- tcp_socket: a TCP connection is accepted.
- exec: the command (argv, no shell) exits 0; at the timeout its whole process group is killed.
- grpc: grpc.health.v1.Health/Check answers SERVING; needs grpcio (Debian: python3-grpcio).

Every probe has one method, `check(timeout) -> ProbeResult`, and never raises for the app's
failures: a refused connection, a timeout or a bad status is a failed result with a reason.

`probe_from_istio()` turns Istio's camelCase probe (a WorkloadGroup's `spec.probe`, or mesh.yaml's
`defaultConfig.readinessProbe`) into the agent's ProbeConfig, with the API-documented defaults.
"""

from __future__ import annotations

import dataclasses
import http.client
import io
import ipaddress
import socket
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from agent import proc
from agent.config import (
    ExecProbe,
    GrpcProbe,
    HttpGetProbe,
    HttpHeader,
    ProbeConfig,
    TcpSocketProbe,
)
from agent.schema import Duration

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


class HttpProbe:
    def __init__(self, host: str, port: int, path: str = "/", scheme: str = "HTTP",
                 headers: Sequence[tuple[str, str]] = ()) -> None:
        self.host, self.port, self.scheme = host, port, scheme.upper()
        self.path = path if path.startswith("/") else "/" + path
        self.headers = tuple(headers)
        self.description = f"{self.scheme.lower()}://{_hostport(host, port)}{self.path}"

    def check(self, timeout: float) -> ProbeResult:
        start = time.monotonic()
        conn: http.client.HTTPConnection
        raw: socket.socket | None = None
        if self.scheme == "HTTPS":
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=ctx)
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


def app_ports(configured: Sequence[int], template_ports: Mapping[str, int] | None,
              inbound_ports: str | None) -> tuple[int, ...]:
    """The app's ports: agent.yaml's app.ports, else the WorkloadGroup template's ports, else
    cluster.env's ISTIO_INBOUND_PORTS (a comma list; `*` names no port)."""
    if configured:
        return tuple(dict.fromkeys(configured))
    if template_ports:
        return tuple(dict.fromkeys(int(p) for p in template_ports.values()))
    out: list[int] = []
    for part in (inbound_ports or "").split(","):
        part = part.strip()
        if part.isdigit() and 1 <= int(part) <= 65535:
            out.append(int(part))
    return tuple(dict.fromkeys(out))


# --- Istio's camelCase probe -> ProbeConfig -----------------------------------------------------------

class ProbeSpecError(ValueError):
    """An Istio probe that cannot be used; the message names the key."""


_DEFAULTS = {"timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3}
_KINDS = ("httpGet", "tcpSocket", "exec", "grpc")
_TIMING = ("initialDelaySeconds", "timeoutSeconds", "periodSeconds", "successThreshold", "failureThreshold")


def _int(spec: Mapping[str, Any], key: str, where: str, *, lo: int, hi: int) -> int | None:
    value = spec.get(key)
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProbeSpecError(f"{where}.{key}: expected an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ProbeSpecError(f"{where}.{key}: must be {lo}..{hi}, got {value}")
    return value


def _str(spec: Mapping[str, Any], key: str, where: str, default: str) -> str:
    value = spec.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ProbeSpecError(f"{where}.{key}: expected a string, got {value!r}")
    return value


def _map(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ProbeSpecError(f"{where}: expected a mapping, got {value!r}")
    return value


def _port(spec: Mapping[str, Any], where: str) -> int:
    port = _int(spec, "port", where, lo=1, hi=65535)
    if port is None:
        raise ProbeSpecError(f"{where}.port: required")
    return port


def probe_from_istio(spec: Mapping[str, Any], where: str = "probe") -> ProbeConfig:
    """Istio's probe (WorkloadGroup spec.probe, mesh.yaml readinessProbe) as a ProbeConfig.

    Zero or absent timing fields take the API's defaults (timeout 1 s, period 10 s, success 1,
    failure 3, initial delay 0), as proto3's zero means "unset". Raises ProbeSpecError.
    """
    spec = _map(spec, where)
    kinds = [k for k in _KINDS if spec.get(k) is not None]
    if len(kinds) != 1:
        raise ProbeSpecError(f"{where}: a probe needs exactly one of {', '.join(_KINDS)}"
                             + (f" (got {', '.join(kinds)})" if kinds else ""))
    unknown = sorted(set(spec) - set(_KINDS) - set(_TIMING), key=str)  # keys from YAML may be any type
    if unknown:
        raise ProbeSpecError(f"{where}.{unknown[0]}: unknown key")
    kind = kinds[0]
    body = _map(spec[kind], f"{where}.{kind}")
    at = f"{where}.{kind}"
    http_get = tcp = exe = grpc = None
    if kind == "httpGet":
        scheme = _str(body, "scheme", at, "HTTP").upper()
        if scheme not in ("HTTP", "HTTPS"):
            raise ProbeSpecError(f"{at}.scheme: expected HTTP or HTTPS, got {scheme!r}")
        headers = []
        raw_headers = body.get("httpHeaders") or []
        if not isinstance(raw_headers, list):
            raise ProbeSpecError(f"{at}.httpHeaders: expected a list, got {raw_headers!r}")
        for i, h in enumerate(raw_headers):
            h = _map(h, f"{at}.httpHeaders[{i}]")
            name = _str(h, "name", f"{at}.httpHeaders[{i}]", "")
            if not name:
                raise ProbeSpecError(f"{at}.httpHeaders[{i}].name: required")
            headers.append(HttpHeader(name, _str(h, "value", f"{at}.httpHeaders[{i}]", "")))
        http_get = HttpGetProbe(port=_port(body, at), path=_str(body, "path", at, "/") or "/",
                                host=_str(body, "host", at, "") or None, scheme=scheme,  # type: ignore[arg-type]
                                http_headers=tuple(headers))
    elif kind == "tcpSocket":
        tcp = TcpSocketProbe(port=_port(body, at), host=_str(body, "host", at, "") or None)
    elif kind == "exec":
        command = body.get("command")
        if not isinstance(command, list) or not command or not all(isinstance(c, str) for c in command):
            raise ProbeSpecError(f"{at}.command: expected a non-empty list of strings, got {command!r}")
        exe = ExecProbe(command=tuple(command))
    else:
        grpc = GrpcProbe(port=_port(body, at), service=_str(body, "service", at, ""))

    def timing(key: str, lo: int, hi: int) -> int:
        value = _int(spec, key, where, lo=0, hi=hi)
        if not value:
            return _DEFAULTS.get(key, 0)
        if value < lo:
            raise ProbeSpecError(f"{where}.{key}: must be at least {lo}, got {value}")
        return value

    return ProbeConfig(
        http_get=http_get, tcp_socket=tcp, exec=exe, grpc=grpc,
        initial_delay=Duration(timing("initialDelaySeconds", 0, 3600)),
        timeout=Duration(timing("timeoutSeconds", 1, 600)),
        period=Duration(timing("periodSeconds", 1, 3600)),
        success_threshold=timing("successThreshold", 1, 100),
        failure_threshold=timing("failureThreshold", 1, 100),
    )


# --- probes from the mesh -------------------------------------------------------------------------------

SETPRIV = "/usr/bin/setpriv"  # util-linux (essential on Debian): drops to a user with no new privileges


def exec_refusal(where: str) -> str:
    """The one line that refuses an exec probe from the mesh (a bundle or a WorkloadGroup)."""
    return (f"{where}.exec: an exec probe from the mesh is refused (it would run a command on this machine); "
            "set app.probe in agent.yaml, or bundle.allow_exec_probe: true to run it as sidecar.user")


def mesh_probe(probe: ProbeConfig | None, where: str, *, allow_exec: bool, user: str | None,
               euid: int | None = None) -> ProbeConfig | None:
    """A probe that came from the mesh (mesh.yaml, workloadgroup.yaml, the WorkloadGroup in the API), as
    it may run here. An exec probe is refused unless allowed; allowed, it runs through setpriv as `user`
    with no new privileges, never as root. Raises ProbeSpecError with one line."""
    if probe is None or probe.exec is None:
        return probe
    if not allow_exec:
        raise ProbeSpecError(exec_refusal(where))
    return dataclasses.replace(probe, exec=ExecProbe(confined_argv(probe.exec.command, user, where, euid)))


def confined_argv(argv: Sequence[str], user: str | None, where: str = "probe",
                  euid: int | None = None) -> tuple[str, ...]:
    """argv run as `user` (when the agent is root) with no new privileges: setuid binaries cannot raise
    it again. Raises ProbeSpecError when that would be root or the user does not exist."""
    import os
    import pwd

    euid = os.geteuid() if euid is None else euid
    out = [SETPRIV, "--no-new-privs"]
    if euid == 0:
        if not user:
            raise ProbeSpecError(f"{where}.exec: no user to run it as (set sidecar.user); never run as root")
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            raise ProbeSpecError(f"{where}.exec: user {user!r} (sidecar.user) does not exist") from None
        if pw.pw_uid == 0:
            raise ProbeSpecError(f"{where}.exec: sidecar.user {user!r} is root; an exec probe from the mesh "
                                 "never runs as root")
        out += [f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups"]
    # Not root: the probe runs as the agent's own (unprivileged) user.
    return (*out, "--", *argv)


def bundle_probe(workloadgroup: Mapping[str, Any] | None,
                 mesh: Mapping[str, Any] | None) -> ProbeConfig | None:
    """The probe a bundle carries: the WorkloadGroup's spec.probe, else mesh.yaml's
    defaultConfig.readinessProbe (istioctl's copy of it), else None. Raises ProbeSpecError."""
    spec = (workloadgroup or {}).get("spec") or {}
    if isinstance(spec, Mapping) and spec.get("probe"):
        return probe_from_istio(spec["probe"], "workloadgroup.yaml: spec.probe")
    default = (mesh or {}).get("defaultConfig") or {}
    if isinstance(default, Mapping) and default.get("readinessProbe"):
        return probe_from_istio(default["readinessProbe"], "mesh.yaml: defaultConfig.readinessProbe")
    return None
