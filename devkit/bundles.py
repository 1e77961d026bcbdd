"""Mesh bundles in istioctl's exact format, with certificates and tokens made on the spot (nothing that
expires is committed)."""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import tarfile
from functools import cache
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.config import BundleConfig

NS, SA = "vm-apps", "billing-vm"

# cluster.env exactly as istioctl writes it: lines sorted, every value single-quoted (istioctl's safe set is
# tiny), a quote inside a value written '"'"'. APP_NOTE stands for any proxyMetadata key.
CLUSTER_ENV_V4 = """\
APP_NOTE='it'"'"'s $(not run) `nor this`'
CANONICAL_REVISION='latest'
CANONICAL_SERVICE='billing'
CA_ADDR='istiod.istio-system.svc:15012'
ISTIO_INBOUND_PORTS='8080'
ISTIO_LOCAL_EXCLUDE_PORTS='22,15090,15021,15020'
ISTIO_METAJSON_LABELS='{"app":"billing","service.istio.io/canonical-name":"billing","service.istio.io/canonical-revision":"latest","version":"v1"}'
ISTIO_META_CLUSTER_ID='cluster1'
ISTIO_META_DNS_CAPTURE='true'
ISTIO_META_MESH_ID='mesh1'
ISTIO_META_NETWORK=''
ISTIO_META_POD_PORTS='[{"name":"http","containerPort":8080}]'
ISTIO_META_WORKLOAD_NAME='billing'
ISTIO_NAMESPACE='vm-apps'
ISTIO_SERVICE='billing.vm-apps'
ISTIO_SERVICE_CIDR='*'
ISTIO_SVC_IP='10.0.0.5'
POD_NAMESPACE='vm-apps'
SERVICE_ACCOUNT='billing-vm'
TRUST_DOMAIN='cluster.local'
"""

CLUSTER_ENV_V6 = (CLUSTER_ENV_V4.replace("ISTIO_SVC_IP='10.0.0.5'", "ISTIO_SVC_IP='fd00:10:0:1::5'")
                  .replace("ISTIO_META_NETWORK=''", "ISTIO_META_NETWORK='vm-net6'"))

MESH_YAML = """\
defaultConfig:
  discoveryAddress: istiod.istio-system.svc:15012
  meshId: mesh1
  proxyMetadata:
    CANONICAL_REVISION: latest
    CANONICAL_SERVICE: billing
    ISTIO_META_CLUSTER_ID: cluster1
    ISTIO_META_WORKLOAD_NAME: billing
    POD_NAMESPACE: vm-apps
    SERVICE_ACCOUNT: billing-vm
    TRUST_DOMAIN: cluster.local
  readinessProbe:
    httpGet:
      path: /ready
      port: 8080
    periodSeconds: 5
"""

HOSTS_V4 = "192.0.2.10 istiod.istio-system.svc\n"
HOSTS_V6 = "fd00:10:96::10 istiod.istio-system.svc\n"

WORKLOADGROUP = f"""\
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata:
  name: billing
  namespace: {NS}
spec:
  metadata:
    labels:
      app: billing
      version: v1
  template:
    serviceAccount: {SA}
    ports:
      http: 8080
  probe:
    httpGet:
      path: /ready
      port: 8080
    periodSeconds: 5
"""

SIDECAR_YAML = """\
url: https://packages.example.com/istio-sidecar_1.24.2_amd64.deb
version: "1.24.2"
sha256: "00000000000000000000000000000000000000000000000000000000000000ab"
"""

KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters:
- name: mesh
  cluster:
    server: https://127.0.0.1:6443
    certificate-authority-data: Zm9v
users:
- name: agent
  user:
    token: not-a-real-token-just-text
contexts:
- name: mesh
  context:
    cluster: mesh
    user: agent
    namespace: vm-apps
current-context: mesh
"""


@cache
def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_cert(now: float, *, days_valid: float = 3650.0, days_before: float = 1.0,
              cn: str = "Mesh Root CA", ca: bool = True) -> bytes:
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster.local"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    start = dt.datetime.fromtimestamp(now, dt.UTC) - dt.timedelta(days=days_before)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(dt.datetime.fromtimestamp(now, dt.UTC) + dt.timedelta(days=days_valid))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_token(now: float, *, ns: str = NS, sa: str = SA, aud: object = ("istio-ca",),
               lifetime: float = 3600.0, claims: dict | None = None) -> bytes:
    """A service-account JWT shaped like the API server's, signed with a throwaway key."""
    body = {"aud": list(aud) if isinstance(aud, tuple | list) else aud,
            "exp": int(now + lifetime), "iat": int(now), "nbf": int(now),
            "iss": "https://kubernetes.default.svc.cluster.local",
            "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "1234"}},
            "sub": f"system:serviceaccount:{ns}:{sa}"}
    body.update(claims or {})
    body = {k: v for k, v in body.items() if v is not None}
    signing_input = _b64(json.dumps({"alg": "ES256", "kid": "test"}).encode()) + "." + \
        _b64(json.dumps(body, separators=(",", ":")).encode())
    sig = _key().sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    return (signing_input + "." + _b64(sig)).encode()


def files(now: float, *, ipv6: bool = False, extras: bool = False,
          replace: dict[str, bytes | None] | None = None) -> dict[str, bytes]:
    """A valid bundle as istioctl writes it; replace= swaps files (None removes one)."""
    out = {
        "cluster.env": (CLUSTER_ENV_V6 if ipv6 else CLUSTER_ENV_V4).encode(),
        "mesh.yaml": MESH_YAML.encode(),
        "root-cert.pem": make_cert(now),
        "istio-token": make_token(now),
        "hosts": (HOSTS_V6 if ipv6 else HOSTS_V4).encode(),
    }
    if extras:
        out["workloadgroup.yaml"] = WORKLOADGROUP.encode()
        out["sidecar.yaml"] = SIDECAR_YAML.encode()
        out["kubeconfig"] = KUBECONFIG.encode()
    for name, data in (replace or {}).items():
        if data is None:
            out.pop(name, None)
        else:
            out[name] = data
    return out


def write_dir(path: Path, content: dict[str, bytes]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, data in content.items():
        (path / name).write_bytes(data)
        (path / name).chmod(0o744)  # istioctl's mode
    return path


def make_tar(content: dict[str, bytes], *, prefix: str = "",
             extra: list[tarfile.TarInfo] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in content.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tf.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return buf.getvalue()


def config(source: str = "/nonexistent", **kw: object) -> BundleConfig:
    return BundleConfig(source=source, **kw)  # type: ignore[arg-type]
