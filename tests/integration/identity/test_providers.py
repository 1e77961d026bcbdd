"""Each identity provider against its cloud's fake metadata service on loopback: the token and its
expiry in the cloud's wire format, retries of what may pass, and clear refusals."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from agent.identity.aws import AwsProvider
from agent.identity.azure import AzureProvider
from agent.identity.common import IdentityError, decode
from agent.identity.gcp import GcpProvider
from agent.identity.oidc_file import OidcFileProvider
from agent.identity.refresh import IdentityRefreshed, IdentityRefresher
from devkit.identity import FakeAzure, FakeGcp, FakeSts, Instance, TestIssuer

AUD = "https://kube.example.test"


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gcp_token_names_the_instance(issuer: TestIssuer) -> None:
    with FakeGcp(issuer, Instance("4123", project="proj-a")) as gcp:
        token = GcpProvider(AUD, gcp.url, timeout=2).fetch()
        req = gcp.requests[-1]
    assert req.headers["Metadata-Flavor"] == "Google"
    assert req.query == {"audience": AUD, "format": "full", "licenses": "TRUE"}
    gce = token.claims["google"]["compute_engine"]
    assert (gce["instance_id"], gce["project_id"], gce["license_id"]) == ("4123", "proj-a", [Instance("x").image])
    assert token.jwt == gcp.issued[-1]
    assert token.expiry == token.claims["exp"] and token.lifetime == 3600


def test_gcp_retries_a_busy_metadata_server_then_succeeds(issuer: TestIssuer) -> None:
    with FakeGcp(issuer, Instance("1")) as gcp:
        gcp.fail_next = [503, 503]
        token = GcpProvider(AUD, gcp.url, timeout=2, tries=3).fetch()
    assert token.jwt == gcp.issued[-1] and len(gcp.requests) == 3


def test_gcp_without_metadata_server_says_where_it_looked() -> None:
    url = f"http://127.0.0.1:{unused_port()}"
    with pytest.raises(IdentityError, match=rf"no metadata service answered at {url}/computeMetadata.*GCP"):
        GcpProvider(AUD, url, timeout=1, tries=2).fetch()


def test_gcp_refuses_a_server_that_is_not_googles(issuer: TestIssuer) -> None:
    class Impostor(FakeGcp):
        def route(self, req):  # type: ignore[no-untyped-def]
            status, headers, body = super().route(req)
            headers.pop("Metadata-Flavor", None)
            return status, headers, body

    with Impostor(issuer, Instance("1")) as gcp, pytest.raises(IdentityError, match="Metadata-Flavor"):
        GcpProvider(AUD, gcp.url, timeout=2).fetch()


def test_azure_token_and_expires_on(issuer: TestIssuer) -> None:
    inst = Instance("vm-1", project="sub-1")
    with FakeAzure(issuer, inst) as az:
        token = AzureProvider(AUD, az.url, timeout=2).fetch()
        req = az.requests[-1]
    assert req.headers["Metadata"] == "true"
    assert req.query == {"api-version": "2018-02-01", "resource": AUD}
    assert token.claims["xms_mirid"].startswith("/subscriptions/sub-1/")
    assert token.expiry == token.claims["exp"]


def test_azure_user_assigned_identity_by_client_id(issuer: TestIssuer) -> None:
    inst = Instance("vm-1")
    with FakeAzure(issuer, inst) as az:
        token = AzureProvider(AUD, az.url, client_id=inst.principal, timeout=2).fetch()
        assert az.requests[-1].query["client_id"] == inst.principal
        assert token.claims["oid"] == inst.principal
        with pytest.raises(IdentityError, match=r"no managed identity.*Identity not found"):
            AzureProvider(AUD, az.url, client_id="someone-else", timeout=2).fetch()


def test_azure_throttled_then_served(issuer: TestIssuer) -> None:
    with FakeAzure(issuer, Instance("vm-1")) as az:
        az.fail_next = [429]
        assert AzureProvider(AUD, az.url, timeout=2, tries=2).fetch().jwt == az.issued[-1]


def test_aws_signed_request_returns_the_role_token(issuer: TestIssuer, aws_env: None) -> None:
    inst = Instance("i-0abc", project="111122223333", zone="eu-west-1")
    with FakeSts(issuer, inst) as sts:
        token = AwsProvider(AUD, "eu-west-1", sts.url, duration=900, timeout=2).fetch()
    assert token.lifetime == 900
    claims = token.claims["https://sts.amazonaws.com/"]
    assert claims["ec2_source_instance_arn"].endswith(":instance/i-0abc")
    assert token.claims["sub"] == "arn:aws:iam::111122223333:role/mesh-vm-role"
    assert decode(token.jwt)[0]["alg"] == "RS256"


def test_aws_es384(issuer: TestIssuer, aws_env: None) -> None:
    with FakeSts(issuer, Instance("i-1", zone="us-east-2")) as sts:
        token = AwsProvider(AUD, "us-east-2", sts.url, signing_algorithm="ES384", timeout=2).fetch()
    assert decode(token.jwt)[0]["alg"] == "ES384"


def test_aws_wrong_region_fails_the_signature_check(issuer: TestIssuer, aws_env: None) -> None:
    with FakeSts(issuer, Instance("i-1", zone="eu-west-1")) as sts, \
            pytest.raises(IdentityError, match=r"SignatureDoesNotMatch.*region"):
        AwsProvider(AUD, "us-east-1", sts.url, timeout=2).fetch()


def test_aws_without_credentials(issuer: TestIssuer, aws_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k)
    with pytest.raises(IdentityError, match="no AWS credentials"):
        AwsProvider(AUD, "eu-west-1", "http://127.0.0.1:9", timeout=1).fetch()


def test_aws_needs_a_region(aws_env: None) -> None:
    with pytest.raises(IdentityError, match=r"identity\.aws\.region"):
        AwsProvider(AUD, None, None, timeout=1).fetch()


def test_oidc_file_is_read_again_when_it_changes(issuer: TestIssuer, tmp_path: Path) -> None:
    path = tmp_path / "jwt-svid"
    now = int(time.time())
    first = issuer.sign({"iss": issuer.url, "sub": "spiffe://example.org/vm/1", "aud": AUD,
                         "iat": now, "exp": now + 300})
    path.write_text(first)
    provider = OidcFileProvider(str(path))
    assert provider.fetch().jwt == first
    second = issuer.sign({"iss": issuer.url, "sub": "spiffe://example.org/vm/1", "aud": AUD,
                          "iat": now + 1, "exp": now + 600})
    path.write_text(second + "\n")
    assert provider.fetch().jwt == second


def test_oidc_file_expired_or_missing(issuer: TestIssuer, tmp_path: Path) -> None:
    path = tmp_path / "jwt"
    with pytest.raises(IdentityError, match="cannot read the identity token"):
        OidcFileProvider(str(path)).fetch()
    path.write_text(issuer.sign({"iss": issuer.url, "sub": "x", "exp": int(time.time()) - 5}))
    with pytest.raises(IdentityError, match=r"expired.*still running"):
        OidcFileProvider(str(path)).fetch()


def test_refresher_writes_the_token_0600_and_refreshes_before_expiry(issuer: TestIssuer, tmp_path: Path) -> None:
    events: list[object] = []
    with FakeGcp(issuer, Instance("1", lifetime=8)) as gcp:
        out = tmp_path / "run" / "identity-token"
        r = IdentityRefresher(GcpProvider(AUD, gcp.url, timeout=2), str(out), events.append, fraction=0.3)
        first = r.refresh_once()
        assert out.read_text().strip() == first.jwt
        assert os.stat(out).st_mode & 0o777 == 0o600
        r.start()
        try:
            deadline = time.monotonic() + 20
            while not any(isinstance(e, IdentityRefreshed) for e in events) and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            r.stop()
    refreshed = [e for e in events if isinstance(e, IdentityRefreshed)]
    assert refreshed, events
    # The new token was fetched before the first one expired, and it is what the file now holds.
    assert len(gcp.issued) >= 2 and out.read_text().strip() == gcp.issued[-1]
    assert refreshed[0].issued < first.expiry


def test_a_metadata_service_that_trickles_is_cut_at_the_deadline() -> None:
    import http.server
    import threading

    from agent.identity.common import http as metadata_http
    from agent.retry import RetryableError

    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            for _ in range(200):  # a byte every 0.2 s: each gap is well inside the read timeout
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
                threading.Event().wait(0.2)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/token"
        with pytest.raises(RetryableError, match="no answer within 1 s"):
            metadata_http("GET", url, headers={}, timeout=1.0, hint="is this VM on GCP?")
    finally:
        server.shutdown()
        server.server_close()
