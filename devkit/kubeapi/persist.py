"""State kept in the state directory across restarts (the standalone `--persist` mode): the CA, the
token-signing key, the admin token and the stored objects. A restarted emulator then still accepts
the kubeconfigs and service-account tokens it handed out, and still has its objects."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import secrets
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from devkit.kubeapi.store import Store

OBJECTS = "objects.json"


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _pem_key(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_or_make_ca(state: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = state / "ca.crt", state / "ca.key"
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cert, key
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubeapi emulator CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         key_cert_sign=True, crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write_private(key_path, _pem_key(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def issue_server_cert(state: Path, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                      host: str) -> tuple[Path, Path]:
    """A fresh server certificate for this run (loopback names and `host`); returns (cert, key) paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName("localhost")]
    for ip in {"127.0.0.1", "::1", host}:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            sans.append(x509.DNSName(ip))
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubeapi emulator")]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = state / "server.crt", state / "server.key"
    _write_private(key_path, _pem_key(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def load_or_make_signing_key(state: Path) -> rsa.RSAPrivateKey:
    path = state / "sa.key"
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), None)
        assert isinstance(key, rsa.RSAPrivateKey)
        return key
    key = rsa.generate_private_key(65537, 2048)
    _write_private(path, _pem_key(key))
    return key


def load_or_make_token(state: Path) -> str:
    path = state / "admin.token"
    if path.exists():
        return path.read_text().strip()
    token = secrets.token_urlsafe(24)
    _write_private(path, token.encode())
    return token


def save_objects(store: Store, state: Path) -> None:
    with store.lock:
        data = {"resourceVersion": store.rv,
                "objects": [[group, plural, obj] for (group, plural), objs in sorted(store.objects.items())
                            for obj in objs.values()]}
    _write_private(state / OBJECTS, json.dumps(data).encode())


def load_objects(store: Store, state: Path) -> bool:
    """Replace the store's content with the saved one; False when nothing was saved."""
    path = state / OBJECTS
    if not path.exists():
        return False
    data = json.loads(path.read_text())
    with store.lock:
        store.objects.clear()
        for group, plural, obj in data["objects"]:
            meta = obj["metadata"]
            store.objects.setdefault((group, plural), {})[(meta.get("namespace", ""), meta["name"])] = obj
        store.rv = max(store.rv, int(data["resourceVersion"]))
        store.compact()  # no history survives a restart: older watches get 410, as after etcd compaction
    return True
