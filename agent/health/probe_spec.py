"""Which probe and which ports to watch, as the mesh and agent.yaml give them.

`probe_from_istio()` turns Istio's camelCase probe (a WorkloadGroup's `spec.probe`, or mesh.yaml's
`defaultConfig.readinessProbe`) into the agent's ProbeConfig, with the API-documented defaults;
`mesh_probe()` makes a probe from the mesh safe to run here (an exec probe is refused, or confined);
`bundle_probe()` picks the bundle's probe and `app_ports()` the app's ports.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from agent.health.config import (
    ExecProbe,
    GrpcProbe,
    HttpGetProbe,
    HttpHeader,
    ProbeConfig,
    TcpSocketProbe,
)
from agent.units import Duration


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
