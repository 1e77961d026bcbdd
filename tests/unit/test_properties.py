"""Property-based tests of every reader of outside input: whatever the bytes, each yields a result or its
module's own error, never another exception and never a hang (a deadline per case). Derandomized, so CI
sees the same cases every run."""

from __future__ import annotations

import base64
import copy
import io
import json
import tarfile
import time
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import jwtclaims, safeload
from agent.bundle import model
from agent.bundle.clusterenv import format_cluster_env, scan_cluster_env
from agent.bundle.hosts import scan_hosts
from agent.bundle.model import KNOWN_FILES, BundleError, parse_bundle, parse_cluster_env
from agent.bundle.source import FetchError, read_archive
from devkit import bundles as kit

NOW = time.time()
GOOD = kit.files(NOW, extras=True)
CFG = kit.config()

fast = settings(derandomize=True, deadline=2000, max_examples=150, database=None,
                suppress_health_check=[HealthCheck.too_slow])

# Text that looks like the formats under test: their special characters, often.
SPECIAL = st.sampled_from([*"'\"$`\\=#\n\r\t :[]{},-&*!|>%@?", "\0", "é", "'\"'\"'", "---\n", "  "])
LIKELY = st.lists(st.one_of(SPECIAL, st.text(max_size=8)), max_size=60).map("".join)
ANY_TEXT = st.one_of(st.text(max_size=300), LIKELY)

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=20))
KEYS = st.one_of(st.text(max_size=12), st.sampled_from(["httpGet", "exec", "port", "name", "user", "cluster"]),
                 st.integers(-3, 3), st.booleans(), st.none())
TREES = st.recursive(SCALARS, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                     st.dictionaries(KEYS, kids, max_size=4)),
                     max_leaves=25)


def paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a document (mapping keys, list indices), the document itself first."""
    out = [prefix]
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        out += paths(v, (*prefix, k))
    return out


def replaced(doc: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    out = copy.deepcopy(doc)
    node = out
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return out


def merged(doc: Any, path: tuple, extra: dict) -> Any:
    node = replaced(doc, (), copy.deepcopy(doc))
    target = node
    for k in path:
        target = target[k]
    if isinstance(target, dict):
        target.update(extra)
    return node


def mutations(text: str) -> st.SearchStrategy[str]:
    """A good YAML document with one place (any depth) replaced by an arbitrary tree, or given extra keys."""
    doc = yaml.safe_load(text)
    where = st.sampled_from(paths(doc))
    return st.one_of(st.tuples(where, TREES).map(lambda pv: yaml.safe_dump(replaced(doc, *pv))),
                     st.tuples(where, st.dictionaries(KEYS, TREES, min_size=1, max_size=3))
                     .map(lambda pv: yaml.safe_dump(merged(doc, *pv))))


def parse(files: dict[str, bytes]) -> None:
    try:
        b = parse_bundle(files, NOW, CFG)
    except BundleError as exc:
        assert exc.problems and all(isinstance(p, str) and p and "\n" not in p for p in exc.problems), exc.problems
        return
    model.summary(b)  # what `bundle show` prints is computable too
    json.dumps(model.summary(b), allow_nan=False)


@fast
@given(ANY_TEXT)
def test_cluster_env(text: str) -> None:
    _entries, problems = scan_cluster_env(text)
    assert all(isinstance(p, str) for p in problems)
    try:
        pairs = parse_cluster_env(text)
    except BundleError:
        return
    # What parses is written back by the one writer and reads the same.
    assert parse_cluster_env(format_cluster_env(pairs, sort=False)) == pairs


@fast
@given(ANY_TEXT)
def test_hosts(text: str) -> None:
    lines, problems = scan_hosts(text)
    assert all(isinstance(p, str) for p in problems)
    assert scan_hosts("\n".join(map(str, lines)))[0] == lines


@fast
@given(st.one_of(ANY_TEXT, TREES.map(lambda t: yaml.safe_dump(t)),
                 TREES.map(lambda t: yaml.safe_dump({"defaultConfig": t})),
                 TREES.map(lambda t: yaml.safe_dump({"defaultConfig": {"readinessProbe": t}}))))
def test_mesh_yaml(text: str) -> None:
    parse({**GOOD, "mesh.yaml": text.encode()})


@fast
@given(st.one_of(*(st.tuples(st.just(n), mutations(GOOD[n].decode()))
                   for n in ("mesh.yaml", "workloadgroup.yaml", "kubeconfig", "sidecar.yaml"))))
def test_yaml_files_with_one_place_replaced(case: tuple[str, str]) -> None:
    name, text = case
    parse({**GOOD, name: text.encode()})


@fast
@given(st.sampled_from(["workloadgroup.yaml", "kubeconfig", "sidecar.yaml"]),
       st.one_of(ANY_TEXT, TREES.map(yaml.safe_dump),
                 TREES.map(lambda t: yaml.safe_dump({"users": [{"name": "u", "user": t}], "clusters": t,
                                                     "contexts": [{"name": "c", "context": t}],
                                                     "current-context": "c"})),
                 TREES.map(lambda t: yaml.safe_dump({"apiVersion": "networking.istio.io/v1",
                                                     "kind": "WorkloadGroup", "metadata": t, "spec": t}))))
def test_yaml_extras(name: str, text: str) -> None:
    parse({**GOOD, name: text.encode()})


@fast
@given(ANY_TEXT)
def test_safeload(text: str) -> None:
    for load in (safeload.load_yaml, safeload.load_json):
        try:
            load(text)
        except safeload.LoadError as exc:
            assert "\n" not in str(exc)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


CLAIM_VALUES = st.one_of(TREES, st.floats(), st.integers(min_value=-(10**30), max_value=10**30))
CLAIMS = st.dictionaries(st.sampled_from(["exp", "iat", "nbf", "aud", "sub", "kubernetes.io", "x"]),
                         CLAIM_VALUES, max_size=6)


GOOD_CLAIMS = json.loads(base64.urlsafe_b64decode(GOOD["istio-token"].split(b".")[1] + b"=="))


@fast
@given(st.tuples(st.sampled_from(paths(GOOD_CLAIMS)), st.one_of(TREES, st.floats(), st.integers())))
def test_token_claims_with_one_place_replaced(case: tuple[tuple, Any]) -> None:
    claims = replaced(GOOD_CLAIMS, *case)
    token = f"{b64(b'{}')}.{b64(json.dumps(claims).encode())}.sig"
    parse({**GOOD, "istio-token": token.encode()})


@fast
@given(st.one_of(ANY_TEXT, st.binary(max_size=200),
                 CLAIMS.map(lambda c: f"{b64(b'{}')}.{b64(json.dumps(c).encode())}.sig"),
                 st.text(alphabet="[]{},0123456789.e-\"", max_size=200).map(
                     lambda t: f"{b64(b'{}')}.{b64(t.encode())}.sig")))
def test_jwt(token: str | bytes) -> None:
    try:
        tok = jwtclaims.read(token)
    except jwtclaims.TokenError as exc:
        assert "\n" not in str(exc)
        return
    for t in (tok.expiry, tok.issued_at, tok.not_before):
        assert t is None or 0 < t <= jwtclaims.MAX_EPOCH
    raw = token.encode() if isinstance(token, str) else token
    parse({**GOOD, "istio-token": raw})


MEMBERS = st.lists(st.tuples(
    st.one_of(st.sampled_from([*KNOWN_FILES, "vm/cluster.env", "../x", "/etc/passwd", "a/b/c", "./hosts"]),
              st.text(max_size=20)),
    st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE,
                     tarfile.CHRTYPE]),
    st.binary(max_size=64)), max_size=8)


def make_tar(members: list[tuple[str, bytes, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, kind, data in members:
            info = tarfile.TarInfo(name or "x")
            info.type = kind
            if kind == tarfile.REGTYPE:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                info.linkname = "target"
                tf.addfile(info)
    return buf.getvalue()


@fast
@given(st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(lambda b: b"\x1f\x8b" + b),
                 MEMBERS.map(make_tar),
                 st.tuples(st.just(kit.make_tar(GOOD)), st.integers(0, 2000), st.binary(min_size=1, max_size=4))
                 .map(lambda t: t[0][:t[1]] + t[2] + t[0][t[1] + len(t[2]):])))
def test_archive(data: bytes) -> None:
    try:
        files = read_archive(data, 64 * 1024)
    except FetchError as exc:
        assert str(exc)
        return
    assert set(files) <= set(KNOWN_FILES)
    parse(files)


@fast
@given(st.dictionaries(st.sampled_from([*KNOWN_FILES, "evil"]),
                       st.one_of(st.binary(max_size=100), st.sampled_from(list(GOOD.values()))), max_size=10))
def test_whole_bundle(files: dict[str, bytes]) -> None:
    parse(files)


def test_the_properties_really_reach_the_good_paths() -> None:
    """The strategies above include valid inputs: a good bundle, archive and token parse."""
    parse_bundle(read_archive(kit.make_tar(GOOD), 64 * 1024), NOW, CFG)
    assert jwtclaims.read(GOOD["istio-token"]).expiry is not None




def test_what_the_properties_found() -> None:
    """Each crashed the bundle check with a TypeError, or made a problem span lines, before."""
    kube = yaml.safe_load(GOOD["kubeconfig"])
    cases = {
        "kubeconfig": [replaced(kube, ("contexts", 0, "context", "cluster"), []),
                       replaced(kube, ("current-context",), [1])],
        "mesh.yaml": [{"defaultConfig": {"readinessProbe": {"tcpSocket": {"port": 80}, 1: "x", "a": "y"}}}],
        "sidecar.yaml": [{"\n": None, "url": "https://x/y.deb", "version": "1", "sha256": "0" * 64}],
    }
    for name, docs in cases.items():
        for doc in docs:
            files = {**GOOD, name: yaml.safe_dump(doc).encode()}
            try:
                parse_bundle(files, NOW, CFG)
            except BundleError as exc:
                assert all("\n" not in p for p in exc.problems), exc.problems
                continue
            raise AssertionError(f"{name} {doc!r} was accepted")
