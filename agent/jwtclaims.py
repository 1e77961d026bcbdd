"""The one JWT reader: a token's header and claims, decoded but not verified (only the Kubernetes API
server can verify a service-account token, and istiod has it do so). Used by the bundle check, the
cluster source and the agent's own credential renewal.

A token is data from outside: its size, its JSON (agent.safeload: depth and value caps, no NaN) and its
time claims are checked here, so every user gets sane numbers or one clear line (TokenError)."""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.safeload import LoadError, load_json

MAX_TOKEN = 16 * 1024  # bytes; a service-account token is about 1 KiB
MAX_DEPTH = 8  # kubernetes.io.serviceaccount.name is 3 levels deep
MAX_ITEMS = 1000
TIME_CLAIMS = ("exp", "iat", "nbf")
MAX_EPOCH = 253402300799  # 9999-12-31T23:59:59Z, the last second datetime can show


class TokenError(ValueError):
    """The token cannot be read; the message is one line."""


@dataclass(frozen=True)
class Token:
    header: Mapping[str, Any]
    claims: Mapping[str, Any]

    @property
    def expiry(self) -> float | None:
        return self.time("exp")

    @property
    def issued_at(self) -> float | None:
        return self.time("iat")

    @property
    def not_before(self) -> float | None:
        return self.time("nbf")

    def time(self, key: str) -> float | None:
        v = self.claims.get(key)
        return None if v is None else float(v)

    @property
    def audiences(self) -> tuple[str, ...]:
        aud = self.claims.get("aud")
        if isinstance(aud, str):
            return (aud,)
        if isinstance(aud, list):
            return tuple(a for a in aud if isinstance(a, str))
        return ()


_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def _b64url(part: str, what: str) -> bytes:
    if not _B64URL.fullmatch(part):  # the decoder would silently skip other characters
        raise TokenError(f"the JWT's {what} is not base64url")
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise TokenError(f"the JWT's {what} is not base64url") from None


def check_time(key: str, v: Any) -> float | None:
    """A time claim: None when absent, else an integer or finite float in (0, year 9999]."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TokenError(f"claim {key} must be a number of seconds since 1970, got {str(v)[:40]!r}")
    if isinstance(v, float) and not math.isfinite(v):
        raise TokenError(f"claim {key} must be a finite number, got {v}")
    if not 0 < v <= MAX_EPOCH:
        raise TokenError(f"claim {key} is out of range: {str(v)[:40]} is not between 1970 and year 9999")
    return float(v)


def read(token: str | bytes) -> Token:
    """Decode header.payload.signature; check size, JSON shape and time claims. Raises TokenError."""
    if len(token) > MAX_TOKEN:
        raise TokenError(f"the token is {len(token)} bytes, more than the limit of {MAX_TOKEN}")
    if isinstance(token, bytes):
        try:
            token = token.decode("ascii")
        except UnicodeDecodeError:
            raise TokenError("not a JWT (not ASCII)") from None
    parts = token.strip().split(".")
    if len(parts) != 3 or not all(parts[:2]):
        raise TokenError("not a JWT (expected header.payload.signature)")
    docs = []
    for part, what in ((parts[0], "header"), (parts[1], "claims")):
        try:
            doc = load_json(_b64url(part, what), f"the JWT's {what}", max_size=MAX_TOKEN,
                            max_depth=MAX_DEPTH, max_items=MAX_ITEMS)
        except LoadError as exc:
            raise TokenError(str(exc)) from None
        if not isinstance(doc, dict):
            raise TokenError(f"the JWT's {what} must be a JSON object")
        docs.append(doc)
    header, claims = docs
    for key in TIME_CLAIMS:
        check_time(key, claims.get(key))
    return Token(header, claims)
