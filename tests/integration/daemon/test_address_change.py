"""The whole agent in a network namespace of the test's own: the API emulator, the app, Envoy and the
agent all run inside it (its loopback), and the VM's address is on its eth0, which the test changes
live with `ip addr`. The agent moves its WorkloadEntry without a restart."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from devkit.netns import NetNs, unavailable
from devkit.rig import Rig, rig
from devkit.waiting import wait_for

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(unavailable() is not None, reason=unavailable() or "")]

OLD, NEW, RELOADED = "10.77.0.5", "10.78.0.6", "10.79.0.7"  # the namespace's own addresses


@pytest.fixture
def r(tmp_path: Path) -> Iterator[Rig]:
    with NetNs() as ns:
        ns.ip("addr", "add", f"{OLD}/24", "dev", "eth0")
        ns.set_default_route(4)
        # Everything the rig starts from here on lives in the namespace.
        with ns.entered(), rig(tmp_path, registry={"address": {"watch": "300ms"}}) as rg:
            rg.svc_ip = None  # no ISTIO_SVC_IP: the agent finds the address on eth0
            rg.prepare()
            rg.start_app()
            rg.ns = ns  # type: ignore[attr-defined]
            yield rg


def test_a_new_address_moves_the_entry_without_a_restart(r: Rig) -> None:
    ns: NetNs = r.ns  # type: ignore[attr-defined]
    old, new = r.entry_at(OLD), r.entry_at(NEW)
    r.start_agent()
    first = wait_for(lambda: r.entry(old), 60, "registration at the first address")
    assert first["spec"]["address"] == OLD
    agent_pid = r.agent.pid if r.agent else None

    # DHCP hands out another address: the new one comes, the old one goes.
    ns.ip("addr", "add", f"{NEW}/24", "dev", "eth0")
    ns.ip("addr", "del", f"{OLD}/24", "dev", "eth0")
    moved = wait_for(lambda: r.entry(new), 30, "the entry at the new address")
    assert moved["spec"]["address"] == NEW
    assert moved["metadata"]["labels"]["app"] == "billing"
    wait_for(lambda: r.entry(old) is None and r.lease(old) is None, 30, "the old entry and its lease withdrawn")
    assert r.lease(new)["spec"]["holderIdentity"] == first["metadata"]["annotations"]["mesh-agent.io/instance"]
    assert r.agent is not None and r.agent.poll() is None and r.agent.pid == agent_pid
    log = r.log_text()
    assert f"address changed: {OLD} -> {NEW}" in log
    wait_for(lambda: json.loads(r.status_file.read_text())["registration"].get("entry") == new, 10,
             "status naming the new entry")
    registration = json.loads(r.status_file.read_text())["registration"]
    assert registration["address"] == NEW and registration["address_changes"] == 1

    # A reload that fixes the address moves it again (and stops watching).
    ns.ip("addr", "add", f"{RELOADED}/24", "dev", "eth0")
    r.overrides = {"registry": {"address": {"value": RELOADED}}}
    r.write_config()
    r.agent.send_signal(signal.SIGHUP)
    third = r.entry_at(RELOADED)
    wait_for(lambda: r.entry(third), 30, "the entry at the configured address")
    wait_for(lambda: r.entry(new) is None and r.lease(new) is None, 30, "the previous entry withdrawn")

    assert r.stop_agent() == 0
    assert r.entry(third) is None and r.lease(third) is None


def test_ipv6_only_the_fit_address_is_registered_and_followed(tmp_path: Path) -> None:
    """family: ipv6 on a dual-stack eth0: a deprecated address is never taken; a renumbering moves it."""
    with NetNs() as ns:
        ns.ip("addr", "add", f"{OLD}/24", "dev", "eth0")
        ns.ip("-6", "addr", "add", "2001:db8:77::4/64", "dev", "eth0", "nodad", "preferred_lft", "0")
        ns.ip("-6", "addr", "add", "2001:db8:77::5/64", "dev", "eth0", "nodad")
        ns.set_default_route(4)
        ns.set_default_route(6)
        with ns.entered(), rig(tmp_path, registry={"address": {"family": "ipv6", "watch": "300ms"}}) as r:
            r.svc_ip = None
            r.prepare()
            r.start_app()
            r.start_agent()
            first = wait_for(lambda: r.entry(r.entry_at("2001:db8:77::5")), 60, "registration at the IPv6 address")
            assert first["spec"]["address"] == "2001:db8:77::5"
            assert first["metadata"]["name"] == "billing-2001-db8-77--5"
            ns.ip("-6", "addr", "add", "2001:db8:78::6/64", "dev", "eth0", "nodad")
            ns.ip("-6", "addr", "del", "2001:db8:77::5/64", "dev", "eth0")
            wait_for(lambda: r.entry(r.entry_at("2001:db8:78::6")), 30, "the entry at the new IPv6 address")
            wait_for(lambda: r.entry(r.entry_at("2001:db8:77::5")) is None, 30, "the old entry withdrawn")
            assert r.entry(r.entry_at("2001:db8:77::4")) is None  # deprecated: never
            assert r.stop_agent() == 0


def test_with_two_apps_both_entries_move(tmp_path: Path) -> None:
    from devkit.rig import group_object
    from tests.integration.daemon.test_apps import TwoApps

    with NetNs() as ns:
        ns.ip("addr", "add", f"{OLD}/24", "dev", "eth0")
        ns.set_default_route(4)
        with ns.entered(), rig(tmp_path, registry={"address": {"watch": "300ms"}}) as r:
            r.svc_ip = None
            r.prepare()
            two = TwoApps(r)
            r.api.create(group_object(name="ledger", port=two.ledger_port))
            two.write_config()
            r.start_app()
            two.start_ledger()
            try:
                r.start_agent()
                for group in ("billing", "ledger"):
                    wait_for(lambda g=group: r.entry(f"{g}-{OLD}"), 60, f"{group} registered at {OLD}")
                ns.ip("addr", "add", f"{NEW}/24", "dev", "eth0")
                ns.ip("addr", "del", f"{OLD}/24", "dev", "eth0")
                for group in ("billing", "ledger"):
                    moved = wait_for(lambda g=group: r.entry(f"{g}-{NEW}"), 30, f"{group} at {NEW}")
                    assert moved["spec"]["address"] == NEW
                    wait_for(lambda g=group: r.entry(f"{g}-{OLD}") is None, 30, f"{group}'s old entry withdrawn")
                assert r.stop_agent() == 0
            finally:
                two.kill_ledger()


def test_a_start_without_an_address_waits_for_one_and_registers_there(tmp_path: Path) -> None:
    """DHCP still asking at boot: no address and no default route. The agent runs and says why it
    waits; once the interface gets its address the entry is registered there, without a restart."""
    with NetNs() as ns, ns.entered(), rig(tmp_path, registry={"address": {"watch": "0s"}}) as r:
        r.svc_ip = None
        r.prepare()
        r.start_app()
        r.start_agent()
        status = wait_for(lambda: _waiting(r), 60, "status saying the agent waits for an address")
        assert "no default route" in status["registration"]["message"]
        assert r.agent is not None and r.agent.poll() is None
        assert r.entry(r.entry_at(OLD)) is None

        ns.ip("addr", "add", f"{OLD}/24", "dev", "eth0")
        ns.set_default_route(4)
        entry = wait_for(lambda: r.entry(r.entry_at(OLD)), 60, "registration at the address found")
        assert entry["spec"]["address"] == OLD
        assert f"address found: {OLD}" in r.log_text()
        wait_for(lambda: json.loads(r.status_file.read_text())["registration"].get("registered"), 10,
                 "status saying registered")
        registration = json.loads(r.status_file.read_text())["registration"]
        assert registration["address"] == OLD and registration["address_changes"] == 0
        assert r.stop_agent() == 0
        assert r.entry(r.entry_at(OLD)) is None


def _waiting(r: Rig) -> dict[str, object] | None:
    try:
        status = json.loads(r.status_file.read_text())
    except (OSError, ValueError):
        return None
    return status if status.get("registration", {}).get("state") == "waiting" else None
