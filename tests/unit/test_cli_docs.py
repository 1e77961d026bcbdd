"""The man page, the README and `--help` agree with the command line and with what the verbs do.

The verbs, their actions and options come from the real argparse parser and the exit codes from the
verbs' code, so a new verb, action, option or exit code without documentation fails here.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import re
import time
from pathlib import Path

import pytest

from agent import cli
from agent.paths import Layout
from devkit import bundles as kit

REPO = Path(__file__).resolve().parents[2]
MAN = (REPO / "packaging" / "mesh-agent.8").read_text(encoding="utf-8")
README = (REPO / "README.md").read_text(encoding="utf-8")


# --- what the code has --------------------------------------------------------------------------

def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _verb_parser(name: str) -> argparse.ArgumentParser:
    """The verb's parser with its module's arguments (build_parser loads only the chosen verb's)."""
    return _subcommands(cli.build_parser(name)[0])[name]


def _commands() -> dict[str, argparse.ArgumentParser]:
    """'verb' and 'verb action' -> the parser that takes its options."""
    out = {}
    for name in _subcommands(cli.build_parser()[0]):
        parser = _verb_parser(name)
        actions = _subcommands(parser)
        out[name] = parser
        out.update({f"{name} {action}": p for action, p in actions.items()})
    return out


def _options(parser: argparse.ArgumentParser) -> list[list[str]]:
    return [a.option_strings for a in parser._actions
            if a.option_strings and a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]


def _exit_codes() -> set[int]:
    """Every exit code the verbs' code returns: int constants and EX_* names in what the `-> int`
    functions of the verb modules return, plus the exit_code default of exceptions that carry one."""
    codes: set[int] = set()
    modules = {"agent.cli"} | {v.module for v in cli.VERBS}
    for name in sorted(modules):
        module = importlib.import_module(name)
        tree = ast.parse(Path(module.__file__ or "").read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef):
                continue
            for arg, default in zip(reversed(fn.args.args), reversed(fn.args.defaults), strict=False):
                if arg.arg == "exit_code" and isinstance(default, ast.Constant):
                    codes.add(default.value)
            if not (isinstance(fn.returns, ast.Name) and fn.returns.id == "int"):
                continue
            for ret in ast.walk(fn):
                if not isinstance(ret, ast.Return) or ret.value is None:
                    continue
                for node in ast.walk(ret.value):
                    if isinstance(node, ast.Constant) and type(node.value) is int:
                        codes.add(node.value)
                    elif isinstance(node, (ast.Name, ast.Attribute)) and ast.unparse(node).split(".")[-1] \
                            .startswith("EX_"):
                        codes.add(int(_resolve(node, module)))
    return codes


def _resolve(node: ast.expr, module: object) -> object:
    """A name like EX_USAGE or config.EX_CONFIG, looked up in the module that uses it."""
    if isinstance(node, ast.Name):
        return getattr(module, node.id)
    assert isinstance(node, ast.Attribute), ast.unparse(node)
    return getattr(_resolve(node.value, module), node.attr)


# --- what the documents say ----------------------------------------------------------------------

def _plain(troff: str) -> str:
    """Troff text with font changes and escapes removed, macro names and quotes dropped."""
    lines = []
    for line in troff.splitlines():
        if line.startswith("."):
            line = line.split(" ", 1)[1] if " " in line else ""
            line = line.replace('"', "")
        lines.append(re.sub(r"\\f[BIRP]", "", line).replace("\\-", "-").replace("\\&", ""))
    return "\n".join(lines)


def _man_section(title: str) -> str:
    m = re.search(rf"^\.SH {title}\n(.*?)(?=^\.SH )", MAN, re.S | re.M)
    assert m, f"man page has no {title} section"
    return m.group(1)


def _man_entries(section: str) -> dict[str, str]:
    """The section's .TP paragraphs as plain text, by their tag line."""
    out = {}
    for para in ("\n" + section).split("\n.TP\n")[1:]:
        tag = para.partition("\n")[0]
        out[_plain(tag).strip()] = _plain(para)
    return out


def _man_terms(section: str) -> list[str]:
    return list(_man_entries(section))


def _man_entry(command: str) -> str:
    entries = _man_entries(_man_section("VERBS"))
    found = [text for term, text in entries.items() if term == command or term.startswith(command + " ")]
    assert found, f"mesh-agent.8 has no VERBS entry for `{command}`"
    return found[0]


def _readme_command_rows() -> list[str]:
    table = README.split("\n## Commands\n", 1)[1].strip().split("\n\n", 1)[0]
    return [row.split("|")[1] for row in table.replace("\\|", "/").splitlines()
            if row.startswith("| `mesh-agent")]


# --- the checks ----------------------------------------------------------------------------------

COMMANDS = _commands()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_verb_and_action_has_its_entry_in_the_man_page_with_every_option(command: str) -> None:
    entry = _man_entry(command)
    for strings in _options(COMMANDS[command]):
        found = any(re.search(rf"(?<![\w-]){re.escape(s)}(?![\w-])", entry) for s in strings)
        assert found, f"mesh-agent.8's entry for `{command}` does not mention {'/'.join(strings)}"


def test_man_page_lists_no_verb_that_does_not_exist() -> None:
    verbs = {c.split()[0] for c in COMMANDS}
    for term in _man_terms(_man_section("VERBS")):
        assert term.split()[0] in verbs, term
        words = term.split()
        if len(words) > 1 and _subcommands(COMMANDS[words[0]]):
            assert " ".join(words[:2]) in COMMANDS, term


def test_the_exit_codes_the_code_uses_are_the_ones_the_man_page_lists() -> None:
    used = _exit_codes()
    assert {0, 1, 2, 3, 78} <= used  # the scan itself works
    documented = {int(t) for t in _man_terms(_man_section("EXIT STATUS")) if t.isdigit()}
    assert used == documented


def test_readme_command_table_lists_every_verb_and_action() -> None:
    rows = _readme_command_rows()
    listed = {m for row in rows for m in re.findall(r"mesh-agent ([a-z][\w-]*)", row)}
    verbs = {c for c in COMMANDS if " " not in c}
    assert listed == verbs
    for command in COMMANDS:
        if " " in command:
            verb, action = command.split()
            row = next(r for r in rows if f"mesh-agent {verb}" in r)
            assert re.search(rf"(?<![\w-]){action}(?![\w-])", row), f"README's row for {verb} lacks {action}"


def test_every_config_option_that_has_a_default_names_the_environment_variable() -> None:
    for command, parser in COMMANDS.items():
        for action in parser._actions:
            if "--config" in action.option_strings and "default" in (action.help or ""):
                assert "$MESH_AGENT_CONFIG" in str(action.help), command


# --- help that promises behaviour, and the behaviour -----------------------------------------------

def test_bundle_verify_takes_its_source_from_the_config(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    bundle = kit.write_dir(tmp_path / "bundle", kit.files(time.time()))
    conf = tmp_path / "agent.yaml"
    conf.write_text(f"bundle:\n  source: {bundle}\n")
    assert "default: bundle.source of the --config file" in _help(["bundle", "verify"], capsys)
    assert cli.main(["bundle", "verify", "--config", str(conf)]) == 0
    assert capsys.readouterr().out.startswith(f"{bundle}: ok, bundle ")
    assert cli.main(["bundle", "verify"]) == 2
    assert "give a SOURCE, or --config with bundle.source" in capsys.readouterr().err


def test_deregister_finds_the_config_through_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert "$MESH_AGENT_CONFIG" in _help(["deregister"], capsys)
    conf = tmp_path / "agent.yaml"
    conf.write_text(f"bundle:\n  source: /srv/bundle\nroot: {tmp_path}\nstate_dir: /state\n")
    monkeypatch.setenv("MESH_AGENT_CONFIG", str(conf))
    assert cli.main(["deregister", "--reason", "kernel update"]) == 0
    control = Layout(tmp_path, "/state").control_file
    assert json.loads(control.read_text())["reason"] == "kernel update"
    assert cli.main(["register"]) == 0
    assert not control.exists()


def test_status_exits_3_when_nothing_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "Exit 3 when the agent is not running" in _help(["status"], capsys)
    assert cli.main(["status", "--status-file", str(tmp_path / "status.json")]) == 3
    assert "mesh-agent is not running" in capsys.readouterr().err


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--help"])
    assert info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines
