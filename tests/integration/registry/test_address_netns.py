"""The address as the live system shows it, in a network namespace of the test's own whose addresses
the test adds and removes with `ip addr`: selection, IPv6 flags, and the watcher noticing a change."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import pytest

from agent import config as C
from agent.registry.address import AddressError, decide
from agent.registry.address_part import AddressChanged, AddressWatcher
from devkit.netns import NetNs, unavailable

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=unavailable() or "")


@pytest.fixture
def ns() -> Iterator[NetNs]:
    with NetNs() as n:
        yield n


def address_cfg(text: str = "{}") -> C.AddressConfig:
    return C.parse(f"bundle: {{source: /b}}\nregistry: {{address: {text}}}\n").registry.address


def test_selection_follows_the_live_interfaces(ns: NetNs) -> None:
    ns.ip("addr", "add", "10.77.0.5/24", "dev", "eth0")
    ns.set_default_route(4)
    with ns.entered():
        auto = address_cfg()
        assert decide(auto, None) == "10.77.0.5"
        # (Another subnet: deleting a subnet's primary address would take its secondaries along.)
        ns.ip("addr", "add", "10.78.0.9/24", "dev", "eth0")
        assert decide(auto, None, keep="10.78.0.9") == "10.78.0.9"  # a second address: the one in use stays
        assert decide(auto, None, keep="10.77.0.5") == "10.77.0.5"
        assert decide(address_cfg("{cidr: 10.78.0.8/29}"), None) == "10.78.0.9"
        assert decide(address_cfg("{interface: eth0}"), None) == "10.77.0.5"
        ns.ip("addr", "del", "10.77.0.5/24", "dev", "eth0")
        assert decide(auto, None, keep="10.77.0.5") == "10.78.0.9"
        with pytest.raises(AddressError, match='interface "eth9"'):
            decide(address_cfg("{interface: eth9}"), None)


def test_deprecated_and_link_local_ipv6_are_never_chosen(ns: NetNs) -> None:
    ns.ip("addr", "add", "10.77.0.5/24", "dev", "eth0")
    ns.ip("-6", "addr", "add", "2001:db8:77::5/64", "dev", "eth0", "nodad", "preferred_lft", "0")
    ns.ip("-6", "addr", "add", "fe80::77/64", "dev", "eth0", "nodad")
    ns.set_default_route(4)
    ns.set_default_route(6)
    with ns.entered():
        v6 = address_cfg("{interface: eth0, family: ipv6}")
        # Only a deprecated global and link-local ones: nothing fit.
        with pytest.raises(AddressError, match="no usable IPv6"):
            decide(v6, None)
        ns.ip("-6", "addr", "add", "2001:db8:77::6/64", "dev", "eth0", "nodad")
        assert decide(v6, None) == "2001:db8:77::6"
        assert decide(address_cfg("{family: ipv6}"), None) == "2001:db8:77::6"
        # Dual stack: IPv4 unless IPv6 is asked for.
        assert decide(address_cfg(), None) == "10.77.0.5"


def test_the_watcher_sees_an_address_replaced(ns: NetNs) -> None:
    ns.ip("addr", "add", "10.77.0.5/24", "dev", "eth0")
    ns.set_default_route(4)
    events: queue.SimpleQueue[object] = queue.SimpleQueue()
    with ns.entered():
        a = address_cfg()
        start = decide(a, None)
        w = AddressWatcher(lambda keep: decide(a, None, keep=keep), start, 0.1, events.put).start()
        try:
            ns.ip("addr", "add", "10.78.0.6/24", "dev", "eth0")
            ns.ip("addr", "del", "10.77.0.5/24", "dev", "eth0")
            assert events.get(timeout=10) == AddressChanged("10.77.0.5", "10.78.0.6")
        finally:
            w.stop()
