"""A Debian 12 VM upgraded in place to Debian 13 keeps the agent working.

The .deb is installed on bookworm, configured and registered against the emulator, as in
test_lifecycle.py; then apt's sources are switched to trixie and the real `apt-get dist-upgrade` runs in
the booted machine, under the running agent (python3 3.11 -> 3.13, python3-kubernetes 22.6 -> 30.1,
systemd 252 -> 257). The package itself is not upgraded: its files, byte-compiled for 3.11, must serve
3.13. The new /usr/bin/python3 triggers the package (debian/mesh-agent.triggers): at the end of the
upgrade the agent is restarted onto 3.13, keeping its entry; then `apt-get autoremove` takes python3.11
away, which would break an agent left on it (its stop could no longer withdraw the entry). The
shutdown withdraws the entry; the same root file system boots again and the unit comes back by itself:
registered, `mesh-agent doctor` passing, `mesh-agent status` answering, the admin's agent.yaml as it was,
and a stop withdrawing the entry.

The .debs the upgrade downloads (about 70 MB) are kept in the shared trixie cache, so later runs only
unpack them.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devkit import bundles
from devkit.kubeapi.server import KubeAPI
from devkit.ports import free_port
from devkit.waiting import wait_for
from tests.system import rootfs
from tests.system.conftest import needs_daemon, require_root
from tests.system.machine import Machine
from tests.system.test_lifecycle import CONFIG, HOSTS, INPUTS, UNIT, World, _inputs, _registered

pytestmark = [pytest.mark.system, needs_daemon, pytest.mark.timeout(1800)]

FROM, TO = "bookworm", "trixie"
# Cold, the upgrade downloads its .debs (about 70 MB) first: 20 times what it takes here, for a slow
# mirror and a busy machine.
UPGRADE_TIMEOUT = 1200.0


@pytest.fixture
def istiod() -> Iterator[int]:
    """A port on the host's loopback that accepts connections, standing in for istiod (doctor's check)."""
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        yield port


def _bundle_for_doctor(w: World, istiod_port: int) -> None:
    """istiod at the listening port, and a token that outlives a slow (cold) run."""
    for name in ("cluster.env", "mesh.yaml"):
        path = f"{INPUTS}/bundle/{name}"
        w.m.write(path, w.m.read(path).replace(":15012", f":{istiod_port}"), mode=0o600)
    w.m.write(f"{INPUTS}/bundle/istio-token", bundles.make_token(time.time(), lifetime=6 * 3600).decode(),
              mode=0o600)


def _facts(m: Machine) -> dict[str, str]:
    """The release, the Python and the kubernetes client the machine has now."""
    def version(package: str) -> str:
        return m.run(["dpkg-query", "-W", "-f=${Version}", package]).stdout

    return {"debian": m.read("/etc/debian_version").strip(),
            "python3": m.run(["python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"]).stdout.strip(),
            "kubernetes": version("python3-kubernetes"), "systemd": version("systemd")}


def _dist_upgrade(m: Machine) -> None:
    """Debian's way: sources to the next release, update, dist-upgrade; no questions, the admin's
    configuration files kept (the machine's apt.conf says --force-confdef --force-confold)."""
    m.write("/etc/apt/sources.list", f"deb {rootfs.MIRROR} {TO} main\n")
    m.apt_update()
    started = time.monotonic()
    r = m.run(["apt-get", "dist-upgrade", "-y", "-q"], timeout=UPGRADE_TIMEOUT)
    print(f"dist-upgrade: {time.monotonic() - started:.0f}s, "
          f"{r.stdout.count('Unpacking ')} packages unpacked")


def _autoremove(m: Machine) -> list[str]:
    """The release notes' last step: what nothing needs any more goes (python3.11 among it)."""
    out = m.run(["apt-get", "autoremove", "--purge", "-y", "-q"], timeout=600).stdout
    return sorted(re.findall(r"^Removing (\S+?)(?::\w+)? \(", out, re.MULTILINE))


def _interpreter(m: Machine, pid: str) -> str:
    """The executable a process inside runs (e.g. python3.13), from the machine's /proc."""
    return os.path.basename(os.readlink(m.path(f"/proc/{pid}/exe")))


def _pycache(m: Machine) -> tuple[set[str], set[str]]:
    """The private package's modules, and the compiled files beside them (module-relative, with tag)."""
    out = m.run("cd /usr/lib/mesh-agent && find agent -name '*.py' -o -name '*.pyc'").stdout.split()
    return {p for p in out if p.endswith(".py")}, {p for p in out if p.endswith(".pyc")}


def _doctor(m: Machine) -> list[dict[str, str]]:
    r = m.run(["mesh-agent", "doctor"], check=False, timeout=120)
    print(r.stdout)
    assert r.returncode == 0, f"doctor failed:\n{r.stdout}\n{r.stderr}"
    checks = json.loads(m.run(["mesh-agent", "doctor", "--json"], timeout=120).stdout)
    assert not [c for c in checks if c["result"] == "fail"], checks
    return checks


def test_dist_upgrade_to_trixie_keeps_the_agent_working(tmp_path: Path, deb: Path, istiod: int) -> None:
    require_root()
    api = KubeAPI(state_dir=tmp_path / "kubeapi").start()
    workdir = tmp_path / "machine"  # booted twice: the second boot is the same root file system, rebooted
    # The upgrade's downloads go to the trixie cache; the bookworm one is read too.
    caches = (TO, FROM)
    try:
        with Machine.boot(FROM, workdir, archives=caches) as m:
            m.apt_update()
            m.write("/etc/hosts", HOSTS)
            w = World(m, api, deb)
            m.install_deb(deb)  # first: it brings python3, which the sample app needs too
            _inputs(w, app_at_boot=True)
            _bundle_for_doctor(w, istiod)
            m.write(CONFIG, w.good_config, mode=0o640)
            m.systemctl("enable", "--now", UNIT, timeout=200)
            _registered(w)
            before = _facts(m)
            assert before["debian"].startswith("12.") and before["python3"] == "3.11", before
            uid = w.entry()["metadata"]["uid"]  # type: ignore[index]
            pid = w.main_pid()
            cursor = m.journal_cursor()

            _dist_upgrade(m)

            after = _facts(m)
            print(f"upgraded: {before} -> {after}")
            assert after["debian"].startswith("13.") and after["python3"] == "3.13", after
            assert after["kubernetes"].startswith("30."), after
            assert m.run(["dpkg-query", "-W", "-f=${db:Status-Status}", "mesh-agent"]).stdout == "installed"
            # The private package is byte-compiled for the new Python (dh_python3's rtupdate hook), every
            # module, and nothing is left for the old one.
            modules, compiled = _pycache(m)
            wanted = {f"{p.rpartition('/')[0]}/__pycache__/{p.rpartition('/')[2][:-3]}.cpython-313.pyc"
                      for p in modules}
            assert compiled == wanted, sorted(compiled ^ wanted)[:20]
            # The new /usr/bin/python3 triggered the package: once the upgrade was done, the agent was
            # restarted onto 3.13 (a restart: the entry kept), never crashed meanwhile.
            _registered(w)
            journal = "\n".join(line for line in m.journal(UNIT, after=cursor).splitlines()
                                 if " envoy[" not in line)  # the agent's and systemd's lines
            new_pid = w.main_pid()
            assert new_pid != pid and _interpreter(m, new_pid) == "python3.13", journal
            assert m.unit_property(UNIT, "NRestarts") == "0", journal
            assert "systemd is restarting mesh-agent: the entry stays registered" in journal
            entry = w.entry()
            assert entry is not None and entry["metadata"]["uid"] == uid, journal
            # Then what nothing needs any more goes, the old interpreter with it: the agent runs on.
            removed = _autoremove(m)
            print(f"autoremove: {' '.join(removed)}")
            assert "python3.11" in removed
            assert w.main_pid() == new_pid and w.status()["registration"]["registered"] is True
        # The shutdown stopped the agent, which withdrew the entry.
        assert w.entry() is None

        with Machine.boot(FROM, workdir, archives=caches) as m:
            w.m = m
            assert m.read("/etc/debian_version").startswith("13.")
            # Enabled: the unit starts at boot, without anyone asking.
            _registered(w, timeout=180)
            assert w.entry() is not None
            assert m.read(CONFIG) == w.good_config  # the conffile as the admin wrote it
            conffiles = m.run(["dpkg-query", "-W", "-f=${Conffiles}", "mesh-agent"]).stdout.split()
            assert conffiles[0] == CONFIG and "obsolete" not in conffiles, conffiles
            checks = {c["name"]: c["result"] for c in _doctor(m)}
            for name in ("config", "bundle", "sidecar", "istiod CA", "API", "RBAC", "WorkloadGroup", "ports"):
                assert checks.get(name) == "pass", checks
            text = m.run(["mesh-agent", "status"]).stdout  # exit 0: the agent runs
            assert f"{w.entry_name} registered" in text, text
            status = w.status()
            assert status["registration"]["registered"] is True and status["sidecar"]["ready"] is True, status
            assert len(w.envoys()) == 1
            assert m.run(["mesh-agent", "version"]).ok
            m.systemctl("stop", UNIT, timeout=120)
            props = m.unit_properties(UNIT, "ActiveState", "Result", "ExecMainStatus")
            assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, \
                m.journal(UNIT, lines=60)
            wait_for(lambda: w.entry() is None, 30, "the entry to be withdrawn")
            assert w.envoys() == []
    finally:
        api.stop()
