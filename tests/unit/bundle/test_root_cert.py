"""root-cert.pem's check (agent.bundle.credentials.check_root_cert) with real certificates: every refusal,
every warning, and the subject and times read through the ssl module agreeing with what cryptography
reads from the same certificate."""

from __future__ import annotations

import datetime as dt
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.bundle.credentials import CERT_WARN_BEFORE, check_root_cert
from devkit import bundles as kit

NOW = time.time()
DAY = 86400.0


def check(text: str | bytes, now: float = NOW) -> tuple[float | None, list[str], list[str]]:
    problems: list[str] = []
    warnings: list[str] = []
    expiry = check_root_cert(text.decode() if isinstance(text, bytes) else text, now, problems, warnings)
    return expiry, problems, warnings


def cert_with(name: x509.Name, *, ca: bool | None = True, days_valid: float = 365.0) -> bytes:
    """A self-signed certificate with this subject; ca=None: no basicConstraints at all."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = dt.datetime.fromtimestamp(NOW, dt.UTC) - dt.timedelta(days=1)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(start)
               .not_valid_after(start + dt.timedelta(days=days_valid)))
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _utc(pem: bytes, name: str) -> float:
    """not_valid_after/before as a timestamp; the *_utc properties are cryptography >= 42 (Debian 12 has 38)."""
    cert = x509.load_pem_x509_certificate(pem)
    when = getattr(cert, f"{name}_utc", None) or getattr(cert, name).replace(tzinfo=dt.UTC)
    return float(when.timestamp())


def after_of(pem: bytes) -> float:
    return _utc(pem, "not_valid_after")


def iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_a_valid_root_gives_its_expiry_and_no_remarks() -> None:
    pem = kit.make_cert(NOW)
    assert check(pem) == (after_of(pem), [], [])


def test_several_roots_give_the_earliest_expiry() -> None:
    first, second = kit.make_cert(NOW, days_valid=400), kit.make_cert(NOW, days_valid=100, cn="Old Root")
    assert check(first + second) == (after_of(second), [], [])


def test_no_pem_block_is_refused() -> None:
    assert check("hello\n") == (None, ["root-cert.pem: no PEM certificate found"], [])


def test_a_private_key_is_refused_by_name() -> None:
    pem = kit.make_cert(NOW) + b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    _, problems, _ = check(pem)
    line = pem.decode().count("\n", 0, pem.index(b"-----BEGIN PRIVATE")) + 1
    assert problems == [f"root-cert.pem:{line}: block 2 is a private key; never ship keys in a bundle, "
                        "not a CERTIFICATE"]


def test_another_kind_of_block_is_refused() -> None:
    _, problems, _ = check("-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n")
    assert problems == ["root-cert.pem:1: block 1 is X509 CRL, not a CERTIFICATE"]


@pytest.mark.parametrize("body", [
    "bm90IGEgY2VydA==",   # valid base64 of "not a cert"
    "!!!! not base64 ****",
    "",
])
def test_a_block_that_is_not_a_certificate_cannot_be_read(body: str) -> None:
    expiry, problems, _ = check(f"-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n")
    assert expiry is None
    assert len(problems) == 1 and problems[0].startswith("root-cert.pem:1: certificate 1 cannot be read: "), problems


def test_a_truncated_certificate_cannot_be_read() -> None:
    lines = kit.make_cert(NOW).decode().splitlines()
    cut = "\n".join([*lines[:3], *lines[-1:]]) + "\n"  # the header, two lines of base64, the footer
    _, problems, _ = check(cut)
    assert len(problems) == 1 and "certificate 1 cannot be read" in problems[0], problems


def test_an_expired_root_is_refused_naming_it_and_when() -> None:
    pem = kit.make_cert(NOW - 9e6, days_valid=30)
    assert check(pem) == (None, [f"root-cert.pem:1: certificate 1 (CN=Mesh Root CA,O=cluster.local) expired at "
                                 f"{iso(after_of(pem))}"], [])


def test_an_expired_root_among_good_ones_is_named_by_its_line() -> None:
    good, old = kit.make_cert(NOW), kit.make_cert(NOW - 9e6, days_valid=30, cn="Old")
    _, problems, _ = check(good + old)
    line = (good + old).decode().count("\n", 0, len(good)) + 1
    assert problems == [f"root-cert.pem:{line}: certificate 2 (CN=Old,O=cluster.local) expired at {iso(after_of(old))}"]


@pytest.mark.parametrize("ca", [False, None], ids=["ca-false", "no-basic-constraints"])
def test_a_leaf_certificate_is_refused(ca: bool | None) -> None:
    pem = cert_with(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "billing.vm-apps")]), ca=ca)
    assert check(pem) == (None, ["root-cert.pem:1: certificate 1 is not a CA certificate (basicConstraints "
                                 "CA:TRUE missing); root-cert.pem holds the mesh's root CA"], [])


def test_a_root_close_to_expiry_is_a_warning() -> None:
    pem = kit.make_cert(NOW, days_valid=5)
    expiry, problems, warnings = check(pem)
    assert expiry == after_of(pem) and problems == []
    assert warnings == [f"root-cert.pem: certificate 1 (CN=Mesh Root CA,O=cluster.local) expires soon, at "
                        f"{iso(after_of(pem))}"]
    assert after_of(pem) - NOW < CERT_WARN_BEFORE


def test_a_root_not_valid_yet_is_a_warning_about_the_clock() -> None:
    pem = kit.make_cert(NOW, days_before=-2)
    expiry, problems, warnings = check(pem)
    before = _utc(pem, "not_valid_before")
    assert expiry == after_of(pem) and problems == []
    assert warnings == [f"root-cert.pem: certificate 1 (CN=Mesh Root CA,O=cluster.local) is not valid before "
                        f"{iso(before)}; is this machine's clock right?"]


def test_text_outside_the_blocks_is_refused() -> None:
    _, problems, _ = check(kit.make_cert(NOW) + b"trailing words\n")
    assert problems == ["root-cert.pem: text outside PEM blocks"]


@pytest.mark.parametrize("attrs", [
    [(NameOID.COUNTRY_NAME, "DE"), (NameOID.STATE_OR_PROVINCE_NAME, "Berlin"), (NameOID.LOCALITY_NAME, "Mitte"),
     (NameOID.ORGANIZATION_NAME, "Acme, Inc."), (NameOID.ORGANIZATIONAL_UNIT_NAME, "mesh+roots"),
     (NameOID.COMMON_NAME, "Root <1>; \"quoted\" \\ back")],
    [(NameOID.DOMAIN_COMPONENT, "local"), (NameOID.DOMAIN_COMPONENT, "cluster"), (NameOID.COMMON_NAME, "#hash ")],
    [(NameOID.ORGANIZATION_NAME, " leading space"), (NameOID.COMMON_NAME, "Ünïcode Root")],
], ids=["every-escape", "dc-and-hash", "space-and-unicode"])
def test_the_subject_reads_as_cryptography_writes_it(attrs: list[tuple[x509.ObjectIdentifier, str]]) -> None:
    name = x509.Name([x509.NameAttribute(oid, value) for oid, value in attrs])
    pem = cert_with(name, days_valid=3)  # expires soon: the warning names the subject
    _, problems, warnings = check(pem)
    assert problems == []
    assert warnings[0].startswith(f"root-cert.pem: certificate 1 ({name.rfc4514_string()}) expires soon"), \
        (warnings, name.rfc4514_string())


def test_an_empty_subject_is_named_so() -> None:
    _, _, warnings = check(cert_with(x509.Name([]), days_valid=3))
    assert warnings[0].startswith("root-cert.pem: certificate 1 ((empty subject)) expires soon")
