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


# --- IPv6 flags, keeping the address in use, the one entry point ---------------------------------

IF_INET6 = (
    "fd000010000000000000000000000003 02 40 00 80     eth0\n"      # permanent: fit
    "20010db8000000000000000000000001 02 40 00 20     eth0\n"      # deprecated
    "20010db8000000000000000000000002 02 40 00 40     eth0\n"      # tentative (DAD not done)
    "20010db8000000000000000000000003 02 40 00 08     eth0\n"      # DAD failed
    "20010db8000000000000000000000004 02 40 00 01     eth0\n"      # temporary (privacy)
    "fe800000000000000000000000000001 02 40 20 80     eth0\n"      # link-local, permanent
    "garbage line\n")


def test_if_inet6_flags_mark_unfit_addresses() -> None:
    from agent.registry.address import parse_if_inet6

    assert parse_if_inet6(IF_INET6) == {"2001:db8::1", "2001:db8::2", "2001:db8::3", "2001:db8::4"}


def test_link_local_is_never_chosen_even_alone() -> None:
    ifaces = [Interface("eth0", ("fe80::1%eth0", "169.254.3.4"))]
    with pytest.raises(AddressError, match="no usable"):
        pick(interfaces=ifaces, interface="eth0")
    with pytest.raises(AddressError, match="no default route"):
        pick(interfaces=ifaces, default_route_ifaces=[(4, "eth0"), (6, "eth0")])


def test_dual_stack_registers_ipv4_unless_ipv6_is_asked() -> None:
    ifaces = [Interface("eth0", ("2001:db8::9", "10.1.2.3"))]
    routes = [(6, "eth0"), (4, "eth0")]
    assert pick(interfaces=ifaces, default_route_ifaces=routes) == "10.1.2.3"
    assert pick(interfaces=ifaces, default_route_ifaces=routes, family="ipv6") == "2001:db8::9"
    assert pick(interfaces=ifaces, interface="eth0") == "10.1.2.3"
    assert pick(interfaces=ifaces, interface="eth0", family="ipv6") == "2001:db8::9"
    with pytest.raises(AddressError, match="no usable IPv6"):
        pick(interfaces=[Interface("eth0", ("10.1.2.3",))], interface="eth0", family="ipv6")


def test_the_address_in_use_is_kept_while_it_qualifies() -> None:
    ifaces = [Interface("eth0", ("10.1.2.3", "10.1.2.4"))]
    routes = [(4, "eth0")]
    assert pick(interfaces=ifaces, default_route_ifaces=routes) == "10.1.2.3"
    assert pick(interfaces=ifaces, default_route_ifaces=routes, keep="10.1.2.4") == "10.1.2.4"
    assert pick(interfaces=ifaces, interface="eth0", keep="10.1.2.4") == "10.1.2.4"
    assert pick(interfaces=ifaces, cidr="10.1.0.0/16", keep="10.1.2.4") == "10.1.2.4"
    # Gone, or no longer qualifying: the choice moves.
    assert pick(interfaces=ifaces, interface="eth0", keep="10.9.9.9") == "10.1.2.3"
    assert pick(interfaces=ifaces, cidr="10.1.2.3/32", keep="10.1.2.4") == "10.1.2.3"
    assert pick(interfaces=ifaces, interface="eth0", keep="not-an-ip") == "10.1.2.3"


def test_decide_fixed_and_metadata_precedence() -> None:
    from agent import config as C
    from agent.registry.address import decide, fixed

    cfg = C.parse("bundle: {source: /b}\nregistry: {address: {value: 192.0.2.7}}\n")
    assert fixed(cfg.registry.address, None) and fixed(C.parse("bundle: {source: /b}\n").registry.address, "10.0.0.1")
    assert not fixed(C.parse("bundle: {source: /b}\n").registry.address, None)
    assert decide(cfg.registry.address, None) == "192.0.2.7"
    assert decide(cfg.registry.address, "10.0.0.1") == "10.0.0.1"  # ISTIO_SVC_IP wins, as before
    # ISTIO_SVC_IP wins over the metadata service too: no request is made (the endpoint is closed).
    meta = C.parse("bundle: {source: /b}\nregistry: {address: {metadata: {provider: aws, "
                   "endpoint: 'http://127.0.0.1:9', tries: 1, timeout: 1s}}}\n")
    assert decide(meta.registry.address, "10.0.0.1") == "10.0.0.1"
    with pytest.raises(AddressError, match=r"registry\.address\.metadata \(aws\)"):
        decide(meta.registry.address, None)


@pytest.mark.parametrize("yaml_text,where", [
    ("  address: {value: 10.0.0.1, interface: eth0}\n", "registry.address.interface: set at most one"),
    ("  address: {cidr: 10.0.0.0/8, metadata: {provider: gcp}}\n", "registry.address.metadata: set at most one"),
    ("  address: {value: 10.0.0.1, family: ipv6}\n", "registry.address.value: \"10.0.0.1\" is not an ipv6"),
    ("  address: {cidr: 'fd00::/8', family: ipv4}\n", "registry.address.cidr: \"fd00::/8\" is not an ipv4"),
    ("  address: {cidr: 10.0.0.0/33}\n", "registry.address.cidr: expected a CIDR"),
    ("  address: {interface: 'eth0/1'}\n", "registry.address.interface: \"eth0/1\" is not an interface name"),
    ("  address: {metadata: {provider: gcp, which: ipv6}, family: ipv4}\n", "registry.address.metadata.which"),
    ("  address: {metadata: {provider: azure, which: public}, family: ipv6}\n", "registry.address.metadata.which"),
    ("  address: {metadata: {provider: digitalocean}}\n", "registry.address.metadata.provider"),
    ("  address: {metadata: {provider: aws, endpoint: '169.254.169.254'}}\n", "registry.address.metadata.endpoint"),
    ("  address: {metadata: {endpoint: 'http://x'}}\n", "registry.address.metadata.provider"),
    ("  address: {watch: -1s}\n", "registry.address.watch"),
])
def test_address_config_errors_name_file_line_key(tmp_path, yaml_text: str, where: str) -> None:  # type: ignore[no-untyped-def]
    from agent import config as C

    path = tmp_path / "agent.yaml"
    path.write_text("bundle: {source: /b}\nregistry:\n" + yaml_text)
    with pytest.raises(C.ConfigError) as err:
        C.load(str(path))
    text = str(err.value)
    assert f"{path}:3:" in text and where in text, text
