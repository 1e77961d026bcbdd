"""The .deb's lifecycle under a real systemd: install, not-configured, bad config, upgrade, purge.

One machine per suite is booted for the whole module and the tests run in file order on it, as an
admin would: install, look, configure badly, upgrade, purge. Tests that need `mesh-agent run` are
skipped until the daemon exists (conftest.needs_daemon). Where the daemon is not needed to test the
packaging itself (restart on upgrade, the sandbox letting Python start), a stand-in service runs
under the real unit's settings: only ExecStart is replaced.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import __version__
from agent.bundle.hosts import HOSTS_BEGIN, HOSTS_END
from tests.system.conftest import NEXT_VERSION, BootFactory, needs_daemon, require_root
from tests.system.machine import Machine

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]

UNIT = "mesh-agent.service"
CONFIG = "/etc/mesh-agent/agent.yaml"
DEPENDS = ("python3-psutil", "python3-requests", "python3-kubernetes", "python3-yaml",
           "python3-systemd", "python3-watchdog")
STAND_IN = """\
import os, signal, sys, time
from systemd import daemon
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
daemon.notify("READY=1")
while True:
    daemon.notify("WATCHDOG=1")
    time.sleep(2)
"""


@pytest.fixture(scope="module", params=["bookworm", "trixie"])
def machine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            deb: Path) -> Iterator[Machine]:
    """A booted machine of the suite with the package installed by apt."""
    require_root()
    suite = request.param
    with Machine.boot(suite, tmp_path_factory.mktemp(suite)) as m:
        m.apt_update()
        m.install = m.install_deb(deb)  # type: ignore[attr-defined]
        yield m


def test_install_resolves_dependencies_from_debian(machine: Machine) -> None:
    status = machine.run(["dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\\n",
                          "mesh-agent", *DEPENDS]).stdout
    assert sorted(status.splitlines()) == sorted(f"{p} installed" for p in ("mesh-agent", *DEPENDS))
    assert machine.run(["mesh-agent", "version"]).stdout.strip() == f"mesh-agent {__version__}"
    # The private module is byte-compiled by the postinst and is not importable as `agent`.
    assert machine.run("ls /usr/lib/mesh-agent/agent/__pycache__/cli.*.pyc").ok
    assert not machine.run(["python3", "-c", "import agent"], check=False).ok
    assert machine.run(["dpkg-query", "-W", "-f=${Conffiles}", "mesh-agent"]).stdout.split()[0] == CONFIG


def test_unit_is_enabled(machine: Machine) -> None:
    assert machine.systemctl("is-enabled", UNIT).stdout.strip() == "enabled"
    assert "multi-user.target.wants/mesh-agent.service" in machine.install.stdout  # type: ignore[attr-defined]


def test_not_configured_is_skipped_not_failed(machine: Machine) -> None:
    """The shipped example holds only comments: the unit is skipped at install and on start."""
    for _ in range(2):  # the postinst's start, then an admin's
        props = machine.unit_properties(UNIT, "ActiveState", "Result", "ConditionResult", "NRestarts")
        assert props == {"ActiveState": "inactive", "Result": "exec-condition", "ConditionResult": "no",
                         "NRestarts": "0"}, machine.journal(UNIT)
        machine.systemctl("start", UNIT)  # exits 0: a skipped start is not an error
    assert "not configured" in machine.journal(UNIT)
    assert machine.systemctl("is-failed", UNIT, check=False).stdout.strip() == "inactive"


def test_sandbox_runs_python_under_the_real_unit(machine: Machine) -> None:
    """The unit's hardening lets Python with python3-systemd start, notify READY and stop cleanly."""
    with stand_in(machine):
        machine.systemctl("start", UNIT)
        assert machine.unit_property(UNIT, "ActiveState") == "active"
        machine.systemctl("stop", UNIT)
        props = machine.unit_properties(UNIT, "ActiveState", "Result", "NRestarts")
        assert props == {"ActiveState": "inactive", "Result": "success", "NRestarts": "0"}


@needs_daemon
def test_bad_config_fails_with_78_and_does_not_loop(machine: Machine) -> None:
    original = machine.read(CONFIG)
    machine.write(CONFIG, "bundle:\n  source: /nonexistent.tar.gz\nno_such_key: 1\n", mode=0o640)
    try:
        machine.systemctl("start", UNIT, check=False)
        machine.wait_unit(UNIT, {"failed"}, timeout=60)
        assert machine.unit_property(UNIT, "ExecMainStatus") == "78"
        time.sleep(7)  # longer than RestartSec: a restart would have happened by now
        props = machine.unit_properties(UNIT, "ActiveState", "NRestarts", "ExecMainStatus")
        assert props == {"ActiveState": "failed", "NRestarts": "0", "ExecMainStatus": "78"}
        assert "no_such_key" in machine.journal(UNIT)
    finally:
        machine.systemctl("stop", UNIT, check=False)
        machine.systemctl("reset-failed", UNIT, check=False)
        machine.write(CONFIG, original)


def test_deprovision_clears_instance_state_and_keeps_config(machine: Machine) -> None:
    hosts = machine.read("/etc/hosts") if machine.exists("/etc/hosts") else "127.0.0.1 localhost\n"
    config = machine.read(CONFIG)
    machine.write("/etc/hosts", f"{hosts}{HOSTS_BEGIN}\n10.9.9.9 istiod.istio-system.svc\n{HOSTS_END}\n")
    machine.run("mkdir -p /var/lib/mesh-agent/bundle && echo token > /var/lib/mesh-agent/bundle/istio-token")
    out = machine.run(["mesh-agent", "deprovision"]).stdout
    assert "managed block" in out
    assert machine.read("/etc/hosts") == hosts
    assert not machine.exists("/var/lib/mesh-agent/bundle")
    assert machine.read(CONFIG) == config
    with stand_in(machine):  # refuses while the service runs: the agent would restore it all
        machine.systemctl("start", UNIT)
        refused = machine.run(["mesh-agent", "deprovision"], check=False)
        assert refused.returncode == 1 and "systemctl stop" in refused.stderr


def test_security_exposure(machine: Machine) -> None:
    out = machine.run(["systemd-analyze", "security", "--no-pager", UNIT]).stdout
    print(out)
    score = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", out).group(1))  # type: ignore[union-attr]
    assert score <= 3.0


def test_upgrade_restarts_the_service_and_keeps_the_config(machine: Machine, deb_next: Path) -> None:
    """dh_installsystemd's restart-after-upgrade, with the admin's config kept without a prompt."""
    with stand_in(machine):
        machine.systemctl("start", UNIT)
        before = machine.unit_properties(UNIT, "InvocationID", "MainPID", "ActiveState")
        assert before["ActiveState"] == "active"
        machine.install_deb(deb_next)
        after = machine.unit_properties(UNIT, "InvocationID", "MainPID", "ActiveState", "NRestarts")
        assert after["ActiveState"] == "active", machine.journal(UNIT)
        assert after["InvocationID"] != before["InvocationID"]
        assert after["MainPID"] != before["MainPID"]
        assert machine.run(["mesh-agent", "version"]).stdout.strip() == f"mesh-agent {NEXT_VERSION}"
        assert machine.read(CONFIG) == STAND_IN_CONFIG
        assert machine.systemctl("is-enabled", UNIT).stdout.strip() == "enabled"
        machine.systemctl("stop", UNIT)


def test_purge_leaves_nothing_behind(machine: Machine, deb: Path, boot: BootFactory) -> None:
    """On a fresh machine with the dependencies already there, install, run, purge: the file
    system is as before (the dependencies stay, as apt leaves them)."""
    depends = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True, text=True,
                             check=True).stdout.strip()
    with boot(machine.suite) as m:
        m.run(["apt-get", "satisfy", "-y", "-q", depends], timeout=600)
        before = m.file_tree()
        m.install_deb(deb)
        with stand_in(m):  # the unit's own start creates the sidecar's and the agent's directories
            m.systemctl("start", UNIT)
        m.run("mkdir -p /var/lib/mesh-agent/bundle /run/mesh-agent && touch /run/mesh-agent/status.json")
        m.purge("mesh-agent")
        assert m.run(["dpkg-query", "-W", "-f=${db:Status-Status}", "mesh-agent"],
                     check=False).stdout in ("", "not-installed")
        for path in ("/etc/mesh-agent", "/usr/lib/mesh-agent", "/var/lib/mesh-agent", "/run/mesh-agent",
                     "/etc/systemd/system/multi-user.target.wants/mesh-agent.service"):
            assert not m.exists(path), path
        left = m.file_tree() - before
        assert not left, f"left behind after purge: {sorted(left)[:40]}"
        assert m.systemctl("show", UNIT, "-p", "LoadState").stdout.strip() == "LoadState=not-found"


# --- helpers ------------------------------------------------------------------------------------

STAND_IN_CONFIG = "# configured for a test\nbundle:\n  source: /var/lib/mesh-agent/test-bundle\n"


class stand_in:
    """Configure the agent and replace ExecStart (only) with a small notify service, for the
    packaging tests that must not wait for the daemon. Removed on exit."""

    DROPIN = "/etc/systemd/system/mesh-agent.service.d/stand-in.conf"
    SCRIPT = "/usr/local/lib/mesh-agent-stand-in.py"

    def __init__(self, machine: Machine) -> None:
        self.m = machine

    def __enter__(self) -> Machine:
        self.config = self.m.read(CONFIG)
        self.m.write(self.SCRIPT, STAND_IN)
        self.m.write(self.DROPIN, f"[Service]\nExecStart=\nExecStart=/usr/bin/python3 {self.SCRIPT}\n")
        self.m.write(CONFIG, STAND_IN_CONFIG, mode=0o640)
        self.m.systemctl("daemon-reload")
        return self.m

    def __exit__(self, *exc: object) -> None:
        self.m.systemctl("stop", UNIT, check=False)
        self.m.run(["rm", "-rf", self.DROPIN.rsplit("/", 1)[0], self.SCRIPT])
        self.m.write(CONFIG, self.config)
        self.m.systemctl("daemon-reload")
        self.m.systemctl("reset-failed", UNIT, check=False)
