"""The development kit stands apart from the tests: devkit/, demo/ and bench/ never import from tests/.

A static scan of every import statement (and of the string given to import_module, importorskip and
__import__), so that a helper moved back under tests/ fails here rather than in a fresh clone's demo.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KIT = ("devkit", "demo", "bench")
DYNAMIC = {"import_module", "importorskip", "__import__"}


def _is_tests(module: str) -> bool:
    return module == "tests" or module.startswith("tests.")


def imports_of_tests(source: str, filename: str = "<source>") -> list[str]:
    """`line: module` for each import of tests or tests.* in the source."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in DYNAMIC and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        found += [f"{node.lineno}: {name}" for name in names if _is_tests(name)][:1]
    return found


def kit_files() -> list[Path]:
    return sorted(p for top in KIT for p in (REPO / top).rglob("*.py") if "__pycache__" not in p.parts)


def test_the_kit_holds_what_it_should() -> None:
    names = {str(p.relative_to(REPO)) for p in kit_files()}
    assert {"devkit/__init__.py", "devkit/kubeapi/__main__.py", "devkit/rig.py", "demo/__main__.py",
            "bench/daemon_bench.py"} <= names


@pytest.mark.parametrize("path", kit_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_import_from_tests(path: Path) -> None:
    assert imports_of_tests(path.read_text(encoding="utf-8"), str(path)) == []


@pytest.mark.parametrize("source", [
    "import tests",
    "import tests.kit.server as s",
    "from tests import kit",
    "from tests.integration.helpers import serve",
    "def f():\n    from tests.kit import wait_for\n",
    "import importlib\nimportlib.import_module('tests.kit')",
    "import pytest\npytest.importorskip('tests.kit.server')",
    "__import__('tests')",
])
def test_the_scan_sees_every_form(source: str) -> None:
    assert len(imports_of_tests(source)) == 1


@pytest.mark.parametrize("source", [
    "from devkit.kubeapi.server import KubeAPI",
    "import testsuite",
    "from . import tests",
    "x = 'from tests import kit'",
    "import subprocess\nsubprocess.run(['python', '-m', 'tests.clientchild'])",
])
def test_the_scan_leaves_other_imports_alone(source: str) -> None:
    assert imports_of_tests(source) == []
