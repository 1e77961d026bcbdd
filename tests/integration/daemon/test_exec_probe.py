"""`mesh-agent run` with an exec probe in the WorkloadGroup (agent.yaml without app.probe): the command is
never run, the refusal is logged and the app is checked on its ports instead."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from devkit.rig import GROUP, NS, group_object, rig
from devkit.waiting import wait_for

pytestmark = [pytest.mark.timeout(180), pytest.mark.subprocess]


def test_an_exec_probe_from_the_workloadgroup_is_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "probe-ran"
    with rig(tmp_path, app={"probe": None}) as r:
        r.api.create_namespace(NS)
        group = group_object(port=r.app_port)
        group["spec"]["probe"] = {"exec": {"command": ["/bin/sh", "-c", f"id > {marker}"]}, "periodSeconds": 1}
        r.api.create(group)
        r.prepare()
        assert r.api.get("WorkloadGroup", NS, GROUP)["spec"]["probe"]["exec"]
        # The bundle's own mesh.yaml probe is left out, so the app is checked on its ports.
        mesh = yaml.safe_load((r.bundle_dir / "mesh.yaml").read_text())
        del mesh["defaultConfig"]["readinessProbe"]
        (r.bundle_dir / "mesh.yaml").write_text(yaml.safe_dump(mesh))
        r.start_app()
        r.start_agent()
        wait_for(r.entry, 60, "registration (the app healthy on its port)")
        status = json.loads(r.status_file.read_text())
        assert "exec" not in json.dumps(status["app"]), status["app"]
        assert "WorkloadGroup spec.probe.exec: an exec probe from the mesh is refused" in r.log_text()
        assert r.stop_agent() == 0
        assert not marker.exists()
