"""The address from each cloud's metadata service: the devkit's fake GCP, Azure and AWS (IMDSv2)
metadata services on loopback, asked through agent.identity.common's metadata HTTP."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agent import config as C
from agent.registry.address import AddressError, decide
from agent.registry.cloud_address import metadata_address
from devkit.identity import FakeAzure, FakeGcp, FakeImds, Instance, LoopbackServer, Request, TestIssuer


@pytest.fixture(scope="module")
def issuer() -> Iterator[TestIssuer]:
    with TestIssuer() as i:
        yield i


def fake(provider: str, issuer: TestIssuer, instance: Instance) -> FakeGcp | FakeAzure | FakeImds:
    if provider == "gcp":
        return FakeGcp(issuer, instance)
    if provider == "azure":
        return FakeAzure(issuer, instance)
    return FakeImds(instance)


def address_config(provider: str, which: str, endpoint: str, family: str = "auto") -> C.AddressConfig:
    cfg = C.parse(f"bundle: {{source: /b}}\nregistry: {{address: {{family: {family}, metadata: "
                  f"{{provider: {provider}, which: {which}, endpoint: '{endpoint}', timeout: 2s, tries: 3}}}}}}\n")
    return cfg.registry.address


@pytest.mark.parametrize("provider", ["gcp", "azure", "aws"])
@pytest.mark.parametrize("which,want", [("private", "10.128.0.7"), ("public", "203.0.113.7"),
                                        ("ipv6", "2001:db8:4000::7")])
def test_each_cloud_tells_each_address(issuer: TestIssuer, provider: str, which: str, want: str) -> None:
    with fake(provider, issuer, Instance("i-1")) as svc:
        a = address_config(provider, which, svc.url)
        assert decide(a, None) == want
        methods = [(r.method, r.path) for r in svc.requests]
    if provider == "aws":  # IMDSv2: a session token first
        assert methods[0] == ("PUT", "/latest/api/token")


@pytest.mark.parametrize("provider", ["gcp", "azure", "aws"])
def test_no_public_address_is_a_clear_error(issuer: TestIssuer, provider: str) -> None:
    with fake(provider, issuer, Instance("i-2", public_ip=None, ipv6=None)) as svc:
        with pytest.raises(AddressError, match=rf"registry\.address\.metadata \({provider}\).*no public address"):
            decide(address_config(provider, "public", svc.url), None)
        with pytest.raises(AddressError, match="no ipv6 address"):
            decide(address_config(provider, "ipv6", svc.url), None)


@pytest.mark.parametrize("provider", ["gcp", "azure", "aws"])
def test_503_is_retried(issuer: TestIssuer, provider: str) -> None:
    with fake(provider, issuer, Instance("i-3")) as svc:
        svc.fail_next = [503, 503]
        assert decide(address_config(provider, "private", svc.url), None) == "10.128.0.7"


def test_an_answer_that_is_not_a_mesh_address_is_refused(issuer: TestIssuer) -> None:
    with FakeImds(Instance("i-4", private_ip="169.254.10.1")) as svc, \
            pytest.raises(AddressError, match="cannot be a mesh address"):
        decide(address_config("aws", "private", svc.url), None)
    with FakeImds(Instance("i-5", private_ip="not an address")) as svc, \
            pytest.raises(AddressError, match="is not an IP address"):
        decide(address_config("aws", "private", svc.url), None)


class Impostor(LoopbackServer):
    """Answers every path with an address, as some other web server on that address might."""

    def route(self, req: Request) -> tuple[int, dict[str, str], bytes]:
        return 200, {"Content-Type": "text/plain"}, b"10.0.0.66"


def test_gcp_answer_without_its_header_is_not_gcp() -> None:
    with Impostor() as svc, pytest.raises(AddressError, match="not GCP's metadata server"):
        metadata_address(address_config("gcp", "private", svc.url).metadata)


def test_unreachable_service_names_the_cloud() -> None:
    a = address_config("azure", "private", "http://127.0.0.1:9")
    with pytest.raises(AddressError, match="is this VM on Azure"):
        decide(a, None)
