"""Authentication (static bearer tokens, service-account JWTs it mints) and RBAC-like authorization."""

from __future__ import annotations

import base64
import functools
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
ISSUER = "https://kubernetes.default.svc.cluster.local"


@dataclass(frozen=True)
class Identity:
    user: str
    groups: tuple[str, ...] = ()
    uid: str = ""

    @property
    def all_groups(self) -> tuple[str, ...]:
        return (*self.groups, "system:authenticated")


@dataclass(frozen=True)
class Rule:
    """Like an RBAC rule. namespaces=None means cluster-wide (a ClusterRoleBinding); a tuple limits it
    to those namespaces (RoleBindings), which never covers cluster-scoped resources or all-namespace lists.
    Resources name subresources as "serviceaccounts/token", "workloadentries/status"."""

    verbs: tuple[str, ...] = ("*",)
    api_groups: tuple[str, ...] = ("*",)
    resources: tuple[str, ...] = ("*",)
    namespaces: tuple[str, ...] | None = None
    resource_names: tuple[str, ...] = ()

    def allows(self, verb: str, group: str, resource: str, namespace: str, name: str) -> bool:
        if "*" not in self.verbs and verb not in self.verbs:
            return False
        if "*" not in self.api_groups and group not in self.api_groups:
            return False
        if "*" not in self.resources and resource not in self.resources:
            return False
        if self.namespaces is not None and (not namespace or namespace not in self.namespaces):
            return False
        return not self.resource_names or (bool(name) and name in self.resource_names)


ADMIN = (Rule(),)


def rules(verbs: str | list[str], resources: str | list[str], namespaces: str | list[str] | None = None,
          groups: str | list[str] = "*", names: list[str] | None = None) -> Rule:
    """Shorthand: rules("get,list", "workloadentries", "vm-apps")."""
    def split(v: str | list[str]) -> tuple[str, ...]:
        return tuple(x.strip() for x in v.split(",")) if isinstance(v, str) else tuple(v)

    return Rule(split(verbs), split(groups), split(resources),
                None if namespaces is None else split(namespaces), tuple(names or ()))


@functools.cache
def _signing_key() -> rsa.RSAPrivateKey:
    # One key per process: tokens only need to be unforgeable by clients, and making keys is slow.
    return rsa.generate_private_key(65537, 2048)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class _StaticToken:
    identity: Identity
    expires_at: float | None  # wall-clock seconds


@dataclass
class Authenticator:
    """Maps bearer tokens to identities and identities to rules."""

    key: rsa.RSAPrivateKey = field(default_factory=lambda: _signing_key())
    kid: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    tokens: dict[str, _StaticToken] = field(default_factory=dict)
    policies: dict[str, list[Rule]] = field(default_factory=dict)  # user or group name -> rules
    lock: threading.Lock = field(default_factory=threading.Lock)
    # More rules for an identity from elsewhere: the stored Roles and RoleBindings.
    extra_rules: Callable[[Identity], list[Rule]] | None = None
    # JWTs from configured issuers (devkit.kubeapi.oidc.OIDCAuthenticators), as --authentication-config.
    jwt_authenticators: Any = None

    def add_token(self, token: str, identity: Identity | str,
                  policy: tuple[Rule, ...] | list[Rule] | None = None,
                  *, expires_at: float | None = None) -> Identity:
        ident = Identity(identity) if isinstance(identity, str) else identity
        with self.lock:
            self.tokens[token] = _StaticToken(ident, expires_at)
        if policy:
            self.grant(ident.user, policy)
        return ident

    def revoke(self, token: str) -> None:
        with self.lock:
            self.tokens.pop(token, None)

    def grant(self, subject: str, policy: tuple[Rule, ...] | list[Rule]) -> None:
        """Give a user (or a group, e.g. system:serviceaccounts:vm-apps) more rules."""
        with self.lock:
            self.policies.setdefault(subject, []).extend(policy)

    def set_policy(self, subject: str, policy: tuple[Rule, ...] | list[Rule]) -> None:
        with self.lock:
            self.policies[subject] = list(policy)

    # --- service-account tokens -----------------------------------------------------------------

    def mint(self, namespace: str, sa_name: str, sa_uid: str, audiences: list[str], lifetime: int,
             now: float | None = None) -> tuple[str, int]:
        """A signed JWT for a service account; returns (token, exp)."""
        iat = int(now if now is not None else time.time())
        exp = iat + lifetime
        claims = {
            "aud": audiences, "exp": exp, "iat": iat, "nbf": iat, "iss": ISSUER,
            "sub": f"system:serviceaccount:{namespace}:{sa_name}", "jti": str(uuid.uuid4()),
            "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": sa_name, "uid": sa_uid}},
        }
        header = {"alg": "RS256", "kid": self.kid}
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        sig = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64(sig)}", exp

    def verify_jwt(self, token: str) -> dict[str, Any] | None:
        parts = token.split(".")
        if len(parts) != 3:
            return None
        try:
            self.key.public_key().verify(_unb64(parts[2]), f"{parts[0]}.{parts[1]}".encode(),
                                         padding.PKCS1v15(), hashes.SHA256())
            claims = json.loads(_unb64(parts[1]))
        except (InvalidSignature, ValueError):
            return None
        return claims if isinstance(claims, dict) else None

    def authenticate(self, token: str, sa_uid_lookup: Any) -> Identity | None:
        """The identity for a bearer token, or None (401). sa_uid_lookup(ns, name) -> uid or None."""
        with self.lock:
            static = self.tokens.get(token)
        if static:
            if static.expires_at is not None and time.time() >= static.expires_at:
                return None
            return static.identity
        if self.jwt_authenticators is not None:
            ident = self.jwt_authenticators.authenticate(token)
            if ident is not None:
                return ident
        claims = self.verify_jwt(token)
        if not claims:
            return None
        now = time.time()
        if claims.get("exp", 0) <= now or claims.get("nbf", 0) > now + 5 or claims.get("iss") != ISSUER:
            return None
        if API_AUDIENCE not in claims.get("aud", []):
            return None  # e.g. an istio-ca token: valid for istiod, not for the API server
        info = claims.get("kubernetes.io", {})
        ns, sa = info.get("namespace", ""), info.get("serviceaccount", {})
        if sa_uid_lookup(ns, sa.get("name", "")) != sa.get("uid"):
            return None  # the service account was deleted (or re-created) since the token was minted
        return Identity(claims["sub"], ("system:serviceaccounts", f"system:serviceaccounts:{ns}"),
                        sa.get("uid", ""))

    def allowed(self, ident: Identity, verb: str, group: str, resource: str, namespace: str,
                name: str) -> bool:
        with self.lock:
            subjects = [ident.user, *ident.all_groups]
            candidates = [r for s in subjects for r in self.policies.get(s, [])]
        if any(r.allows(verb, group, resource, namespace, name) for r in candidates):
            return True
        extra = self.extra_rules(ident) if self.extra_rules else []
        return any(r.allows(verb, group, resource, namespace, name) for r in extra)


def forbidden_message(ident: Identity, verb: str, group: str, resource: str, namespace: str, name: str,
                      subresource: str = "") -> str:
    what = f'{resource}.{group}' if group else resource
    res = f"{resource}/{subresource}" if subresource else resource
    subject = f'{what} "{name}" is forbidden' if name else f"{what} is forbidden"
    scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
    return (f'{subject}: User "{ident.user}" cannot {verb} resource "{res}" in API group "{group}" '
            f"{scope}")
