"""Writes docs/configuration.md from the schema, so the reference cannot drift from the code.

    python -m agent.config_doc > docs/configuration.md
"""

from __future__ import annotations

from agent.config import Config
from agent.schema import MAX_BYTES, MAX_DEPTH, MAX_ERRORS, MAX_NODES, describe

HEADER = f"""\
# Configuration reference: /etc/mesh-agent/agent.yaml

Generated from `agent/config.py` by `python -m agent.config_doc`; do not edit by hand.

The file is one YAML document in UTF-8. Only `bundle.source` is required. Durations are written `500ms`,
`10s`, `5m`, `1h` or `1m30s`; sizes `1048576`, `512KiB`, `1MiB`. Unknown keys are errors (a misspelt key
would otherwise be silently ignored). The file is found at `--config FILE`, else `$MESH_AGENT_CONFIG`, else
`/etc/mesh-agent/agent.yaml`.

Check a file without starting anything: `mesh-agent config check FILE`. Every problem (up to {MAX_ERRORS}) is
reported, one line each, as `FILE:LINE: KEY: MESSAGE`, and the exit status is 78 (EX_CONFIG); `mesh-agent
run` does the same at start and on reload (a bad file on reload keeps the running configuration). The
systemd unit does not restart the agent on status 78. An empty file, or one holding only comments, is
reported the same way (`bundle: required key is missing`). So that no file can make the agent hang or
crash, a file larger than {MAX_BYTES // 1024 // 1024} MiB, nested deeper than {MAX_DEPTH} levels or holding more than
{MAX_NODES} keys and values is refused, and so are anchors and aliases (`&name`, `*name`), tabs in
indentation, NUL bytes and invalid UTF-8.

`configured: false` (as in the example the package ships) keeps the service from starting: the unit's
`ExecCondition` runs `mesh-agent config is-configured`. Set it to `true` once the file is filled in.
`mesh-agent config check` says so for a valid file that still has it: `ok, but configured: false: the
service will not start until it is true` (exit status 0).

A probe override (`app.probe`) uses the names of Istio's WorkloadGroup probe in snake_case
(`httpGet` -> `http_get`, `periodSeconds` -> `period`, ...).

| key | type | default | meaning |
|---|---|---|---|
"""


def render() -> str:
    rows = []
    for k in describe(Config):
        default = f"`{k.default}`" if k.default not in ("", "required") else k.default
        rows.append(f"| `{k.path}` | {k.type} | {default} | {k.help} |")
    return HEADER + "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(render(), end="")
