"""The notify helper against a real unix datagram socket, as systemd would bind it."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import systemd


def _bind(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + address[1:] if address.startswith("@") else address)
    sock.settimeout(2)
    return sock


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    if request.param == "path":
        address = str(tmp_path / "notify.sock")
    else:
        address = f"@mesh-agent-test-{uuid.uuid4().hex}"
    sock = _bind(address)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    yield sock
    sock.close()


def _received(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_ready_with_status(notify_socket: socket.socket) -> None:
    assert systemd.ready("registered billing-10-0-0-5\n(app healthy)") is True
    assert _received(notify_socket) == ["READY=1", "STATUS=registered billing-10-0-0-5 (app healthy)"]


def test_each_message_kind(notify_socket: socket.socket) -> None:
    assert systemd.status("draining")
    assert _received(notify_socket) == ["STATUS=draining"]
    assert systemd.watchdog_ping()
    assert _received(notify_socket) == ["WATCHDOG=1"]
    assert systemd.stopping("withdrawing entry")
    assert _received(notify_socket) == ["STOPPING=1", "STATUS=withdrawing entry"]
    assert systemd.extend_timeout(12.5)
    assert _received(notify_socket) == ["EXTEND_TIMEOUT_USEC=12500000"]


def test_reloading_carries_monotonic_usec(notify_socket: socket.socket) -> None:
    import time

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert systemd.reloading()
    fields = _received(notify_socket)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert fields[0] == "RELOADING=1"
    key, _, value = fields[1].partition("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after


def test_no_op_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.ready() is False
    assert systemd.watchdog_ping() is False


def test_socket_gone_is_reported_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    assert systemd.status("x") is False


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval() is None  # meant for another process
    monkeypatch.delenv("WATCHDOG_PID")
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_USEC", "junk")
    assert systemd.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert systemd.watchdog_interval() is None


@pytest.mark.subprocess
@pytest.mark.parametrize(("listing", "job"), [
    ("41 mesh-agent.service restart running\n", "restart"),
    ("41 mesh-agent.service stop running\n", "stop"),
    ("41 other.service restart running\n", None),
    ("", None),
])
def test_pending_job_reads_systemctl_list_jobs(listing: str, job: str | None, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "systemctl"
    fake.write_text(f"#!/bin/sh\n[ \"$1\" = list-jobs ] && printf '{listing}'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("NOTIFY_SOCKET", "@unused")
    assert systemd.pending_job("mesh-agent.service") == job


def test_no_pending_job_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.pending_job("mesh-agent.service") is None
