"""A stranger's first commands: the README's two, in a fresh clone with nothing beside it.

The repository is cloned into an empty directory (no sibling folders, no MESH_AGENT_CRDS), then the
demo runs end to end and the test command runs a fast subset there. Anything the project reads from
outside its clone makes this fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]

pytestmark = [
    pytest.mark.subprocess,
    pytest.mark.timeout(1200),
    pytest.mark.skipif(not (REPO / ".git").exists() or not shutil.which("git"), reason="needs a git checkout"),
]


def readme_commands() -> list[str]:
    """The commands the README gives, in the order it gives them."""
    text = (REPO / "README.md").read_text()
    return re.findall(r"^(\./scripts/\S+\.sh)\s*$", text, flags=re.M)


def clean_env() -> dict[str, str]:
    drop = ("MESH_AGENT_", "VIRTUAL_ENV", "PYTHON", "PYTEST_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return env


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    empty = tmp_path_factory.mktemp("stranger")
    target = empty / "mesh-agent"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(target)], check=True, timeout=120)
    assert sorted(p.name for p in empty.iterdir()) == ["mesh-agent"]  # nothing beside the clone
    return target


def test_the_readme_gives_the_demo_and_the_test_command() -> None:
    assert readme_commands() == ["./scripts/demo.sh", "./scripts/test.sh"]
    assert (REPO / ".ci" / "run").read_text().strip().endswith("./scripts/test.sh")


def test_the_demo_runs_end_to_end_in_a_fresh_clone(clone: Path) -> None:
    r = subprocess.run(["./scripts/demo.sh"], cwd=clone, env=clean_env(), capture_output=True, text=True,
                       timeout=900, check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "Traceback" not in out
    assert "withdrawn" in out and "Done." in out


def test_the_test_command_passes_in_a_fresh_clone(clone: Path) -> None:
    # The whole suite runs in CI's own clone; here a fast part shows the command works with nothing beside it.
    r = subprocess.run(["./scripts/test.sh", "-q", "-p", "no:cacheprovider", "tests/unit",
                        "tests/integration/kubeapi/test_validation.py"],
                       cwd=clone, env=clean_env(), capture_output=True, text=True, timeout=900, check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert re.search(r"\d+ passed", out), out[-2000:]
    assert " error" not in out.splitlines()[-1], out[-2000:]
