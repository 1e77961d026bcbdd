"""The VM's address in the mesh: ISTIO_SVC_IP, else configured (a value, an interface, a CIDR or the
cloud's metadata service), else the default route's interface.

`select_address` is the pure decision over plain data; `detect_address` gathers that data (psutil's
interface addresses, /proc/net/route, /proc/net/ipv6_route and /proc/net/if_inet6's flags) and calls
it; `decide` is the one entry point for agent.yaml's registry.address (agent.registry.cloud_address
asks the metadata service). One address: Istio's WorkloadEntry has one, so a dual-stack VM registers
its IPv4 address unless `family: ipv6` asks for the IPv6 one.

IPv6 addresses the kernel marks tentative (duplicate address detection not done), DAD-failed,
deprecated (preferred lifetime over) or temporary (privacy extensions, replaced every few hours) are
never chosen, nor link-local, loopback, multicast or unspecified ones of either family.
"""

from __future__ import annotations

import contextlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Family = Literal["auto", "ipv4", "ipv6"]


class AddressError(ValueError):
    """No usable address; the message says what was looked at."""


@dataclass(frozen=True)
class Interface:
    name: str
    addresses: tuple[str, ...]  # as psutil reports them (IPv6 may carry a %zone suffix)


def _usable(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
        return None
    return ip


# /proc/net/if_inet6 flags (linux/if_addr.h) of addresses never registered.
IFA_F_TEMPORARY = 0x01
IFA_F_DADFAILED = 0x08
IFA_F_DEPRECATED = 0x20
IFA_F_TENTATIVE = 0x40
UNFIT_FLAGS = IFA_F_TEMPORARY | IFA_F_DADFAILED | IFA_F_DEPRECATED | IFA_F_TENTATIVE


def parse_if_inet6(text: str) -> set[str]:
    """The IPv6 addresses in /proc/net/if_inet6 whose flags make them unfit (compressed form).

    Each line: address (32 hex digits), interface index, prefix length, scope, flags, name."""
    out = set()
    for line in text.splitlines():
        cols = line.split()
        if len(cols) < 6 or len(cols[0]) != 32:
            continue
        try:
            flags = int(cols[4], 16)
            ip = ipaddress.IPv6Address(bytes.fromhex(cols[0]))
        except ValueError:
            continue
        if flags & UNFIT_FLAGS:
            out.add(str(ip))
    return out


def _family_ok(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, family: Family) -> bool:
    return family == "auto" or (family == "ipv4") == (ip.version == 4)


def select_address(*, svc_ip: str | None, value: str | None, interface: str | None, cidr: str | None,
                   family: Family, interfaces: list[Interface],
                   default_route_ifaces: list[tuple[int, str]], keep: str | None = None) -> str:
    """Pick the address. `default_route_ifaces` lists (ip version, interface) holding a default route,
    IPv4 first, in routing-table order. `keep`: the address in use; while it still qualifies it stays,
    so a second address appearing on the interface never moves the entry."""
    if svc_ip:
        ip = _usable(svc_ip) or _parse(svc_ip, "ISTIO_SVC_IP in cluster.env")
        return str(ip)
    if value:
        return str(_parse(value, "registry.address.value"))
    if interface:
        for iface in interfaces:
            if iface.name == interface:
                found = [ip for ip in map(_usable, iface.addresses) if ip and _family_ok(ip, family)]
                if found:
                    return _kept(keep, found) or str(_prefer(found, family))
                raise AddressError(f'interface "{interface}" has no usable {_fam(family)} address')
        raise AddressError(f'interface "{interface}" (registry.address.interface) does not exist; '
                           f"have: {', '.join(i.name for i in interfaces) or 'none'}")
    if cidr:
        try:
            net = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise AddressError(f'registry.address.cidr: "{cidr}" is not a CIDR') from None
        inside = [usable for iface in interfaces for usable in map(_usable, iface.addresses)
                  if usable is not None and usable.version == net.version and usable in net]
        if inside:
            return _kept(keep, inside) or str(inside[0])
        raise AddressError(f"no local address inside {cidr} (registry.address.cidr)")
    by_name = {i.name: i for i in interfaces}
    order = sorted(default_route_ifaces, key=lambda r: 0 if r[0] == 4 else 1)
    if family == "ipv6":
        order = sorted(default_route_ifaces, key=lambda r: 0 if r[0] == 6 else 1)
    for version, name in order:
        if name not in by_name:
            continue
        iface = by_name[name]
        found = [ip for ip in map(_usable, iface.addresses)
                 if ip and ip.version == version and _family_ok(ip, family)]
        if found:
            return _kept(keep, found) or str(found[0])
    raise AddressError(f"no default route with a usable {_fam(family)} address; set "
                       "registry.address (value, interface, cidr or metadata) or ISTIO_SVC_IP")


def _kept(keep: str | None, found: list[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> str | None:
    if keep is None:
        return None
    try:
        want = ipaddress.ip_address(keep)
    except ValueError:
        return None
    return str(want) if want in found else None


def _prefer(found: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
            family: Family) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if family == "auto":
        v4 = [ip for ip in found if ip.version == 4]
        return v4[0] if v4 else found[0]
    return found[0]


def _fam(family: Family) -> str:
    return {"auto": "IP", "ipv4": "IPv4", "ipv6": "IPv6"}[family]


def _parse(text: str, source: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        raise AddressError(f'{source}: "{text}" is not an IP address') from None


def parse_ipv4_routes(text: str) -> list[str]:
    """Interfaces of default routes in /proc/net/route (destination 0 and mask 0), table order."""
    out = []
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 8 and cols[1] == "00000000" and cols[7] == "00000000":
            out.append(cols[0])
    return out


def parse_ipv6_routes(text: str) -> list[str]:
    """Interfaces of default routes in /proc/net/ipv6_route (::/0), skipping the loopback's."""
    out = []
    for line in text.splitlines():
        cols = line.split()
        if len(cols) >= 10 and cols[0] == "0" * 32 and cols[1] == "00" and cols[9] != "lo":
            out.append(cols[9])
    return out


def local_interfaces(proc: Path = Path("/proc")) -> list[Interface]:
    """The interfaces and their addresses, without the IPv6 ones whose flags make them unfit."""
    import psutil

    unfit: set[str] = set()
    with contextlib.suppress(OSError):
        unfit = parse_if_inet6((proc / "net/if_inet6").read_text())

    def fit(text: str) -> bool:
        try:
            return str(ipaddress.ip_address(text.split("%", 1)[0])) not in unfit
        except ValueError:
            return False

    return [Interface(name, tuple(a.address for a in addrs if fit(a.address)))
            for name, addrs in psutil.net_if_addrs().items()]


def detect_address(*, svc_ip: str | None = None, value: str | None = None, interface: str | None = None,
                   cidr: str | None = None, family: Family = "auto", proc: Path = Path("/proc"),
                   keep: str | None = None) -> str:
    """The address, from the live system."""
    interfaces = local_interfaces(proc)
    routes: list[tuple[int, str]] = []
    sources = ((4, "net/route", parse_ipv4_routes), (6, "net/ipv6_route", parse_ipv6_routes))
    for version, rel, parse in sources:
        with contextlib.suppress(OSError):
            routes += [(version, name) for name in parse((proc / rel).read_text())]
    return select_address(svc_ip=svc_ip, value=value, interface=interface, cidr=cidr, family=family,
                          interfaces=interfaces, default_route_ifaces=routes, keep=keep)


def fixed(a: Any, svc_ip: str | None) -> bool:
    """True when the address cannot change while the agent runs: ISTIO_SVC_IP or a configured value."""
    return bool(svc_ip) or a.value is not None


def decide(a: Any, svc_ip: str | None, *, keep: str | None = None, proc: Path = Path("/proc")) -> str:
    """The address agent.yaml's registry.address (config.AddressConfig) and the bundle's ISTIO_SVC_IP
    give: ISTIO_SVC_IP, else value, interface, cidr or the metadata service, else the default route."""
    if not fixed(a, svc_ip) and a.metadata.provider != "none":
        from agent.registry.cloud_address import metadata_address

        return metadata_address(a.metadata, a.family)
    return detect_address(svc_ip=svc_ip, value=a.value, interface=a.interface, cidr=a.cidr, family=a.family,
                          proc=proc, keep=keep)
