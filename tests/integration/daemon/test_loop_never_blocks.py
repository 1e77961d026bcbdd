"""The loop keeps feeding systemd's watchdog while slow work runs: the sidecar package install (a slow
download, then dpkg) and a proxy restart. Under WatchdogSec=30s a loop that waited on them would be
killed by systemd in the middle of an install."""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from devkit.rig import Rig, rig
from devkit.waiting import wait_for
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
            def do_GET(self) -> None:
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


def test_an_idle_agent_still_pings_the_watchdog_within_its_interval(tmp_path: Path) -> None:
    # Idle, the loop sleeps until its parts' next deadline; the watchdog's ping is one of them.
    # WatchdogSec=4s: a ping is due every 2 s, more often than anything else wakes an idle agent.
    notify = NotifySocket()
    try:
        with rig(tmp_path) as r:
            r.prepare()
            r.start_app()
            r.start_agent({"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "4000000"})
            wait_for(r.entry, 60, "registration")
            wait_for(lambda: notify.first("READY=1"), 30, "READY=1")
            since = time.monotonic()
            time.sleep(9)
            pings = [t for t, fields in list(notify.messages) if "WATCHDOG=1" in fields and t >= since - 4]
            gaps = [b - a for a, b in itertools.pairwise(pings)]
            # systemd kills a unit whose pings are 4 s apart; at half the interval there are 4-5 here.
            assert len(pings) >= 4 and max(gaps) < 4.0, gaps
            assert r.stop_agent() == 0
    finally:
        notify.close()


SLOW_PILOT_AGENT = '''
import os, signal, subprocess, sys, time

def note(word):
    with open(os.environ["STANDIN_RECORD"], "a") as f:
        f.write(f"{word} {time.monotonic()} {os.getpid()}\\n")

if sys.argv[1:2] != ["proxy"]:
    sys.exit(0)
envoy = subprocess.Popen([os.environ["STANDIN_ENVOY"], "-c", os.environ["STANDIN_BOOTSTRAP"],
                          "--base-id", os.environ["STANDIN_BASE_ID"], "-l", "warning"])
note("started")

def slow_stop(signum, frame):
    note("sigterm")
    time.sleep(float(os.environ["STANDIN_STOP_DELAY"]))  # as a pilot-agent draining long connections
    envoy.terminate()

signal.signal(signal.SIGTERM, slow_stop)
envoy.wait()
note("exited")
'''


def test_the_watchdog_is_fed_while_the_proxy_restarts_slowly(tmp_path: Path) -> None:
    """istio profile: a changed cluster.env restarts pilot-agent; this one takes 5 s to stop."""
    import signal as sig
    import tempfile

    import yaml

    from devkit.envoy import free_base_id, reachable_envoy
    from devkit.rig import envoy_bootstrap

    shared = Path(tempfile.mkdtemp(prefix="mesh-agent-slow-"))  # the proxy's user (nobody) reads it
    shared.chmod(0o755)
    notify = NotifySocket()
    try:
        with rig(tmp_path) as r:
            r.prepare()
            (shared / "pilot-agent").write_text("#!/usr/bin/python3\n" + SLOW_PILOT_AGENT)
            (shared / "pilot-agent").chmod(0o755)
            (shared / "bootstrap.yaml").write_text(yaml.safe_dump(
                envoy_bootstrap(r.admin_port, r.listener_port, r.app_port)))
            record = shared / "calls"
            record.touch()
            record.chmod(0o666)
            env_file = r.root / "var/lib/istio/envoy/sidecar.env"
            env_file.parent.mkdir(parents=True)
            env_file.write_text(f"STANDIN_RECORD={record}\nSTANDIN_ENVOY={reachable_envoy()}\n"
                                f"STANDIN_BOOTSTRAP={shared / 'bootstrap.yaml'}\n"
                                f"STANDIN_BASE_ID={free_base_id()}\nSTANDIN_STOP_DELAY=5\n")
            r.overrides = {"sidecar": {"profile": "istio", "pilot_agent_binary": str(shared / "pilot-agent"),
                                       "user": "nobody", "manage_iptables": False,
                                       "readiness_url": f"http://127.0.0.1:{r.admin_port}/ready",
                                       "drain_timeout": "0s", "stop_grace": "10s"}}
            r.write_config()
            r.start_app()
            r.start_agent({"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "1000000"})
            try:
                wait_for(r.entry, 60, "registration")
            except AssertionError as exc:
                raise AssertionError(f"{exc}\nagent log:\n{r.log_text()[-6000:]}\nstand-in record:\n"
                                     f"{record.read_text()}") from None

            def lines(word: str) -> list[tuple[float, int]]:
                return [(float(t), int(p)) for w, t, p in (line.split() for line in record.read_text().splitlines())
                        if w == word]

            first_pid = lines("started")[0][1]
            files = r.bundle_files()
            files["cluster.env"] += b"ISTIO_META_REVISION='canary'\n"
            from devkit import bundles as bundlekit

            bundlekit.write_dir(r.bundle_dir, files)
            assert r.agent is not None
            r.agent.send_signal(sig.SIGHUP)  # re-read the bundle: cluster.env changed, pilot-agent restarts
            wait_for(lambda: lines("exited"), 30, "the old pilot-agent to stop")
            wait_for(lambda: len(lines("started")) >= 2, 30, "a new pilot-agent")
            (term_at, term_pid), = lines("sigterm")
            (exit_at, _), = lines("exited")
            assert term_pid == first_pid
            pings = [t for t, fields in list(notify.messages) if "WATCHDOG=1" in fields and term_at <= t <= exit_at]
            # A loop waiting for the old proxy to stop would send none during those 5 s.
            assert len(pings) >= 3, (len(pings), exit_at - term_at)
            wait_for(r.entry, 30, "the entry, behind the new proxy")
            assert r.stop_agent() == 0
    finally:
        notify.close()
        import shutil as sh

        sh.rmtree(shared, ignore_errors=True)
