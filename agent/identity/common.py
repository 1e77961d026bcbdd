"""What every identity provider shares: the token it returns, JWT claims read without verifying them,
and HTTP calls to a metadata service with bounded timeouts, clear errors and agent.retry's backoff.

The claims are read only to learn the expiry (to refresh in time) and to show who the VM is; the API
server verifies the signature, issuer and audience. Reading them is still strict (agent.jwtclaims, the
agent's one JWT reader: size, base64url, JSON objects, finite times in range), and an unsigned token is
refused here with a message, instead of failing later in an obscure way.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from agent import download, jwtclaims
from agent.retry import Backoff, RetryableError, call_with_retries

MAX_TOKEN = jwtclaims.MAX_TOKEN  # bytes; real identity tokens are 1-3 KiB
MAX_ANSWER = 64 * 1024  # a metadata answer (JSON or XML around the token)
_B64URL = re.compile(r"^[A-Za-z0-9_-]*$")
T = TypeVar("T")


class IdentityError(Exception):
    """The identity token cannot be had; the message says why and what to check."""


@dataclass(frozen=True)
class Token:
    """An identity token and its times (wall clock, seconds)."""

    jwt: str
    expiry: float
    issued: float
    claims: Mapping[str, Any] = field(default_factory=dict)

    @property
    def lifetime(self) -> float:
        return max(0.0, self.expiry - self.issued)

    def refresh_in(self, fraction: float) -> float:
        """Seconds from issue until the token should be replaced (a fraction of its lifetime)."""
        return fraction * self.lifetime


class Provider(Protocol):
    name: str

    @property
    def where(self) -> str: ...  # the endpoint or file, for messages and `doctor`

    def fetch(self) -> Token: ...


class MetadataService:
    """What the providers that ask a metadata service at `endpoint + PATH` share: where they ask, and
    the retries around one request (`_once`). Subclasses are dataclasses with `endpoint` and `tries`."""

    PATH = ""
    endpoint: str
    tries: int

    @property
    def where(self) -> str:
        return self.endpoint.rstrip("/") + self.PATH

    def fetch(self) -> Token:
        return with_retries(self._once, self.tries)

    def _once(self) -> Token:
        raise NotImplementedError


def decode(jwt: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of a compact JWS, not verified (agent.jwtclaims, the one JWT reader), refusing
    an unsigned one. Raises IdentityError for anything malformed."""
    try:
        token = jwtclaims.read(jwt)
    except jwtclaims.TokenError as exc:
        raise IdentityError(f"the identity token: {exc}") from None
    signature = jwt.strip().split(".")[2]
    if str(token.header.get("alg", "")).lower() == "none" or not signature:
        raise IdentityError("the token is unsigned (alg none): the API server would refuse it")
    if not _B64URL.match(signature):
        raise IdentityError("the token's signature is not base64url")
    return dict(token.header), dict(token.claims)


def token_from_jwt(jwt: str, *, expiry: float | None = None, now: float | None = None) -> Token:
    """A Token from a JWT: exp from the claims (or the provider's answer), iat else now."""
    jwt = jwt.strip()
    _, claims = decode(jwt)  # the time claims are checked there: finite, in range
    exp = claims.get("exp")
    if exp is not None:
        expiry = float(exp)
    if expiry is None:
        raise IdentityError("the token has no exp claim")
    iat = claims.get("iat")
    issued = float(iat) if iat is not None else (time.time() if now is None else now)
    return Token(jwt, expiry, issued, claims)


def audiences(claims: Mapping[str, Any]) -> tuple[str, ...]:
    aud = claims.get("aud")
    if isinstance(aud, str):
        return (aud,)
    return tuple(a for a in aud if isinstance(a, str)) if isinstance(aud, list) else ()


# --- HTTP to a metadata service -------------------------------------------------------------------

@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes


def http(method: str, url: str, *, headers: Mapping[str, str], params: Mapping[str, str] | None = None,
         data: bytes | None = None, timeout: float, hint: str, session: Any = None) -> Answer:
    """One request. Unreachable, timeouts, 429 and 5xx raise RetryableError; the rest is returned.

    `hint` ends the message for an unreachable service ("is this VM on GCP?"). Redirects are not
    followed and no proxy is used: metadata services are link-local and must answer themselves."""
    import requests
    import urllib3

    # requests' timeout bounds each wait, not the whole answer: the deadline (agent.download) does.
    with download.Deadline(timeout) as deadline:
        s = session or download.session(deadline)
        s.trust_env = False  # an HTTP(S)_PROXY for the VM's traffic must not see the metadata request
        try:
            resp = s.request(method, url, headers=dict(headers), params=params, data=data,
                             timeout=(min(timeout, 3.0), timeout), allow_redirects=False, stream=True)
            try:
                body = resp.raw.read(MAX_ANSWER + 1, decode_content=True)
            finally:
                resp.close()
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            why = f"no answer within {timeout:g} s" if deadline.expired else type(exc).__name__
            raise RetryableError(f"no metadata service answered at {url}: {hint} ({why})") from None
        finally:
            if session is None:
                s.close()
        if deadline.expired:
            raise RetryableError(f"no metadata service answered at {url}: {hint} (no answer within {timeout:g} s)")
    if len(body) > MAX_ANSWER:
        raise IdentityError(f"{url}: the answer is larger than {MAX_ANSWER} bytes")
    if resp.status_code == 429 or resp.status_code >= 500:
        retry_after = resp.headers.get("Retry-After")
        delay = float(retry_after) if retry_after and retry_after.isdigit() else None
        raise RetryableError(f"{url}: {resp.status_code} {_snippet(body)}", delay)
    return Answer(resp.status_code, dict(resp.headers), body)


def _snippet(body: bytes, limit: int = 200) -> str:
    text = body.decode("utf-8", "replace").strip().replace("\n", " ")
    return text[:limit] + ("..." if len(text) > limit else "")


def refused(url: str, answer: Answer, what: str) -> IdentityError:
    return IdentityError(f"{url}: {what} refused: {answer.status} {_snippet(answer.body)}")


def with_retries(op: Callable[[], T], tries: int, *, backoff: Backoff | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """Run op, retrying what may pass on a second try; the last failure becomes an IdentityError."""
    try:
        return call_with_retries(op, backoff or Backoff(initial=0.2, max=2.0), max(1, tries), sleep=sleep)
    except RetryableError as exc:
        raise IdentityError(str(exc)) from None
