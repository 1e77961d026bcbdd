"""JWT authentication as the API server does it with structured authentication configuration
(`--authentication-config`, kind AuthenticationConfiguration, apiserver.config.k8s.io v1alpha1,
v1beta1 or v1).

For each `jwt` authenticator: the issuer's keys come from OIDC discovery (issuer.url or discoveryURL +
/.well-known/openid-configuration, whose `issuer` must equal issuer.url, then its jwks_uri) over HTTPS
verified with issuer.certificateAuthority, cached, and fetched again when a token names an unknown key
(after which a rotated-away key no longer verifies). A token is accepted when its signature verifies with an
asymmetric algorithm (RS*/PS*/ES*; never `none` or HMAC), its iss is the issuer, its aud holds one of
the audiences, it has not expired (no leeway) and its nbf is not beyond the clock skew go-oidc allows
(5 minutes); then every claimValidationRule holds (CEL over `claims`, or claim == requiredValue),
claimMappings give username, groups and uid (CEL or claim + prefix), and every userValidationRule
holds (CEL over `user`). Anything else is None, which the server answers 401 Unauthorized.

CEL is evaluated by cel-python (celpy), with the string functions split and lowerAscii of the API
server's extension library added; an expression that fails to evaluate (a missing claim)
rejects the token, as in the API server.
"""

from __future__ import annotations

import base64
import json
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from devkit.kubeapi import cel
from devkit.kubeapi.auth import Identity

API_VERSIONS = ("apiserver.config.k8s.io/v1alpha1", "apiserver.config.k8s.io/v1beta1",
                "apiserver.config.k8s.io/v1")
CLOCK_SKEW = 300.0  # go-oidc's allowance for nbf
MAX_TOKEN = 1024 * 1024

_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}


class ConfigError(ValueError):
    """The AuthenticationConfiguration is invalid; the message names the field, as the server's."""


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _int(text: str) -> int:
    return int.from_bytes(_unb64(text), "big")


def public_key(jwk: dict[str, Any]) -> Any:
    if jwk.get("kty") == "RSA":
        return rsa.RSAPublicNumbers(_int(jwk["e"]), _int(jwk["n"])).public_key()
    if jwk.get("kty") == "EC":
        curve = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}[jwk["crv"]]
        return ec.EllipticCurvePublicNumbers(_int(jwk["x"]), _int(jwk["y"]), curve).public_key()
    raise ValueError(f"unsupported key type {jwk.get('kty')!r}")


def verify_signature(alg: str, key: Any, signing_input: bytes, sig: bytes) -> bool:
    try:
        h = _HASHES[alg[2:]]()
        if alg.startswith("RS") and isinstance(key, rsa.RSAPublicKey):
            key.verify(sig, signing_input, padding.PKCS1v15(), h)
        elif alg.startswith("PS") and isinstance(key, rsa.RSAPublicKey):
            key.verify(sig, signing_input, padding.PSS(padding.MGF1(h), h.digest_size), h)
        elif alg.startswith("ES") and isinstance(key, ec.EllipticCurvePublicKey):
            size = (key.curve.key_size + 7) // 8
            if len(sig) != 2 * size:
                return False
            der = encode_dss_signature(int.from_bytes(sig[:size], "big"), int.from_bytes(sig[size:], "big"))
            key.verify(der, signing_input, ec.ECDSA(h))
        else:
            return False
    except (InvalidSignature, KeyError, ValueError):
        return False
    return True


# --- CEL ---------------------------------------------------------------------------------------------

class _Cel:
    """One compiled CEL expression (devkit.kubeapi.cel), with the server's configuration error."""

    def __init__(self, expression: str, where: str) -> None:
        self.expression = expression
        try:
            self.compiled = cel.Expression(expression)
        except cel.CelCompileError as exc:
            raise ConfigError(f"{where}: Invalid value: {json.dumps(expression)}: compilation failed: {exc}") \
                from None

    def __call__(self, **variables: Any) -> Any:
        return self.compiled(**variables)


# --- one jwt authenticator ------------------------------------------------------------------------

@dataclass
class _Mapping:
    claim: str | None = None
    prefix: str | None = None
    expression: _Cel | None = None


@dataclass
class JWTAuthenticator:
    url: str
    audiences: tuple[str, ...]
    discovery_url: str | None
    ca_pem: str | None
    validation: list[tuple[str | None, str | None, _Cel | None, str]]  # claim, requiredValue, expr, message
    username: _Mapping
    groups: _Mapping | None
    uid: _Mapping | None
    user_validation: list[tuple[_Cel, str]]
    keys: dict[str, tuple[str | None, Any]] = field(default_factory=dict)  # kid -> (alg, key)
    last_fetch: float = 0.0
    fetches: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    # keys
    def _context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        if self.ca_pem:
            ctx.load_verify_locations(cadata=self.ca_pem)
        return ctx

    def _get_json(self, url: str) -> Any:
        with urllib.request.urlopen(url, timeout=5, context=self._context()) as resp:
            return json.loads(resp.read(1024 * 1024))

    def refresh_keys(self) -> None:
        base = (self.discovery_url or self.url).rstrip("/")
        doc_url = base if base.endswith("/.well-known/openid-configuration") else \
            base + "/.well-known/openid-configuration"
        doc = self._get_json(doc_url)
        if doc.get("issuer") != self.url:
            raise ValueError(f"oidc: issuer did not match the issuer returned by provider, expected "
                             f'"{self.url}" got "{doc.get("issuer")}"')
        jwks = self._get_json(doc["jwks_uri"])
        keys: dict[str, tuple[str | None, Any]] = {}
        for jwk in jwks.get("keys") or []:
            try:
                keys[jwk.get("kid", "")] = (jwk.get("alg"), public_key(jwk))
            except (KeyError, ValueError):
                continue
        self.keys, self.last_fetch = keys, time.monotonic()
        self.fetches += 1

    def _key(self, kid: str) -> tuple[str | None, Any] | None:
        with self.lock:
            # Like go-oidc's remote key set: cached keys serve until a token names an unknown one; then
            # the JWKS is fetched again (one fetch at a time), and keys no longer in it are gone.
            if kid not in self.keys:
                try:
                    self.refresh_keys()
                except (OSError, ValueError):
                    return None
            return self.keys.get(kid)

    # tokens
    def verify(self, parts: list[str], header: dict[str, Any], claims: dict[str, Any], now: float) -> bool:
        alg = header.get("alg")
        if not isinstance(alg, str) or alg[:2] not in ("RS", "PS", "ES") or alg[2:] not in _HASHES:
            return False  # none, HS256 and friends: never
        found = self._key(str(header.get("kid", "")))
        if found is None:
            return False
        key_alg, key = found
        if key_alg and key_alg != alg:
            return False
        if not verify_signature(alg, key, f"{parts[0]}.{parts[1]}".encode(), _unb64(parts[2])):
            return False
        aud = claims.get("aud")
        auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if not any(a in self.audiences for a in auds):
            return False
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if not isinstance(exp, (int, float)) or isinstance(exp, bool) or now > exp:
            return False
        return not (nbf is not None and (not isinstance(nbf, (int, float)) or nbf > now + CLOCK_SKEW))

    def identity(self, claims: dict[str, Any]) -> Identity | None:
        try:
            for claim, required, expr, _message in self.validation:
                if expr is not None:
                    if expr(claims=claims) is not True:
                        return None
                elif claims.get(claim or "") != required:
                    return None
            username = self._map(self.username, claims)
            if not isinstance(username, str) or not username:
                return None
            groups_value = self._map(self.groups, claims) if self.groups else []
            groups = [groups_value] if isinstance(groups_value, str) else groups_value or []
            if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
                return None
            uid = self._map(self.uid, claims) if self.uid else ""
            user: dict[str, Any] = {"username": username, "groups": groups, "uid": uid or "", "extra": {}}
            for expr, _message in self.user_validation:
                if expr(user=user) is not True:
                    return None
        except (ValueError, KeyError, TypeError, AttributeError):
            return None  # an expression that cannot be evaluated refuses the token
        except Exception as exc:  # celpy's evaluation errors
            if type(exc).__module__.startswith("celpy"):
                return None
            raise
        return Identity(username, tuple(g for g in groups if g), str(uid or ""))

    @staticmethod
    def _map(m: _Mapping, claims: dict[str, Any]) -> Any:
        if m.expression is not None:
            return m.expression(claims=claims)
        value = claims.get(m.claim or "")
        if value is None:
            return None
        prefix = m.prefix or ""
        if isinstance(value, list):
            return [prefix + str(v) for v in value if isinstance(v, str)]
        return prefix + value if isinstance(value, str) else None


def _mapping(raw: Any, where: str, *, prefix_required: bool) -> _Mapping:
    raw = raw or {}
    claim, prefix, expression = raw.get("claim") or None, raw.get("prefix"), raw.get("expression") or None
    if claim and expression:
        raise ConfigError(f"{where}: Invalid value: \"\": claim and expression can't both be set")
    if expression and prefix is not None:
        raise ConfigError(f"{where}.prefix: Invalid value: {json.dumps(prefix)}: may not be specified when "
                          "expression is set")
    if claim and prefix_required and prefix is None:
        raise ConfigError(f"{where}.prefix: Required value: prefix is required when claim is set. It can be "
                          "set to an empty string to disable prefixing")
    return _Mapping(claim, prefix, _Cel(expression, f"{where}.expression") if expression else None)


def _authenticator(raw: dict[str, Any], i: int) -> JWTAuthenticator:
    where = f"jwt[{i}]"
    iss = raw.get("issuer") or {}
    url = iss.get("url") or ""
    if not url.startswith("https://"):
        raise ConfigError(f"{where}.issuer.url: Invalid value: {json.dumps(url)}: URL scheme must be https")
    audiences = tuple(iss.get("audiences") or ())
    if not audiences:
        raise ConfigError(f"{where}.issuer.audiences: Required value: at least one issuer.audiences is required")
    if len(audiences) > 1 and iss.get("audienceMatchPolicy") != "MatchAny":
        raise ConfigError(f"{where}.issuer.audienceMatchPolicy: Invalid value: "
                          f"{json.dumps(iss.get('audienceMatchPolicy', ''))}: audienceMatchPolicy must be "
                          "MatchAny for multiple audiences")
    validation: list[tuple[str | None, str | None, _Cel | None, str]] = []
    for j, rule in enumerate(raw.get("claimValidationRules") or []):
        w = f"{where}.claimValidationRules[{j}]"
        if rule.get("expression") and rule.get("claim"):
            raise ConfigError(f"{w}: Invalid value: \"\": claim and expression can't both be set")
        if rule.get("expression"):
            validation.append((None, None, _Cel(rule["expression"], f"{w}.expression"), rule.get("message", "")))
        elif rule.get("claim"):
            validation.append((rule["claim"], rule.get("requiredValue", ""), None, ""))
        else:
            raise ConfigError(f"{w}: Required value: claim or expression is required")
    mappings = raw.get("claimMappings") or {}
    if not (mappings.get("username") or {}).get("claim") and not (mappings.get("username") or {}).get("expression"):
        raise ConfigError(f"{where}.claimMappings.username: Required value: claim or expression is required")
    username = _mapping(mappings.get("username"), f"{where}.claimMappings.username", prefix_required=True)
    groups = _mapping(mappings["groups"], f"{where}.claimMappings.groups", prefix_required=True) \
        if mappings.get("groups") else None
    uid = _mapping(mappings["uid"], f"{where}.claimMappings.uid", prefix_required=False) \
        if mappings.get("uid") else None
    user_validation = [(_Cel(r["expression"], f"{where}.userValidationRules[{j}].expression"), r.get("message", ""))
                       for j, r in enumerate(raw.get("userValidationRules") or [])]
    return JWTAuthenticator(url, audiences, iss.get("discoveryURL"), iss.get("certificateAuthority"),
                            validation, username, groups, uid, user_validation)


class OIDCAuthenticators:
    """The `jwt` authenticators of one AuthenticationConfiguration, tried in order."""

    def __init__(self, config: dict[str, Any]) -> None:
        if config.get("kind") != "AuthenticationConfiguration" or config.get("apiVersion") not in API_VERSIONS:
            raise ConfigError(f"not an AuthenticationConfiguration of {', '.join(API_VERSIONS)}")
        jwts = config.get("jwt") or []
        self.authenticators = [_authenticator(raw, i) for i, raw in enumerate(jwts)]
        urls = [a.url for a in self.authenticators]
        for i, url in enumerate(urls):
            if url in urls[:i]:
                raise ConfigError(f"jwt[{i}].issuer.url: Duplicate value: {json.dumps(url)}")

    @classmethod
    def from_yaml(cls, text: str) -> OIDCAuthenticators:
        import yaml

        return cls(yaml.safe_load(text))

    def authenticate(self, token: str, now: float | None = None) -> Identity | None:
        """The identity for a JWT from one of the configured issuers, or None."""
        if len(token) > MAX_TOKEN:
            return None
        parts = token.split(".")
        if len(parts) != 3:
            return None
        try:
            header, claims = json.loads(_unb64(parts[0])), json.loads(_unb64(parts[1]))
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(header, dict) or not isinstance(claims, dict):
            return None
        now = time.time() if now is None else now
        for a in self.authenticators:
            if claims.get("iss") != a.url:
                continue  # the API server hands a token only to the authenticator of its issuer
            if not a.verify(parts, header, claims, now):
                return None
            return a.identity(claims)
        return None


def install(api: Any, config: dict[str, Any] | str) -> OIDCAuthenticators:
    """Give a running emulator (devkit.kubeapi.KubeAPI) this AuthenticationConfiguration."""
    authn = OIDCAuthenticators.from_yaml(config) if isinstance(config, str) else OIDCAuthenticators(config)
    api.cluster.auth.jwt_authenticators = authn
    return authn
