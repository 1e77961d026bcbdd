"""The VM's address as its cloud's metadata service tells it: the private or public IPv4 address, or
the IPv6 address, of the first network interface. For a VM whose mesh peers reach it through a NAT
(another network, another cloud) the public address is the one to register, and only the cloud knows
it: it is never on a local interface.

The requests go through agent.identity.common's metadata HTTP (no proxy, no redirects, a deadline,
retries on unreachable, 429 and 5xx), the one place that talks to metadata services:

- GCP: GET {endpoint}/computeMetadata/v1/instance/network-interfaces/0/ip (private),
  .../network-interfaces/0/access-configs/0/external-ip (public), .../network-interfaces/0/ipv6s
  (one address a line), with `Metadata-Flavor: Google`; the answer carries the same header.
- Azure: GET {endpoint}/metadata/instance/network/interface?api-version=2021-02-01 with
  `Metadata: true`: a JSON list of interfaces, each with ipv4.ipAddress[] and ipv6.ipAddress[] of
  {privateIpAddress, publicIpAddress}. IMDS shows only a Basic-SKU public address; a Standard-SKU one
  is empty there (set registry.address.value instead).
- AWS IMDSv2: PUT {endpoint}/latest/api/token with `X-aws-ec2-metadata-token-ttl-seconds`, then GETs
  with `X-aws-ec2-metadata-token`: /latest/meta-data/local-ipv4, /latest/meta-data/public-ipv4 (404
  without one), and for IPv6 /latest/meta-data/mac, then
  /latest/meta-data/network/interfaces/macs/<mac>/ipv6s (one address a line).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Mapping
from typing import Any

from agent.identity.common import Answer, IdentityError, http, with_retries
from agent.registry.address import AddressError

DEFAULT_ENDPOINTS = {"gcp": "http://metadata.google.internal", "azure": "http://169.254.169.254",
                     "aws": "http://169.254.169.254"}
GCP_NIC = "/computeMetadata/v1/instance/network-interfaces/0"
GCP_PATHS = {"private": GCP_NIC + "/ip", "public": GCP_NIC + "/access-configs/0/external-ip",
             "ipv6": GCP_NIC + "/ipv6s"}
AZURE_PATH = "/metadata/instance/network/interface"
AZURE_API_VERSION = "2021-02-01"
AWS_TOKEN_PATH = "/latest/api/token"
AWS_PATHS = {"private": "/latest/meta-data/local-ipv4", "public": "/latest/meta-data/public-ipv4"}
AWS_TOKEN_TTL = "60"  # seconds: the token serves the one lookup

Get = Callable[[str, str, Mapping[str, str], Mapping[str, str] | None], Answer]


def metadata_address(m: Any, family: str = "auto") -> str:
    """The address registry.address.metadata (config.MetadataAddressConfig) names. Raises AddressError."""
    endpoint = (m.endpoint or DEFAULT_ENDPOINTS[m.provider]).rstrip("/")
    hint = {"gcp": "is this VM on GCP (Compute Engine)?", "azure": "is this VM on Azure?",
            "aws": "is this VM on AWS (EC2)?"}[m.provider]

    def call(method: str, url: str, headers: Mapping[str, str], params: Mapping[str, str] | None) -> Answer:
        return http(method, url, headers=headers, params=params, timeout=float(m.timeout), hint=hint)

    fetch = {"gcp": gcp, "azure": azure, "aws": aws}[m.provider]
    try:
        text = with_retries(lambda: fetch(call, endpoint, m.which), int(m.tries))
    except IdentityError as exc:
        raise AddressError(f"registry.address.metadata ({m.provider}): {exc}") from None
    return checked(text, m.which, family, f"{m.provider} metadata ({m.which})")


def checked(text: str, which: str, family: str, source: str) -> str:
    """The answer as an address fit for the mesh, of the family asked for."""
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        raise AddressError(f'{source}: "{text.strip()[:80]}" is not an IP address') from None
    if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
        raise AddressError(f"{source}: {ip} cannot be a mesh address")
    version = 6 if which == "ipv6" else 4
    if ip.version != version or (family == "ipv4" and ip.version != 4) or (family == "ipv6" and ip.version != 6):
        raise AddressError(f"{source}: {ip} is not the IPv{version} address asked for")
    return str(ip)


def _first_line(body: bytes) -> str:
    return next((line.strip() for line in body.decode("utf-8", "replace").splitlines() if line.strip()), "")


def _missing(url: str, which: str, why: str) -> IdentityError:
    return IdentityError(f"{url}: this VM has no {which} address ({why})")


# --- each cloud: one lookup, given `call(method, url, headers, params)` ---------------------------------

def gcp(call: Get, endpoint: str, which: str) -> str:
    url = endpoint + GCP_PATHS[which]
    answer = call("GET", url, {"Metadata-Flavor": "Google"}, None)
    if answer.status == 404:
        raise _missing(url, which, "404: no such entry on the first interface")
    if answer.status != 200:
        raise IdentityError(f"{url}: {answer.status}")
    if answer.headers.get("Metadata-Flavor") != "Google":
        raise IdentityError(f"{url}: the answer lacks the header Metadata-Flavor: Google; "
                            "this is not GCP's metadata server")
    text = _first_line(answer.body)
    if not text:
        raise _missing(url, which, "empty answer")
    return text


def azure(call: Get, endpoint: str, which: str) -> str:
    url = endpoint + AZURE_PATH
    answer = call("GET", url, {"Metadata": "true"}, {"api-version": AZURE_API_VERSION})
    if answer.status != 200:
        raise IdentityError(f"{url}: {answer.status} {answer.body[:200].decode('utf-8', 'replace')}")
    try:
        nics = json.loads(answer.body)
        family = nics[0]["ipv6" if which == "ipv6" else "ipv4"]
        addresses = family.get("ipAddress") or []
    except (ValueError, LookupError, TypeError, AttributeError):
        raise IdentityError(f"{url}: the answer is not IMDS's list of interfaces") from None
    key = "publicIpAddress" if which == "public" else "privateIpAddress"
    for entry in addresses:
        value = entry.get(key) if isinstance(entry, dict) else None
        if isinstance(value, str) and value.strip():
            return value
    why = "IMDS shows only a Basic-SKU public IP; for a Standard-SKU one set registry.address.value" \
        if which == "public" else f"no {key} on the first interface"
    raise _missing(url, which, why)


def aws(call: Get, endpoint: str, which: str) -> str:
    token_url = endpoint + AWS_TOKEN_PATH
    answer = call("PUT", token_url, {"X-aws-ec2-metadata-token-ttl-seconds": AWS_TOKEN_TTL}, None)
    if answer.status != 200 or not answer.body.strip():
        raise IdentityError(f"{token_url}: no IMDSv2 session token ({answer.status})")
    headers = {"X-aws-ec2-metadata-token": answer.body.decode("ascii", "replace").strip()}
    if which == "ipv6":
        mac_url = endpoint + "/latest/meta-data/mac"
        mac = call("GET", mac_url, headers, None)
        if mac.status != 200 or not _first_line(mac.body):
            raise IdentityError(f"{mac_url}: {mac.status}")
        url = endpoint + f"/latest/meta-data/network/interfaces/macs/{_first_line(mac.body)}/ipv6s"
    else:
        url = endpoint + AWS_PATHS[which]
    got = call("GET", url, headers, None)
    if got.status == 404:
        raise _missing(url, which, "404: none assigned")
    if got.status != 200:
        raise IdentityError(f"{url}: {got.status}")
    text = _first_line(got.body)
    if not text:
        raise _missing(url, which, "empty answer")
    return text
