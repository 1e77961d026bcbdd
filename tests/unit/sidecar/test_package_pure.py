"""The pure parts of the package step: sources, commands, dpkg-query output."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import PackageConfig
from agent.sidecar.package import (
    SYSTEMD_RUN,
    PackageError,
    PackageSource,
    choose_source,
    install_command,
    parse_dpkg_status,
)

SHA = "ab" * 32


def test_config_wins_over_the_bundle() -> None:
    bundle = {"url": "https://b.example/s.deb", "version": "1.0", "sha256": SHA}
    cfg = PackageConfig(url="/srv/s.deb", version="2.0", sha256=SHA.upper())
    assert choose_source(cfg, bundle) == PackageSource("/srv/s.deb", "2.0", SHA)
    assert choose_source(PackageConfig(), bundle) == PackageSource("https://b.example/s.deb", "1.0", SHA)
    assert choose_source(PackageConfig(), None) is None


def test_sidecar_yaml_accepts_path_and_name_and_rejects_gaps() -> None:
    src = PackageSource.from_mapping({"path": "/x.deb", "version": "1", "sha256": SHA,
                                      "name": "istio-sidecar-v2"})
    assert (src.url, src.name) == ("/x.deb", "istio-sidecar-v2")
    with pytest.raises(PackageError, match="missing url or path, sha256"):
        PackageSource.from_mapping({"version": "1"})
    with pytest.raises(PackageError, match="64 hex digits"):
        PackageSource.from_mapping({"url": "/x", "version": "1", "sha256": "xyz"})
    with pytest.raises(PackageError, match="version must be a string"):
        PackageSource.from_mapping({"url": "/x", "version": 1.2, "sha256": SHA})


def test_install_commands() -> None:
    deb = Path("/var/lib/mesh-agent/sidecar/istio-sidecar_1.deb")
    assert install_command(deb, Path("/"), SYSTEMD_RUN) == [
        *SYSTEMD_RUN, "apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "--allow-downgrades",
        "--no-install-recommends", str(deb)]
    assert SYSTEMD_RUN[:4] == ("systemd-run", "--wait", "--collect", "--quiet")
    assert install_command(deb, Path("/tmp/vm"), ()) == ["dpkg", "--root=/tmp/vm", "--force-confnew", "-i",
                                                         str(deb)]


@pytest.mark.parametrize(("out", "version"), [
    ("installed 1:1.24.0-1", "1:1.24.0-1"), ("config-files 1.0", None), ("not-installed ", None), ("", None)])
def test_dpkg_status(out: str, version: str | None) -> None:
    assert parse_dpkg_status(out) == version
