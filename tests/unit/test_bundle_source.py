"""Source helpers that need no network: archive reading in memory, names shown in logs."""

from __future__ import annotations

import gzip
import io
import tarfile
import time

import pytest

from agent.bundle.source import FetchError, display_source, read_archive
from devkit import bundles as kit

NOW = time.time()


def test_display_source_drops_credentials_and_query() -> None:
    assert display_source("https://user:pw@bundles.example:8443/vm.tar.gz?token=abc#x") == \
        "https://bundles.example:8443/vm.tar.gz"
    assert display_source("https://[fd00::1]/b.tar.gz") == "https://[fd00::1]/b.tar.gz"
    assert display_source("/srv/bundle") == "/srv/bundle"


@pytest.mark.parametrize("prefix", ["", "./", "vm/", "./vm/"])
def test_archive_layouts_tar_commonly_makes(prefix: str) -> None:
    files = kit.files(NOW)
    extra = [tarfile.TarInfo(prefix.rstrip("/") or ".")]
    extra[0].type = tarfile.DIRTYPE
    data = kit.make_tar(files, prefix=prefix, extra=extra)
    assert read_archive(data, 1 << 20) == files


def test_two_top_level_directories_are_not_stripped() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name in ("a/cluster.env", "b/mesh.yaml"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(FetchError, match=r"a/cluster\.env: unknown file"):
        read_archive(buf.getvalue(), 1 << 20)


def test_concatenated_gzip_members_are_read() -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:") as tf:
        info = tarfile.TarInfo("hosts")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"a b"))
    tar = raw.getvalue()
    data = gzip.compress(tar[:512]) + gzip.compress(tar[512:])
    assert read_archive(data, 1 << 20) == {"hosts": b"a b"}


def test_all_problems_of_an_archive_are_listed() -> None:
    bad = [tarfile.TarInfo("../x"), tarfile.TarInfo("/abs"), tarfile.TarInfo("link")]
    bad[2].type, bad[2].linkname = tarfile.SYMTYPE, "/etc"
    with pytest.raises(FetchError) as exc:
        read_archive(kit.make_tar({}, extra=bad), 1 << 20)
    assert str(exc.value).count("\n") == 3
