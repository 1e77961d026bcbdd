"""The agent's own Kubernetes credential: a bound service-account token it renews for itself.

A bound token (TokenRequest) expires; an agent that holds one and may `create serviceaccounts/token`
for its own service account mints the next one before the current one expires, and writes it over
registry.token_file atomically. The registry's client (agent.kube.auth.TokenFile) reads the file
again whenever it changes, so the new token is used from the next request on.

Who the agent is comes from the token itself (its `kubernetes.io` claims: namespace and service
account), so no extra configuration is needed. The new token keeps the current one's audiences and
lifetime.

Trust: whoever holds a valid token can keep renewing it for as long as the rule allows; deleting the
service account (bound tokens die with it) or the rule ends that. See docs/bundle-from-cluster.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import jwtclaims
from agent.background import Background
from agent.fsutil import atomic_write
from agent.redact import register_secret

log = logging.getLogger(__name__)

MIN_LIFETIME = 600  # the API server refuses shorter TokenRequests


class CredentialError(Exception):
    """The token cannot be renewed; the message says why."""


@dataclass(frozen=True)
class TokenClaims:
    namespace: str
    service_account: str
    audiences: tuple[str, ...]
    issued: float
    expiry: float

    @property
    def lifetime(self) -> float:
        return max(0.0, self.expiry - self.issued)


def read_claims(token: str) -> TokenClaims:
    """The claims of a service-account JWT (not verified: only the API server can, and will)."""
    try:
        tok = jwtclaims.read(token)
    except jwtclaims.TokenError as exc:
        raise CredentialError(f"the token cannot be read: {exc}") from None
    claims = tok.claims
    try:
        k8s = claims["kubernetes.io"]
        aud = claims.get("aud") or []
        return TokenClaims(namespace=k8s["namespace"], service_account=k8s["serviceaccount"]["name"],
                           audiences=tuple([aud] if isinstance(aud, str) else aud),
                           issued=tok.issued_at or tok.not_before or 0.0, expiry=float(claims["exp"]))
    except (IndexError, KeyError, TypeError, ValueError) as exc:
        raise CredentialError("the token is not a bound service-account token (no kubernetes.io, "
                              f"exp claims): it cannot be renewed with TokenRequest ({exc})") from None


def renew_at(claims: TokenClaims, fraction: float = 0.7) -> float:
    """Wall-clock time at which to renew."""
    return claims.issued + fraction * claims.lifetime


def write_atomically(path: str, data: bytes, mode: int = 0o600) -> None:
    """Readers see the old token or the new one (agent.fsutil), in a directory made if missing."""
    target = Path(path).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, data, mode)


def renew_own_token(kube: Any, token_file: str, *, lifetime: int | None = None) -> TokenClaims:
    """Mint the next token for the service account the current one belongs to; write it to token_file.

    kube: an agent.kube.client.Kube authenticated with the current token (the registry's).
    Raises CredentialError for a token that cannot be renewed, or the registry's ApiError (Unauthorized
    names the missing RBAC rule) for a refused or failed call.
    """
    from agent.kube.core import CoreCalls

    try:
        with open(token_file, encoding="utf-8") as f:
            current = read_claims(f.read())
    except OSError as exc:
        raise CredentialError(f"cannot read {token_file}: {exc.strerror}") from None
    seconds = max(MIN_LIFETIME, int(lifetime or current.lifetime or 3600))
    what = f'serviceaccounts/token "{current.service_account}" in namespace {current.namespace}'
    # The registry's errors (mapped, under the request deadline), which say what to fix.
    answer = CoreCalls(kube).create_token(current.namespace, current.service_account, seconds,
                                          list(current.audiences) if current.audiences else None)
    token = ((answer.get("status") or {}).get("token") or "").strip()
    if not token:
        raise CredentialError(f"create {what}: the answer carried no token")
    register_secret(token)
    new = read_claims(token)
    write_atomically(token_file, (token + "\n").encode(), 0o600)
    log.info("renewed the agent's own token for %s/%s; valid until %s", new.namespace, new.service_account,
             time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(new.expiry)))
    return new


@dataclass(frozen=True)
class OwnTokenRenewed:
    expiry: float


@dataclass(frozen=True)
class OwnTokenRenewFailed:
    error: str
    retry_in: float
    expiry: float | None  # of the token still in use


class OwnTokenRenewer(Background):
    """A thread that renews the agent's token at `fraction` of its lifetime and posts the outcome.

    Failures are retried with agent.retry's backoff; the current token stays in use until it expires.
    """

    def __init__(self, kube: Any, token_file: str, post: Callable[[object], None], *,
                 fraction: float = 0.7, backoff: Any = None, clock: Callable[[], float] = time.time) -> None:
        from agent.retry import Backoff

        self.kube = kube
        self.token_file = token_file
        self.post = post
        self.fraction = fraction
        self.backoff = backoff or Backoff(initial=1.0, max=60.0)
        self.clock = clock
        super().__init__("own-token-renew")

    def _current(self) -> TokenClaims | None:
        try:
            with open(self.token_file, encoding="utf-8") as f:
                return read_claims(f.read())
        except (OSError, CredentialError):
            return None

    def run(self) -> None:
        # The first wait comes from the token's claims and this VM's clock; after a renewal, from the
        # new token's lifetime alone, so a skewed clock cannot make it renew in a loop.
        claims = self._current()
        wait = max(0.0, renew_at(claims, self.fraction) - self.clock()) if claims else 0.0
        while not self._stop.is_set():
            if wait and self._stop.wait(wait):
                return
            claims = self._current()
            try:
                new = renew_own_token(self.kube, self.token_file)
            except Exception as exc:  # reported and retried; the current token stays in use
                delay = self.backoff.next_delay(getattr(exc, "retry_after", None))
                log.warning("renewing the agent's own token failed (retry in %.1fs): %s", delay, exc)
                self.post(OwnTokenRenewFailed(str(exc), delay, claims.expiry if claims else None))
                wait = delay
                continue
            self.backoff.reset()
            self.post(OwnTokenRenewed(new.expiry))
            wait = max(1.0, self.fraction * new.lifetime)
