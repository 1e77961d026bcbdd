"""The one wording of how a process ended, shared by the app's health and the sidecar."""

from __future__ import annotations

from agent.proc import describe_exit


def test_describe_exit() -> None:
    assert describe_exit(1, "", None) == "process 1 exited"
    assert describe_exit(1, "x", 3) == "process 1 (x) exited with status 3"
    assert describe_exit(1, "x", 0) == "process 1 (x) exited with status 0"
    assert describe_exit(1, "x", -15) == "process 1 (x) exited: killed by SIGTERM"
    assert describe_exit(7, "envoy", -9) == "process 7 (envoy) exited: killed by SIGKILL"
    assert describe_exit(1, "x", -200) == "process 1 (x) exited: killed by signal 200"
