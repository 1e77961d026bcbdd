from __future__ import annotations

import pytest

from agent.registry.address import (
    AddressError,
    Interface,
    parse_ipv4_routes,
    parse_ipv6_routes,
    select_address,
)

IFACES = [Interface("lo", ("127.0.0.1", "::1")),
          Interface("eth0", ("10.1.2.3", "fe80::1%eth0", "fd00:10::3")),
          Interface("eth1", ("192.168.7.9",)),
          Interface("v6only", ("2001:db8::9",))]

ROUTE = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth1\t0007A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth0\t00000000\t0102010A\t0003\t0\t0\t100\t00000000\t0\t0\t0
"""
ROUTE6 = ("00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
          "fe800000000000000000000000000001 00000400 00000001 00000000 00000003 v6only\n"
          "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
          "00000000000000000000000000000000 ffffffff 00000001 00000000 00200200 lo\n")


def pick(**kw: object) -> str:
    args = {"svc_ip": None, "value": None, "interface": None, "cidr": None, "family": "auto",
            "interfaces": IFACES,
            "default_route_ifaces": [(4, n) for n in parse_ipv4_routes(ROUTE)] +
                                    [(6, n) for n in parse_ipv6_routes(ROUTE6)]}
    args.update(kw)
    return select_address(**args)  # type: ignore[arg-type]


def test_route_parsing() -> None:
    assert parse_ipv4_routes(ROUTE) == ["eth0"]
    assert parse_ipv6_routes(ROUTE6) == ["v6only"]


def test_precedence() -> None:
    assert pick() == "10.1.2.3"
    assert pick(family="ipv6") == "2001:db8::9"
    assert pick(svc_ip="fd00:10::3", value="10.9.9.9") == "fd00:10::3"
    assert pick(value="10.9.9.9") == "10.9.9.9"
    assert pick(interface="eth0") == "10.1.2.3"
    assert pick(interface="eth0", family="ipv6") == "fd00:10::3"
    assert pick(cidr="192.168.0.0/16") == "192.168.7.9"
    assert pick(cidr="fd00::/8") == "fd00:10::3"


@pytest.mark.parametrize("kw,match", [
    ({"interface": "nope"}, "does not exist"),
    ({"interface": "lo"}, "no usable"),
    ({"cidr": "172.16.0.0/12"}, "no local address inside"),
    ({"svc_ip": "bogus"}, "ISTIO_SVC_IP"),
    ({"default_route_ifaces": []}, "no default route"),
])
def test_errors_say_what_was_looked_at(kw: dict, match: str) -> None:
    with pytest.raises(AddressError, match=match):
        pick(**kw)
