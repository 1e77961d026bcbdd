"""Pure parts of agent.identity: strict reading of JWT claims, and the `identity` config section."""

from __future__ import annotations

import base64
import json

import pytest

from agent import config
from agent.identity.common import MAX_TOKEN, IdentityError, decode, token_from_jwt
from agent.identity.refresh import describe, make_provider, token_file


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(claims: object, header: object = None, sig: str = "c2ln", raw_payload: str | None = None) -> str:
    h = b64(json.dumps(header or {"alg": "RS256", "kid": "k"}).encode())
    p = raw_payload if raw_payload is not None else b64(json.dumps(claims).encode())
    return f"{h}.{p}.{sig}"


def test_claims_and_times() -> None:
    t = token_from_jwt(jwt({"iss": "https://i", "sub": "s", "iat": 1000, "exp": 4600}))
    assert (t.issued, t.expiry, t.lifetime, t.refresh_in(0.75)) == (1000, 4600, 3600, 2700)


def test_expiry_from_the_answer_when_the_claims_have_none() -> None:
    assert token_from_jwt(jwt({"sub": "s"}), expiry=50.0, now=10.0).lifetime == 40.0


@pytest.mark.parametrize(("token", "message"), [
    ("a.b", "not a JWT"),
    (jwt({}, raw_payload="!!!"), "claims is not base64url"),
    (jwt({}, raw_payload=b64(b"[1]")), "claims must be a JSON object"),
    (jwt({}, raw_payload=b64(b'{"exp": NaN}')), "not valid JSON"),
    (jwt({}, raw_payload=b64(b'{"exp": 1e999}')), "claim exp must be"),
    (jwt({"exp": True}), "claim exp must be"),
    (jwt({"exp": "soon"}), "claim exp must be"),
    (jwt({"exp": 10, "iat": -1}), "claim iat is out of range"),
    (jwt({"sub": "s"}), "no exp claim"),
    (jwt({"exp": 10}, header={"alg": "none"}, sig=""), "unsigned"),
    (jwt({"exp": 10}, header={"alg": "RS256"}, sig=""), "unsigned"),
    ("x" * (MAX_TOKEN + 1), "more than"),
])
def test_malformed_tokens_are_refused_with_a_reason(token: str, message: str) -> None:
    with pytest.raises(IdentityError, match=message):
        token_from_jwt(token)


def test_decode_returns_header_and_claims() -> None:
    header, claims = decode(jwt({"exp": 5, "aud": ["a"]}, header={"alg": "ES256", "kid": "x"}))
    assert header["alg"] == "ES256" and claims["aud"] == ["a"]


def test_describe_names_the_vm_without_the_token() -> None:
    t = token_from_jwt(jwt({"exp": 9, "google": {"compute_engine": {"instance_name": "vm1", "instance_id": "42",
                                                                       "project_id": "p"}}}))
    assert describe(t) == "GCE instance vm1 (42) in p"


BASE = "bundle:\n  source: /srv/bundle\n"


def test_identity_section_defaults_to_none() -> None:
    cfg = config.parse(BASE)
    assert cfg.identity.provider == "none" and token_file(cfg) is None


def test_identity_gcp_config_and_token_path() -> None:
    cfg = config.parse(BASE + "registry:\n  server: https://k:6443\n  ca_file: /ca\nidentity:\n"
                              "  provider: gcp\n  audience: https://kube\n  endpoint: http://127.0.0.1:1\n",
                       "agent.yaml")
    assert token_file(cfg) == "/run/mesh-agent/identity-token"
    p = make_provider(cfg.identity)
    assert (p.name, p.where) == ("gcp", "http://127.0.0.1:1/computeMetadata/v1/instance/service-accounts/"
                                        "default/identity")


def test_oidc_file_is_read_where_it_is() -> None:
    cfg = config.parse(BASE + "identity:\n  provider: oidc-file\n  file: /run/spire/jwt\n")
    assert token_file(cfg) == "/run/spire/jwt"


@pytest.mark.parametrize(("text", "error"), [
    ("identity:\n  provider: gcp\n", "agent.yaml:4: identity.audience: provider gcp needs an audience"),
    ("identity:\n  provider: oidc-file\n", "agent.yaml:4: identity.file: provider oidc-file needs file"),
    ("identity:\n  provider: kerberos\n", "agent.yaml:4: identity.provider: expected one of none, gcp"),
    ("identity:\n  provider: aws\n  audience: a\n  aws:\n    duration: 2h\n",
     "agent.yaml:7: identity.aws.duration: must be at most 1h"),
    ("identity:\n  provider: azure\n  audience: a\n  endpoint: 169.254.169.254\n",
     "agent.yaml:6: identity.endpoint: expected an http:// or https:// URL"),
    ("registry:\n  token_file: /t\nidentity:\n  provider: gcp\n  audience: a\n",
     "agent.yaml:4: registry.token_file: identity provider gcp is the API credential"),
    ("registry:\n  server: https://k\n", "agent.yaml:3: registry.token_file: registry.server needs "
                                           "registry.token_file (or an identity provider)"),
])
def test_identity_errors_name_file_line_and_key(text: str, error: str) -> None:
    with pytest.raises(config.ConfigError) as exc:
        config.parse(BASE + text, "agent.yaml")
    assert str(exc.value).startswith(error), str(exc.value)


def test_server_with_an_identity_needs_no_token_file() -> None:
    cfg = config.parse(BASE + "registry:\n  server: https://k\nidentity:\n  provider: azure\n  audience: a\n")
    assert cfg.registry.token_file is None


def test_deprovision_removes_the_kept_identity_token() -> None:
    from agent.deprovision import instance_files
    from agent.paths import Layout

    layout = Layout.from_config(config.parse(BASE))
    kept = token_file(config.parse(BASE + "identity:\n  provider: gcp\n  audience: a\n"))
    assert kept is not None and any(str(step.path) == kept for step in instance_files(layout))
