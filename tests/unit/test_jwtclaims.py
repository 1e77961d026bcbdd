"""The one JWT reader (agent.jwtclaims): hostile tokens get one clear line, never a traceback, and every
user of JWT claims (the bundle check, the cluster source, the credential renewal) goes through it."""

from __future__ import annotations

import base64
import json
import time

import pytest

from agent import jwtclaims
from agent.bundle.cluster_inputs import token_times
from agent.bundle.model import BundleError, parse_bundle
from agent.registry.credentials import CredentialError, read_claims
from devkit import bundles as kit

NOW = time.time()


def b64(data: str) -> str:
    return base64.urlsafe_b64encode(data.encode()).rstrip(b"=").decode()


def raw_token(claims_json: str, header_json: str = '{"alg":"ES256"}') -> str:
    """A JWT whose claims are exactly this JSON text (json.dumps cannot write 1e400)."""
    return f"{b64(header_json)}.{b64(claims_json)}.c2ln"


def claims_with(extra: str) -> str:
    good = json.loads(base64.urlsafe_b64decode(kit.make_token(NOW).split(b".")[1] + b"==="))
    good.pop("exp")
    good.pop("iat")
    return json.dumps(good)[:-1] + ", " + extra + "}"


HOSTILE_TIMES = {
    '"exp": NaN': "not valid JSON: NaN is not a number JSON allows",
    '"exp": Infinity': "not valid JSON: Infinity is not a number JSON allows",
    '"exp": 1e400': "claim exp must be a finite number",
    '"exp": 1e20': "claim exp is out of range",
    '"exp": -1e20': "claim exp is out of range",
    '"exp": 0': "claim exp is out of range",
    '"iat": 1e20': "claim iat is out of range",
    '"nbf": -1': "claim nbf is out of range",
    '"exp": "tomorrow"': "claim exp must be a number",
    '"exp": true': "claim exp must be a number",
}


@pytest.mark.parametrize("claim", sorted(HOSTILE_TIMES))
def test_hostile_time_claims_are_one_clear_line(claim: str) -> None:
    token = raw_token(claims_with(claim))
    with pytest.raises(jwtclaims.TokenError) as err:
        jwtclaims.read(token)
    assert HOSTILE_TIMES[claim] in str(err.value) and "\n" not in str(err.value)
    # every user of the claims refuses it the same way, none crashes
    with pytest.raises(BundleError) as berr:
        parse_bundle(kit.files(NOW, replace={"istio-token": token.encode()}), NOW, kit.config())
    assert berr.value.problems == [f"istio-token: {err.value}"]
    assert token_times(token) == (None, None)
    with pytest.raises(CredentialError, match="the token cannot be read"):
        read_claims(token)


def test_sane_times_pass_as_floats() -> None:
    tok = jwtclaims.read(raw_token('{"exp": 253402300799, "iat": 1.5, "aud": "istio-ca"}'))
    assert (tok.expiry, tok.issued_at, tok.not_before, tok.audiences) == (253402300799.0, 1.5, None, ("istio-ca",))
    tok = jwtclaims.read(kit.make_token(NOW))
    assert tok.expiry == int(NOW + 3600) and tok.claims["kubernetes.io"]["namespace"] == kit.NS


def test_deep_nesting_and_size_are_capped() -> None:
    deep = raw_token('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(jwtclaims.TokenError, match="more than the limit"):
        jwtclaims.read(deep)
    nested = raw_token('{"x": ' + "[" * 50 + "]" * 50 + "}")
    with pytest.raises(jwtclaims.TokenError, match="nested more than 8 levels deep"):
        jwtclaims.read(nested)
    many = raw_token('{"x": [' + ",".join(["1"] * 2000) + "]}")
    with pytest.raises(jwtclaims.TokenError, match="more than 1000 values"):
        jwtclaims.read(many)
    # brackets inside strings are text, not nesting
    assert jwtclaims.read(raw_token('{"x": "' + "[" * 500 + '"}')).claims["x"] == "[" * 500


@pytest.mark.parametrize("token, message", [
    ("a.b", "not a JWT"),
    ("!!!.!!!.x", "not base64url"),
    (raw_token("[1]"), "the JWT's claims must be a JSON object"),
    (raw_token("{"), "the JWT's claims: not valid JSON"),
    (raw_token("{}", header_json="7"), "the JWT's header must be a JSON object"),
    ("é.é.é", "not a JWT"),
])
def test_malformed_tokens(token: str, message: str) -> None:
    with pytest.raises(jwtclaims.TokenError, match=message):
        jwtclaims.read(token.encode() if token.startswith("é") else token)
