"""The loop keeps feeding systemd's watchdog while slow work runs: the sidecar package install (a slow
download, then dpkg) and a proxy restart. Under WatchdogSec=30s a loop that waited on them would be
killed by systemd in the middle of an install."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.agentkit import Rig, rig, wait_for
from tests.integration.daemon.test_daemon import NotifySocket

pytestmark = [
    pytest.mark.subprocess, pytest.mark.timeout(180),
    pytest.mark.skipif(os.geteuid() != 0, reason="dpkg --root installs need root"),
    pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb"),
]

CHUNKS = 12
PAUSE = 0.5  # between chunks: the download takes about 6 s


def small_deb(out: Path, version: str) -> Path:
    """An istio-sidecar .deb without Envoy (the rig's envoy profile runs the test's own Envoy)."""
    stage = out / "stage"
    (stage / "DEBIAN").mkdir(parents=True)
    (stage / "DEBIAN/control").write_text(
        f"Package: istio-sidecar\nVersion: {version}\nArchitecture: all\nMaintainer: test <t@example.com>\n"
        "Description: Istio sidecar for tests\n")
    (stage / "usr/local/bin").mkdir(parents=True)
    (stage / "usr/local/bin/pilot-agent").write_text("#!/bin/sh\nexit 0\n")
    (stage / "usr/local/bin/pilot-agent").chmod(0o755)
    deb = out / f"istio-sidecar_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(stage), str(deb)], check=True,
                   capture_output=True)
    return deb


class SlowServer:
    """Serves one file over HTTP on loopback in CHUNKS pieces, PAUSE apart; records when it sent them."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.started: float | None = None
        self.finished: float | None = None
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                owner.started = time.monotonic()
                self.send_response(200)
                self.send_header("Content-Length", str(len(owner.body)))
                self.end_headers()
                step = -(-len(owner.body) // CHUNKS)
                for i in range(0, len(owner.body), step):
                    self.wfile.write(owner.body[i:i + step])
                    self.wfile.flush()
                    time.sleep(PAUSE)
                owner.finished = time.monotonic()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/istio-sidecar.deb"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def r(tmp_path: Path) -> Iterator[Rig]:
    with rig(tmp_path) as rg:
        rg.prepare()
        for d in ("var/lib/dpkg/info", "var/lib/dpkg/updates"):  # an empty dpkg database in the VM's root
            (rg.root / d).mkdir(parents=True, exist_ok=True)
        (rg.root / "var/lib/dpkg/status").touch()
        rg.start_app()
        yield rg


def test_the_watchdog_is_fed_while_the_sidecar_package_downloads_and_installs(r: Rig, tmp_path: Path) -> None:
    deb = small_deb(tmp_path, "1.2.3")
    server = SlowServer(deb.read_bytes())
    notify = NotifySocket()
    try:
        r.overrides = {"sidecar": {"package": {"url": server.url, "version": "1.2.3",
                                               "sha256": hashlib.sha256(deb.read_bytes()).hexdigest()}}}
        r.write_config()
        r.start_agent({"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "1000000"})  # a ping every 0.5 s
        wait_for(lambda: server.finished, 60, "the package download to end")
        wait_for(lambda: notify.first("READY=1"), 60, "READY=1 after the package and the proxy")
        assert server.started is not None and server.finished is not None
        pings = [t for t, fields in list(notify.messages)
                 if "WATCHDOG=1" in fields and server.started <= t <= server.finished]
        # A loop blocked in the download would send none while it lasts (about 6 s).
        assert len(pings) >= 3, (len(pings), server.finished - server.started)
        # Before READY=1, systemd's start timeout is extended while the package installs.
        extended = notify.first(next((f for f in notify.fields() if f.startswith("EXTEND_TIMEOUT_USEC=")), "-"))
        ready = notify.first("READY=1")
        assert extended is not None and ready is not None and extended < ready
        listed = subprocess.run(["dpkg-query", f"--admindir={r.root / 'var/lib/dpkg'}", "-W", "-f",
                                 "${Version}", "istio-sidecar"], capture_output=True, text=True)
        assert listed.stdout == "1.2.3"
        assert r.entry() is not None  # and the VM went on to register
        assert r.stop_agent() == 0
    finally:
        notify.close()
        server.close()
