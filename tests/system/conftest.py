"""Fixtures of the system layer: the built .deb, and booted Debian machines (machine.py).

Everything that boots needs root (mount and PID namespaces, debootstrap); without it those tests
are skipped with the reason. The first run on a machine builds the root file systems (about a
minute each, cached under /var/cache/mesh-agent-tests).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from agent import __version__
from tests.system.machine import Machine

REPO = Path(__file__).resolve().parents[2]
BUILD_PACKAGES = ("dpkg-dev", "debhelper", "dh-python", "pybuild-plugin-pyproject", "python3-all",
                  "python3-setuptools", "fakeroot")
# A version dpkg sorts after this tree's, for upgrade tests.
NEXT_VERSION = f"{__version__}+next1"


def missing_build_tools() -> list[str]:
    """The Debian packages build-deb needs that are not installed."""
    p = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\\n", *BUILD_PACKAGES],
                       capture_output=True, text=True)
    installed = {line.split()[0] for line in p.stdout.splitlines() if line.endswith(" installed")}
    return [name for name in BUILD_PACKAGES if name not in installed]


def build_deb(out: Path, version: str | None = None, tree: Path = REPO) -> Path:
    """Run packaging/build-deb of `tree` (this one, or an older release's) into `out`; the .deb's path."""
    missing = missing_build_tools()
    if missing:
        pytest.skip(f"cannot build the .deb: missing {', '.join(missing)} (scripts/setup.sh --system-test)")
    argv = [str(tree / "packaging" / "build-deb"), "--out", str(out),
            *(["--version", version] if version else [])]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"build-deb failed:\n{p.stdout}\n{p.stderr}"
    (deb,) = out.glob("mesh-agent_*.deb")
    return deb


def daemon_available() -> bool:
    """Whether this tree (what the .deb is built from) has `mesh-agent run`: agent/daemon.py."""
    return (REPO / "agent" / "daemon.py").exists()


needs_daemon = pytest.mark.skipif(not daemon_available(),
                                  reason="`mesh-agent run` is not in this tree yet (no agent/daemon.py)")


@pytest.fixture(scope="session")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The .deb built from this tree."""
    return build_deb(tmp_path_factory.mktemp("deb"))


@pytest.fixture(scope="session")
def deb_next(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tree built as a newer version (NEXT_VERSION), to upgrade to."""
    return build_deb(tmp_path_factory.mktemp("deb-next"), NEXT_VERSION)


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("booting a test machine needs root (mount and PID namespaces, debootstrap)")
    for tool in ("debootstrap", "unshare", "nsenter"):
        if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
            pytest.skip(f"booting a test machine needs {tool}")


BootFactory = Callable[[str], AbstractContextManager[Machine]]


@pytest.fixture
def boot(tmp_path: Path) -> Iterator[BootFactory]:
    """`with boot("bookworm") as m:` a freshly booted machine, powered off at the end of the block."""
    require_root()
    count = 0

    def factory(suite: str) -> AbstractContextManager[Machine]:
        nonlocal count
        count += 1
        return Machine.boot(suite, tmp_path / f"{suite}-{count}")

    yield factory
