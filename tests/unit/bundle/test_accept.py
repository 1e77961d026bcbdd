"""agent.bundle.accept, the one path a fetched or built bundle takes (daemon, `mesh-agent bundle install`,
the `kubernetes` source): prepare refuses or decides without touching anything live; commit installs."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from agent.bundle import accept
from agent.bundle.install import InstallError, MissingUser
from agent.bundle.model import BundleError
from agent.bundle.source import Validators
from agent.bundle.store import last_good
from agent.paths import Layout
from devkit import bundles as kit
from devkit.roots import ORIGINAL_HOSTS, make_root, tree_hash

NOW = time.time()
USER = "nobody" if os.geteuid() == 0 else None  # a user that exists; ownership needs root


def prepare(layout: Layout, files: dict[str, bytes], now: float = NOW) -> accept.Candidate | accept.Unchanged:
    return accept.prepare(files, source="test-source", cfg=kit.config(), now=now, layout=layout,
                          installed=last_good(layout))


def accept_files(layout: Layout, files: dict[str, bytes], now: float = NOW) -> accept.Candidate:
    prepared = prepare(layout, files, now)
    assert isinstance(prepared, accept.Candidate)
    accept.commit(prepared, layout, user=USER, validators=None)
    return prepared


def test_commit_installs_and_records_the_source(tmp_path: Path) -> None:
    layout = make_root(tmp_path)
    files = kit.files(NOW)
    prepared = prepare(layout, files)
    assert isinstance(prepared, accept.Candidate)
    assert (prepared.source, prepared.fetched_at) == ("test-source", NOW)
    result = accept.commit(prepared, layout, user=USER, validators=Validators('"v7"', "Tue, 01 Dec 2026"))
    assert set(result.changed) == {"cluster.env", "mesh.yaml", "root-cert.pem", "istio-token", "hosts"}
    assert result.ownership_applied == (USER is not None)
    i = result.installed
    assert (i.digest, i.source, i.fetched_at) == (prepared.bundle.digest, "test-source", NOW)
    assert (i.etag, i.last_modified) == ('"v7"', "Tue, 01 Dec 2026")
    assert last_good(layout) == i
    assert layout.cluster_env.read_bytes() == files["cluster.env"]
    assert layout.istio_token.read_bytes() == files["istio-token"]
    assert layout.etc_hosts.read_bytes().startswith(ORIGINAL_HOSTS)


def test_prepare_touches_nothing_even_for_a_good_bundle(tmp_path: Path) -> None:
    layout = make_root(tmp_path)
    accept_files(layout, kit.files(NOW))
    before = tree_hash(layout.root)
    assert isinstance(prepare(layout, kit.files(NOW + 60)), accept.Candidate)
    assert tree_hash(layout.root) == before


@pytest.mark.parametrize("installed_first", [False, True])
def test_a_refused_bundle_leaves_the_live_tree_byte_identical(tmp_path: Path, installed_first: bool) -> None:
    layout = make_root(tmp_path)
    if installed_first:
        accept_files(layout, kit.files(NOW))
    before = tree_hash(layout.root)
    bad = kit.files(NOW, replace={"istio-token": kit.make_token(NOW - 7200),  # expired an hour ago
                                  "cluster.env": b"A=$(reboot)\n"})
    with pytest.raises(BundleError) as err:
        prepare(layout, bad)
    assert err.value.problems[0] == "cluster.env:1: A: unquoted '$': a shell would expand it (command or " \
        "variable substitution); quote the value with single quotes"
    assert any(p.startswith("istio-token: the token expired at") for p in err.value.problems)
    assert tree_hash(layout.root) == before


def test_unchanged_only_when_same_digest_and_nothing_drifted(tmp_path: Path) -> None:
    layout = make_root(tmp_path)
    files = kit.files(NOW)
    accept_files(layout, files)
    again = prepare(layout, files, NOW + 30)
    assert isinstance(again, accept.Unchanged) and again.installed == last_good(layout)
    # No installed bundle known: the same files are a candidate.
    assert isinstance(accept.prepare(files, source="s", cfg=kit.config(), now=NOW, layout=layout,
                                     installed=None), accept.Candidate)
    # A different bundle is a candidate.
    assert isinstance(prepare(layout, kit.files(NOW, replace={"hosts": b""})), accept.Candidate)


@pytest.mark.parametrize("what", ["cluster.env edited", "token deleted", "token mode", "hosts block edited"])
def test_drift_makes_the_same_bundle_a_candidate_that_repairs_it(tmp_path: Path, what: str) -> None:
    layout = make_root(tmp_path)
    files = kit.files(NOW)
    accept_files(layout, files)
    if what == "cluster.env edited":
        layout.cluster_env.write_bytes(b"ISTIO_SERVICE_CIDR='*'\n")
    elif what == "token deleted":
        layout.istio_token.unlink()
    elif what == "token mode":
        layout.istio_token.chmod(0o644)
    else:
        layout.etc_hosts.write_bytes(layout.etc_hosts.read_bytes().replace(b"192.0.2.10", b"192.0.2.99"))
    prepared = prepare(layout, files)
    assert isinstance(prepared, accept.Candidate)
    result = accept.commit(prepared, layout, user=USER, validators=None)
    want = {"cluster.env edited": "cluster.env", "token deleted": "istio-token", "token mode": "istio-token",
            "hosts block edited": "hosts"}[what]
    assert result.changed == (want,)
    assert isinstance(prepare(layout, files), accept.Unchanged)


@pytest.mark.skipif(os.geteuid() != 0, reason="owners are managed only as root")
def test_commit_without_the_owner_changes_nothing(tmp_path: Path) -> None:
    layout = make_root(tmp_path)
    prepared = prepare(layout, kit.files(NOW))
    assert isinstance(prepared, accept.Candidate)
    before = tree_hash(layout.root)
    with pytest.raises(MissingUser, match="does not exist"):
        accept.commit(prepared, layout, user="mesh-agent-test-no-such-user", validators=None)
    assert tree_hash(layout.root) == before


def test_commit_refuses_damaged_hosts_markers_before_anything(tmp_path: Path) -> None:
    layout = make_root(tmp_path)
    accept_files(layout, kit.files(NOW))
    layout.etc_hosts.write_bytes(layout.etc_hosts.read_bytes().replace(b"# END mesh-agent\n", b""))
    prepared = prepare(layout, kit.files(NOW + 60))
    assert isinstance(prepared, accept.Candidate)
    before = tree_hash(layout.root)
    with pytest.raises(InstallError, match="marker lines are damaged"):
        accept.commit(prepared, layout, user=USER, validators=None)
    assert tree_hash(layout.root) == before
