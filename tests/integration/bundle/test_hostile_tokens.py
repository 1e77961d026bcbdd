"""Tokens whose time claims are NaN, infinite or absurd: `bundle verify`, `install` and `show` answer with
one clear line, install nothing, and never print a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.bundle.install import install
from agent.bundle.model import parse_bundle
from agent.bundle.store import last_good
from devkit import bundles as kit
from devkit.roots import make_root, tree_hash
from tests.unit.test_jwtclaims import claims_with, raw_token

pytestmark = pytest.mark.subprocess

REPO = Path(__file__).resolve().parents[3]
NOW = time.time()


def agent(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "agent", "bundle", *args], env=env, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("claim", ['"exp": NaN', '"exp": 1e400', '"exp": 1e20', '"iat": 1e20', '"exp": -1e20'])
def test_verify_and_install_refuse_absurd_times(claim: str, tmp_path: Path) -> None:
    src = kit.write_dir(tmp_path / "vm", kit.files(NOW, replace={
        "istio-token": raw_token(claims_with(claim)).encode()}))
    layout = make_root(tmp_path)
    before = tree_hash(layout.root)
    for args in (("verify", str(src)), ("install", "--root", str(layout.root), str(src))):
        r = agent(*args)
        assert r.returncode == 1, r.stderr
        assert "Traceback" not in r.stderr and "Error:" not in r.stderr, r.stderr
        assert "the bundle is invalid:\n  istio-token: " in r.stderr, r.stderr
    assert tree_hash(layout.root) == before


def test_show_of_an_installed_bundle_with_a_bad_token_is_one_clear_line(tmp_path: Path) -> None:
    """A bundle stored by an earlier version that accepted `exp: NaN` (meta.json holds NaN)."""
    layout = make_root(tmp_path)
    install(parse_bundle(kit.files(NOW), NOW, kit.config()), layout, source="test", fetched_at=NOW, user=None)
    stored = last_good(layout)
    assert stored is not None and stored.path is not None
    (stored.path / "istio-token").write_text(raw_token(claims_with('"exp": NaN')))
    meta = json.loads((stored.path / "meta.json").read_text())
    meta["token_expiry"] = float("nan")
    (stored.path / "meta.json").write_text(json.dumps(meta))
    r = agent("show", "--root", str(layout.root))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr, r.stderr
    assert "istio-token: the JWT's claims: not valid JSON: NaN is not a number JSON allows" in r.stderr
