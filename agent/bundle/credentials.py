"""The bundle's credentials: root-cert.pem (readable CA certificates only, not expired; a warning near
expiry) and istio-token (the JWT's claims against cluster.env). Pure: text and the time in, facts and
problems out. Signatures are not checked here: the API server checks the token when istiod asks it.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent import jwtclaims

TOKEN_AUDIENCE = "istio-ca"
CERT_WARN_BEFORE = 30 * 86400.0  # a root certificate this close to expiry gets a warning
CLOCK_SKEW = 300.0  # a token issued this far in the future means the VM's clock is wrong


# --- root-cert.pem --------------------------------------------------------------------------------

_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.S)

# OpenSSL's long attribute names, as RFC 4514 writes them; others are shown as OpenSSL names them.
_SHORT_NAMES = {"commonName": "CN", "localityName": "L", "stateOrProvinceName": "ST", "organizationName": "O",
                "organizationalUnitName": "OU", "countryName": "C", "streetAddress": "STREET",
                "domainComponent": "DC", "userId": "UID"}


@dataclass(frozen=True)
class _Cert:
    subject: str
    not_before: float
    not_after: float


class _NotCA(ValueError):
    pass


def _escape(value: str) -> str:
    out = "".join("\\" + c if c in '\\"+,;<>' else "\\00" if c == "\0" else c for c in value)
    if out[:1] in ("#", " "):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


def _rfc4514(name: tuple[tuple[tuple[str, str], ...], ...]) -> str:
    """The subject as RFC 4514 writes it (last RDN first), from the ssl module's nested tuples."""
    return ",".join("+".join(f"{_SHORT_NAMES.get(k, k)}={_escape(v)}" for k, v in rdn) for rdn in reversed(name))


def _read_cert(body: str) -> _Cert:
    """One PEM block's body through OpenSSL, as the standard library's ssl module exposes it: loaded as a
    trust anchor, since that is what root-cert.pem holds. Raises ValueError (ssl.SSLError is an OSError,
    mapped here) when it cannot be read, _NotCA when it reads but is not a CA certificate."""
    try:
        der = base64.b64decode("".join(body.split()), validate=True)
    except binascii.Error as exc:
        raise ValueError(f"bad base64: {exc}") from None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # an empty store: never the system's CAs
    try:
        ctx.load_verify_locations(cadata=der)
    except ssl.SSLError as exc:
        raise ValueError(exc.reason or str(exc)) from None
    # get_ca_certs() lists only certificates OpenSSL accepts as CAs (X509_check_ca: basicConstraints
    # CA:TRUE, or an old self-signed v1 root); a leaf certificate loads but is not listed.
    found = ctx.get_ca_certs()
    if not found:
        raise _NotCA("not a CA certificate (basicConstraints CA:TRUE missing)")
    info: dict[str, Any] = found[0]  # typeshed gives every value the union of all fields' types
    return _Cert(subject=_rfc4514(info["subject"]), not_before=float(ssl.cert_time_to_seconds(info["notBefore"])),
                 not_after=float(ssl.cert_time_to_seconds(info["notAfter"])))


def _when(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_root_cert(text: str, now: float, problems: list[str], warnings: list[str],
                    file: str = "root-cert.pem") -> float | None:
    """The earliest expiry among the certificates, or None when unusable."""
    blocks = list(_PEM_BLOCK.finditer(text))
    if not blocks:
        problems.append(f"{file}: no PEM certificate found")
        return None
    earliest: float | None = None
    for i, m in enumerate(blocks, 1):
        line = text.count("\n", 0, m.start()) + 1
        label = m.group(1)
        if label != "CERTIFICATE":
            what = "a private key; never ship keys in a bundle" if "PRIVATE KEY" in label else label
            problems.append(f"{file}:{line}: block {i} is {what}, not a CERTIFICATE")
            continue
        try:
            cert = _read_cert(m.group(2))
        except _NotCA as exc:
            problems.append(f"{file}:{line}: certificate {i} is {exc}; root-cert.pem holds the mesh's root CA")
            continue
        except ValueError as exc:
            problems.append(f"{file}:{line}: certificate {i} cannot be read: {exc}")
            continue
        subject = cert.subject or "(empty subject)"
        after, before = cert.not_after, cert.not_before
        if after <= now:
            problems.append(f"{file}:{line}: certificate {i} ({subject}) expired at {_when(after)}")
            continue
        if after - now < CERT_WARN_BEFORE:
            warnings.append(f"{file}: certificate {i} ({subject}) expires soon, at {_when(after)}")
        if before > now + CLOCK_SKEW:
            warnings.append(f"{file}: certificate {i} ({subject}) is not valid before {_when(before)}; "
                            "is this machine's clock right?")
        earliest = after if earliest is None else min(earliest, after)
    rest = _PEM_BLOCK.sub("", text).strip()
    if rest:
        problems.append(f"{file}: text outside PEM blocks")
    return earliest


# --- istio-token ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenInfo:
    expiry: float | None
    issued_at: float | None
    subject: str
    audiences: tuple[str, ...]


def check_token(text: str, env: Mapping[str, str], now: float, problems: list[str],
                warnings: list[str], file: str = "istio-token") -> TokenInfo | None:
    """Decode the JWT's claims (agent.jwtclaims) and check them against cluster.env. The signature is the
    API server's to check (istiod sends the token to it in a TokenReview); a forged token gets no
    certificate."""
    try:
        tok = jwtclaims.read(text)
    except jwtclaims.TokenError as exc:
        problems.append(f"{file}: {exc}")
        return None
    claims = tok.claims
    before = len(problems)
    exp, iat, nbf = tok.expiry, tok.issued_at, tok.not_before
    if exp is not None and exp <= now:
        problems.append(f"{file}: the token expired at {_when(exp)}; make a new bundle")
    if exp is None:
        warnings.append(f"{file}: the token has no expiry (exp); "
                        "the bundle is refreshed every bundle.refresh_interval")
    for key, v in (("iat", iat), ("nbf", nbf)):
        if v is not None and v > now + CLOCK_SKEW:
            warnings.append(f"{file}: claim {key} is {_when(v)}, in the future; "
                            "is this machine's clock right?")
    audiences = tok.audiences
    if TOKEN_AUDIENCE not in audiences:
        problems.append(f"{file}: audience must include {TOKEN_AUDIENCE!r}, got {list(audiences)}; "
                        "make the token with `--audience istio-ca` (istioctl does)")
    sub = claims.get("sub")
    prefix = "system:serviceaccount:"
    if not isinstance(sub, str) or not sub.startswith(prefix) or sub.count(":") != 3:
        problems.append(f"{file}: subject must be system:serviceaccount:<namespace>:<name>, got {sub!r}")
        sub = ""
    else:
        ns, sa = sub[len(prefix):].split(":")
        want_ns, want_sa = env.get("POD_NAMESPACE"), env.get("SERVICE_ACCOUNT")
        if want_ns is not None and ns != want_ns:
            problems.append(f"{file}: token is for namespace {ns!r} but cluster.env POD_NAMESPACE "
                            f"is {want_ns!r}")
        if want_sa is not None and sa != want_sa:
            problems.append(f"{file}: token is for service account {sa!r} but cluster.env SERVICE_ACCOUNT "
                            f"is {want_sa!r}")
    if len(problems) != before:
        return None
    return TokenInfo(exp, iat, sub, audiences)

