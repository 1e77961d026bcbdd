"""agent.fsutil never writes through a symbolic link, refuses directories other users control, and sets
mode and owner on every write."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent import fsutil


def mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def test_a_link_at_the_target_is_replaced_not_followed(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("root only\n")
    secret.chmod(0o600)
    (tmp_path / "d").mkdir()
    (tmp_path / "d/istio-token").symlink_to(secret)
    fsutil.atomic_write(tmp_path / "d/istio-token", b"token", 0o600)
    assert secret.read_text() == "root only\n"
    assert not (tmp_path / "d/istio-token").is_symlink()
    assert (tmp_path / "d/istio-token").read_bytes() == b"token"


def test_an_existing_file_gets_the_mode_asked_for(tmp_path: Path) -> None:
    target = tmp_path / "istio-token"
    target.write_bytes(b"old")
    target.chmod(0o644)
    fsutil.atomic_write(target, b"new", 0o600)
    assert mode(target) == 0o600 and target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["istio-token"]  # no temp file left


def test_group_or_world_writable_directories_are_refused(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o777)
    with pytest.raises(fsutil.UnsafePathError, match=r"open: writable by group or others \(mode 0777\)"):
        fsutil.atomic_write(d / "f", b"x", 0o644)
    assert not list(d.iterdir())
    d.chmod(0o1777)  # sticky, as /tmp: other users cannot rename or remove our files
    fsutil.atomic_write(d / "f", b"x", 0o644)
    fsutil.atomic_write(d / "g", b"x", 0o644, secure=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_a_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "theirs"
    d.mkdir()
    os.chown(d, 65534, 65534)
    with pytest.raises(fsutil.UnsafePathError, match="owned by uid 65534, not root"):
        fsutil.atomic_write(d / "f", b"x", 0o644)
    fsutil.atomic_write(d / "f", b"x", 0o644, owner=(65534, 65534))  # the file's own owner may own it
    assert os.stat(d / "f").st_uid == 65534


def test_links_in_safe_directories_are_followed_on_the_way(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "run").symlink_to("real")  # as /var/run -> /run
    fsutil.atomic_write(tmp_path / "run/../run/x", b"1", 0o644)
    assert (tmp_path / "real/x").read_bytes() == b"1"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_a_link_in_a_directory_another_user_controls_is_not_trusted(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    (tmp_path / "safe").mkdir()
    (theirs / "tokens").symlink_to(tmp_path / "safe")
    with pytest.raises(fsutil.UnsafePathError, match="theirs: owned by uid 65534"):
        fsutil.atomic_write(theirs / "tokens/istio-token", b"t", 0o600)
    assert not list((tmp_path / "safe").iterdir())


def test_read_nofollow(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    (tmp_path / "l").symlink_to(tmp_path / "f")
    assert fsutil.read_nofollow(tmp_path / "f") == b"x"
    assert fsutil.read_nofollow(tmp_path / "missing") is None
    with pytest.raises(fsutil.UnsafePathError, match="a symbolic link where a file belongs"):
        fsutil.read_nofollow(tmp_path / "l")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(fsutil.UnsafePathError, match="not a regular file"):
        fsutil.read_nofollow(tmp_path / "fifo")
