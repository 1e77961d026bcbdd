"""`mesh-agent reload`: which record of the daemon answers a signal, and where the daemon is found."""

from __future__ import annotations

from pathlib import Path

from agent.reload import answer_for, record
from agent.status import status_path


def test_only_a_reload_that_began_after_the_signal_answers_it() -> None:
    sent = 100.0
    earlier = {"pid": 7, "reload": record(1, 99.5, None)}  # read the file before our signal
    assert answer_for(earlier, 7, sent) is None
    ours = {"pid": 7, "reload": record(2, 100.2, "agent.yaml:3: x: unknown key")}
    assert answer_for(ours, 7, sent) == ours["reload"]
    assert ours["reload"]["ok"] is False and ours["reload"]["generation"] == 2


def test_a_record_of_another_process_or_none_is_no_answer() -> None:
    rec = record(1, 200.0, None)
    assert answer_for({"pid": 8, "reload": rec}, 7, 100.0) is None  # restarted meanwhile: not ours
    assert answer_for({"pid": 7}, 7, 100.0) is None
    assert answer_for(None, 7, 100.0) is None
    assert answer_for({"pid": 7, "reload": {"started": "soon"}}, 7, 100.0) is None


def test_status_path_of_a_file_with_errors_still_follows_its_root_and_run_dir(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"root: {tmp_path}/vm\nrun_dir: /run/x\nbundle:\n  source: /b\nno_such_key: 1\n")
    assert status_path(str(cfg)) == tmp_path / "vm/run/x/status.json"
    cfg.write_text("root: [not, a, path]\n")
    assert status_path(str(cfg)) == Path("/run/mesh-agent/status.json")
    cfg.write_text(": : broken yaml [\n")
    assert status_path(str(cfg)) == Path("/run/mesh-agent/status.json")

