"""status.json is written when its content changed, and only then."""

from __future__ import annotations

import json
from pathlib import Path

from agent.state import Status, StatusWriter


def test_status_json_is_rewritten_only_when_its_content_changed(tmp_path: Path) -> None:
    path = tmp_path / "run/status.json"
    writer = StatusWriter(path)
    status = Status(version="1")
    status.sidecar = {"state": "running", "pid": 7}
    assert writer.write(status) is True
    first = path.read_text()
    assert json.loads(first)["sidecar"] == {"state": "running", "pid": 7}
    path.unlink()
    status.sidecar = {"state": "running", "pid": 7}   # a new dict, the same content
    assert writer.write(status) is False and not path.exists()
    status.errors.append({"where": "registry", "message": "boom"})   # changed in place
    assert writer.write(status) is True
    assert json.loads(path.read_text())["errors"] == [{"where": "registry", "message": "boom"}]
    assert writer.write(status) is False
