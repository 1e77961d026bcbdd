"""Istio's probe -> ProbeConfig, probe building, the gRPC health messages and the /proc parsers."""

from __future__ import annotations

import struct

import pytest

from agent import config
from agent.health import probe_spec, probes
from agent.health.config import ExecProbe, HttpGetProbe, HttpHeader, ProbeConfig, TcpSocketProbe
from agent.health.listeners import parse_diag, parse_listeners, parse_stat
from agent.health.probe_spec import ProbeSpecError, probe_from_istio


def test_http_probe_with_every_field() -> None:
    cfg = probe_from_istio({
        "httpGet": {"path": "/ready", "port": 8080, "host": "10.0.0.5", "scheme": "HTTPS",
                    "httpHeaders": [{"name": "X-Probe", "value": "1"}]},
        "initialDelaySeconds": 5, "timeoutSeconds": 2, "periodSeconds": 7,
        "successThreshold": 2, "failureThreshold": 4,
    })
    assert cfg == ProbeConfig(
        http_get=HttpGetProbe(port=8080, path="/ready", host="10.0.0.5", scheme="HTTPS",
                              http_headers=(HttpHeader("X-Probe", "1"),)),
        initial_delay=5.0, timeout=2.0, period=7.0, success_threshold=2, failure_threshold=4)


def test_api_defaults() -> None:
    cfg = probe_from_istio({"httpGet": {"port": 80}})
    assert cfg.http_get == HttpGetProbe(port=80, path="/", host=None, scheme="HTTP")
    assert (cfg.initial_delay, cfg.timeout, cfg.period) == (0.0, 1.0, 10.0)
    assert (cfg.success_threshold, cfg.failure_threshold) == (1, 3)
    # The converter's defaults are the schema's defaults.
    assert cfg == ProbeConfig(http_get=cfg.http_get)


def test_zero_means_default_as_in_proto3() -> None:
    cfg = probe_from_istio({"tcpSocket": {"port": 9000}, "timeoutSeconds": 0, "periodSeconds": 0,
                            "failureThreshold": 0})
    assert (cfg.timeout, cfg.period, cfg.failure_threshold) == (1.0, 10.0, 3)
    assert cfg.tcp_socket == TcpSocketProbe(port=9000)


def test_exec_and_grpc() -> None:
    assert probe_from_istio({"exec": {"command": ["/bin/check", "--fast"]}}).exec == \
        ExecProbe(command=("/bin/check", "--fast"))
    g = probe_from_istio({"grpc": {"port": 9090, "service": "billing"}}).grpc
    assert (g.port, g.service) == (9090, "billing")


def test_lowercase_scheme_and_string_port_are_accepted() -> None:
    cfg = probe_from_istio({"httpGet": {"port": "8443", "scheme": "https"}})
    assert cfg.http_get.port == 8443 and cfg.http_get.scheme == "HTTPS"


@pytest.mark.parametrize(("spec", "message"), [
    ({}, "probe: a probe needs exactly one of httpGet, tcpSocket, exec, grpc"),
    ({"httpGet": {"port": 1}, "tcpSocket": {"port": 1}}, "(got httpGet, tcpSocket)"),
    ({"httpGet": {}}, "probe.httpGet.port: required"),
    ({"httpGet": {"port": "http"}}, "probe.httpGet.port: expected an integer, got 'http'"),
    ({"httpGet": {"port": 70000}}, "probe.httpGet.port: must be 1..65535, got 70000"),
    ({"httpGet": {"port": 80, "scheme": "FTP"}}, "probe.httpGet.scheme: expected HTTP or HTTPS"),
    ({"httpGet": {"port": 80, "httpHeaders": [{"value": "x"}]}},
     "probe.httpGet.httpHeaders[0].name: required"),
    ({"exec": {"command": []}}, "probe.exec.command: expected a non-empty list of strings"),
    ({"exec": {"command": "ls -l"}}, "probe.exec.command: expected a non-empty list"),
    ({"tcpSocket": {"port": 1}, "periodSecond": 5}, "probe.periodSecond: unknown key"),
    ({"tcpSocket": {"port": 1}, "timeoutSeconds": -1}, "probe.timeoutSeconds: must be 0..600"),
    ({"tcpSocket": {"port": 1}, "failureThreshold": True}, "probe.failureThreshold: expected an integer"),
    ("httpGet", "probe: expected a mapping"),
])
def test_bad_probes_are_refused_with_the_key(spec: object, message: str) -> None:
    with pytest.raises(ProbeSpecError) as err:
        probe_from_istio(spec, "probe")  # type: ignore[arg-type]
    assert message in str(err.value)


def test_agent_yaml_probe_parses_to_the_same_config() -> None:
    cfg = config.parse("""
bundle: {source: /tmp/b}
app:
  probe:
    http_get: {port: 8080, path: /ready}
    period: 7s
    failure_threshold: 4
""")
    assert cfg.app.probe == probe_from_istio({"httpGet": {"port": 8080, "path": "/ready"},
                                              "periodSeconds": 7, "failureThreshold": 4})


def test_build_probe_uses_the_default_host_when_none_given() -> None:
    p = probes.build_probe(probe_from_istio({"httpGet": {"port": 8080, "path": "ready"}}), "10.1.2.3")
    assert p.description == "http://10.1.2.3:8080/ready"
    p = probes.build_probe(probe_from_istio({"tcpSocket": {"port": 8080, "host": "::1"}}), "10.1.2.3")
    assert p.description == "tcp://[::1]:8080"
    assert probes.build_probe(probe_from_istio({"exec": {"command": ["true"]}})).description == "exec true"
    p = probes.build_probe(probe_from_istio({"grpc": {"port": 9090}}))
    assert p.description == "grpc://127.0.0.1:9090"


def test_default_probe_checks_every_port() -> None:
    assert probes.default_probe([80]).description == "tcp://127.0.0.1:80"
    assert probes.default_probe([80, 81]).description == "tcp://127.0.0.1:80, tcp://127.0.0.1:81"
    with pytest.raises(ValueError, match=r"set app\.ports or app\.probe"):
        probes.default_probe([])


def test_app_ports_precedence() -> None:
    assert probe_spec.app_ports((9000,), {"http": 8080}, "7000") == (9000,)
    assert probe_spec.app_ports((), {"http": 8080, "grpc": 9090}, "7000") == (8080, 9090)
    assert probe_spec.app_ports((), None, "8080, 8081,*") == (8080, 8081)
    assert probe_spec.app_ports((), {}, "*") == ()


def test_probe_ports() -> None:
    assert probes.probe_ports(None) == ()
    assert probes.probe_ports(probe_from_istio({"grpc": {"port": 9090}})) == (9090,)
    assert probes.probe_ports(probe_from_istio({"exec": {"command": ["x"]}})) == ()


def test_grpc_health_messages() -> None:
    assert probes.encode_health_request("") == b""
    assert probes.encode_health_request("a.B") == b"\x0a\x03a.B"
    assert probes.decode_health_response(b"") == 0
    assert probes.decode_health_response(b"\x08\x01") == 1
    # Unknown fields are skipped.
    assert probes.decode_health_response(b"\x12\x02hi\x08\x02") == 2
    with pytest.raises(ValueError):
        probes.decode_health_response(b"\x08")
    long = "s" * 200
    assert probes.encode_health_request(long)[:3] == b"\x0a\xc8\x01"


PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4242 1
   1: 0100007F:1F90 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000  1000        0 4343 1
   2: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99 1
   3: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1
"""


def test_parse_listeners_keeps_only_listening_sockets_on_wanted_ports() -> None:
    assert parse_listeners(PROC_NET_TCP, [8080]) == {8080: {4242, 4444}}
    assert parse_listeners(PROC_NET_TCP, [22, 9999]) == {22: {99}}


def test_parse_stat() -> None:
    fields = ["Z", "1", "0", "0", "0", "0", "4194564"] + ["0"] * 12 + ["123456"] + ["0"] * 29 + ["9"]
    st = parse_stat("77 (my (odd) app) " + " ".join(fields))
    assert (st.state, st.flags, st.start_ticks, st.name, st.exit_status) == ("Z", 4194564, 123456,
                                                                             "my (odd) app", 9)
    assert st.exiting
    fields[0], fields[6] = "R", str(0x400000 | 0x4)  # running, but in do_exit()
    assert parse_stat("77 (a) " + " ".join(fields)).exiting
    fields[6] = str(0x400000)
    assert not parse_stat("77 (a) " + " ".join(fields)).exiting


def _diag_msg(port: int, inode: int) -> bytes:
    # inet_diag_msg: family, state, timer, retrans, sockid (48), expires, rqueue, wqueue, uid, inode
    body = bytes([2, 10, 0, 0]) + struct.pack("!HH", port, 0) + bytes(44) + bytes(16)
    body += struct.pack("=I", inode)
    return struct.pack("=IHHII", 16 + len(body), 20, 2, 1, 0) + body


def test_parse_sock_diag_reply() -> None:
    out: dict[int, set[int]] = {}
    done = parse_diag(_diag_msg(8080, 77) + _diag_msg(22, 5) + _diag_msg(8080, 78), {8080}, out)
    assert not done and out == {8080: {77, 78}}
    assert parse_diag(struct.pack("=IHHII", 20, 3, 2, 1, 0) + bytes(4), {8080}, out)
    with pytest.raises(OSError):
        parse_diag(struct.pack("=IHHIIi", 36, 2, 0, 1, 0, -13) + bytes(16), {8080}, out)
