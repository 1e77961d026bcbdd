"""CLI exit codes and help."""

from __future__ import annotations

import pytest

from agent import __version__
from agent.cli import VERBS, main


def test_no_verb_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    out = capsys.readouterr().out
    for verb in VERBS:
        assert verb.name in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == f"mesh-agent {__version__}"


def test_unknown_verb_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2


@pytest.mark.parametrize("verb", [v.name for v in VERBS if v.name != "version"])
def test_every_verb_has_real_help(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([verb, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    description = next(v.description for v in VERBS if v.name == verb)
    assert description.split()[0] in out


def test_missing_config_file_exits_78(capsys: pytest.CaptureFixture[str], tmp_path: object) -> None:
    assert main(["config", "check", "/nonexistent/agent.yaml"]) == 78
    assert "/nonexistent/agent.yaml: cannot read: No such file or directory" in capsys.readouterr().err
