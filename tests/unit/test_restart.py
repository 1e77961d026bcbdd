"""A restart by systemd keeps the VM registered only when the next agent can start."""

from __future__ import annotations

from pathlib import Path


def test_a_restart_keeps_the_entry_only_when_the_file_on_disk_is_valid(tmp_path: Path) -> None:
    """At stop time the agent re-reads agent.yaml: the next agent would exit 78 on a bad one, and the
    entry would stay registered with nobody behind it."""
    from agent import config
    from agent.daemon import Agent

    path = tmp_path / "agent.yaml"
    path.write_text(f"root: {tmp_path}\nbundle:\n  source: /b\n")
    agent = Agent(config.load(str(path)), str(path))
    assert agent.next_config_valid() is True
    path.write_text(f"root: {tmp_path}\nbundle:\n  source: /b\nregistry:\n  lease:\n    duration: forty\n")
    assert agent.next_config_valid() is False
    assert agent.status.errors[-1]["message"].startswith("restart into a bad configuration: "
                                                         f"{path}:6: registry.lease.duration")
