"""Each probe kind against real servers in their own processes: passing, failing, timing out."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import psutil
import pytest
import trustme

from agent.health import probes

from .conftest import Apps

OK_TIMEOUT = 10.0  # for checks that should get an answer: generous, so a loaded machine passes


def test_http_status_200_to_399_pass_others_fail(apps: Apps, tmp_path: Path) -> None:
    status = tmp_path / "status"
    app = apps.start("http", "--status-file", str(status))
    probe = probes.HttpProbe("127.0.0.1", app.port, "/ready")
    for code, ok in (("200", True), ("302", True), ("399", True), ("404", False), ("500", False)):
        status.write_text(code)
        r = probe.check(OK_TIMEOUT)
        assert (r.ok, r.reason) == (ok, f"HTTP {code}")
        assert 0 < r.latency < OK_TIMEOUT


def test_http_headers_are_sent(apps: Apps) -> None:
    app = apps.start("http")
    bare = probes.HttpProbe("127.0.0.1", app.port, "/", headers=[("X-Require", "probe")])
    assert bare.check(OK_TIMEOUT).reason == "HTTP 403"
    with_header = probes.HttpProbe("127.0.0.1", app.port, "/",
                                   headers=[("X-Require", "probe"), ("X-Probe", "yes")])
    assert with_header.check(OK_TIMEOUT).ok


def test_https_with_an_untrusted_certificate_passes(apps: Apps, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("app.example")  # a name that does not match 127.0.0.1, from an unknown CA
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "cert.pem"))
    app = apps.start("https", "--cert", str(tmp_path / "cert.pem"), "--key", str(tmp_path / "cert.pem"))
    r = probes.HttpProbe("127.0.0.1", app.port, "/", "HTTPS").check(OK_TIMEOUT)
    assert r.ok and r.reason == "HTTP 200"
    # Speaking plain HTTP to it fails.
    assert not probes.HttpProbe("127.0.0.1", app.port, "/", "HTTP").check(OK_TIMEOUT).ok


def test_http_to_a_closed_port_fails(apps: Apps) -> None:
    app = apps.start("tcp")
    port = app.port
    app.kill()
    r = probes.HttpProbe("127.0.0.1", port).check(1.0)
    assert not r.ok and r.reason == "connection refused"


@pytest.mark.parametrize("scheme", ["HTTP", "HTTPS"])
def test_a_server_that_accepts_but_never_answers_times_out(apps: Apps, scheme: str) -> None:
    app = apps.start("hang")
    start = time.monotonic()
    r = probes.HttpProbe("127.0.0.1", app.port, "/", scheme).check(0.5)
    assert not r.ok and r.reason == "timed out"
    assert time.monotonic() - start < 3.0
    # It does accept, so a TCP probe passes.
    assert probes.TcpProbe("127.0.0.1", app.port).check(0.5).ok


def test_a_response_trickling_past_the_timeout_fails(apps: Apps) -> None:
    app = apps.start("trickle")
    start = time.monotonic()
    r = probes.HttpProbe("127.0.0.1", app.port).check(1.0)
    assert not r.ok and r.reason == "timed out"
    assert time.monotonic() - start < 3.0  # each byte comes within the timeout: only a deadline stops it


def test_tcp_pass_and_fail(apps: Apps) -> None:
    app = apps.start("tcp")
    r = probes.TcpProbe("127.0.0.1", app.port).check(OK_TIMEOUT)
    assert r.ok
    port = app.port
    app.kill()
    r = probes.TcpProbe("127.0.0.1", port).check(1.0)
    assert not r.ok and r.reason == f"port {port}: connection refused"
    both = probes.default_probe([apps.start("tcp").port, port])
    assert not both.check(1.0).ok


def test_exec_exit_status() -> None:
    assert probes.CommandProbe(["true"]).check(OK_TIMEOUT).ok
    script = "import sys; print('db down', file=sys.stderr); sys.exit(3)"
    result = probes.CommandProbe([sys.executable, "-c", script]).check(OK_TIMEOUT)
    assert not result.ok and result.reason == "exit 3: db down"
    missing = probes.CommandProbe(["/nonexistent/check"]).check(1.0)
    assert not missing.ok and "cannot run /nonexistent/check" in missing.reason


def test_exec_is_not_run_by_a_shell(tmp_path: Path) -> None:
    marker = tmp_path / "x"
    r = probes.CommandProbe(["echo", f"; touch {marker}"]).check(OK_TIMEOUT)
    assert r.ok and not marker.exists()


def test_exec_timeout_kills_the_whole_process_group() -> None:
    marker = f"{60 + os.getpid() % 1000 / 1000:.3f}"  # a sleep argument no other process uses
    start = time.monotonic()
    r = probes.CommandProbe(["sh", "-c", f"sleep {marker} & sleep {marker}; wait"]).check(1.0)
    assert not r.ok and r.reason == "timed out after 1s"
    assert time.monotonic() - start < 10.0

    def survivors() -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter(["cmdline", "status"]):
            if p.info["cmdline"] == ["sleep", marker] and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(p)
        return out

    deadline = time.monotonic() + 10
    while (left := survivors()) and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in left:
        p.kill()
    assert not left, "the probe's background child survived its timeout"


needs_grpc = pytest.mark.skipif(not probes.grpc_available(), reason="grpcio is not installed")


@needs_grpc
def test_grpc_serving_and_not_serving(apps: Apps, tmp_path: Path) -> None:
    status = tmp_path / "status"
    app = apps.start("grpc", "--status-file", str(status))
    probe = probes.GrpcHealthProbe("127.0.0.1", app.port, "billing")
    r = probe.check(OK_TIMEOUT)
    assert (r.ok, r.reason) == (True, "SERVING")
    status.write_text("NOT_SERVING")
    assert probe.check(OK_TIMEOUT).reason == "NOT_SERVING"
    app.kill()
    r = probe.check(1.0)
    assert not r.ok and r.reason.startswith("rpc UNAVAILABLE")


@needs_grpc
def test_grpc_against_a_server_that_never_answers(apps: Apps) -> None:
    app = apps.start("hang")
    start = time.monotonic()
    r = probes.GrpcHealthProbe("127.0.0.1", app.port).check(0.5)
    assert not r.ok and r.reason == "timed out"
    assert time.monotonic() - start < 3.0
