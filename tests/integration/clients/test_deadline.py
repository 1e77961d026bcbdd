"""The overall deadline on every API call, through each client generation (tests/clientgen.py): an API
server that trickles its answer (the emulator's trickle fault: a byte a second, never tripping the read
timeout) is cut at the deadline, the call fails with the agent's own error (nothing logged on the side),
the cut request is not retried, and the next call on the same client works (no poisoned pooled
connection). A watch the server never ends is cut a deadline after its own timeout."""

from __future__ import annotations

import time

import pytest

from tests.clientgen import Agent, RemoteError
from tests.integration.clients.conftest import GROUP, NS, SA, Setup

ADDRESS = "10.0.0.7"  # only data in the entry: no traffic goes there
WHO = {"namespace": NS, "group": GROUP, "address": ADDRESS}
DEADLINE = 2.0
SLOW = 20.0  # well under what any trickled answer takes (a byte a second, hundreds of bytes)

pytestmark = pytest.mark.subprocess


def opened(setup: Setup) -> Agent:
    kc = setup.api.write_kubeconfig(setup.tmp / "agent.kubeconfig", setup.token(), user="agent")
    agent = setup.agent()
    agent.call("open", creds={"kubeconfig": str(kc)}, deadline=DEADLINE)
    return agent


def cut(agent: Agent, op: str, **kw: object) -> RemoteError:
    """Run op, which must be cut by the deadline: the error, after checking it came in time."""
    started = time.monotonic()
    with pytest.raises(RemoteError) as err:
        agent.call(op, **kw)
    assert time.monotonic() - started < SLOW
    assert err.value.type == "DeadlineExceeded", err.value
    return err.value


def logged(agent: Agent) -> list[str]:
    agent.stderr.seek(0)
    return [line for line in agent.stderr.read().splitlines() if line.strip()]


def test_a_trickled_read_is_cut_once_and_the_client_goes_on(setup: Setup) -> None:
    agent = opened(setup)
    assert agent.kube("get", "GROUPS", NS, GROUP)["metadata"]["name"] == GROUP  # a pooled connection now
    path = f"/workloadgroups/{GROUP}"
    before = len([r for r in setup.api.requests if r.path.endswith(path)])
    setup.api.faults.trickle(1.0, path=path)
    err = cut(agent, "kube", method="get", args=["GROUPS", NS, GROUP])
    assert f"within the {DEADLINE:g}s deadline" in str(err)
    # The GET was sent once: the client's quiet retry is not spent on a request its deadline cut.
    assert len([r for r in setup.api.requests if r.path.endswith(path)]) == before + 1
    setup.api.faults.clear()
    assert agent.kube("get", "GROUPS", NS, GROUP)["metadata"]["name"] == GROUP
    # Nothing said on the side: no urllib3 retry warning, no traceback (the caller logs the error).
    lines = logged(agent)
    assert not [line for line in lines if "Traceback" in line or "Retrying" in line], lines


def test_a_trickled_apply_is_cut_and_the_next_one_lands(setup: Setup) -> None:
    agent = opened(setup)
    # The server-side applies (a second ApiClient on the older generations) answer a byte a second.
    setup.api.faults.trickle(1.0, method="PATCH", path="leases|workloadentries")
    err = cut(agent, "converge", want="REGISTER", instance="vm-1", **WHO)
    assert "patch" in str(err) and "deadline" in str(err)
    setup.api.faults.clear()
    out = agent.call("converge", want="REGISTER", instance="vm-1", **WHO)
    assert out["present"]
    assert setup.api.get("WorkloadEntry", NS, f"{GROUP}-{ADDRESS}") is not None


def test_a_trickled_token_request_is_cut(setup: Setup) -> None:
    agent = opened(setup)
    setup.api.faults.trickle(1.0, method="POST", path="/token$")
    err = cut(agent, "core", method="create_token", args=[NS, SA, 600, ["istio-ca"]])
    assert "serviceaccounts/token" in str(err)
    setup.api.faults.clear()
    assert agent.call("core", method="create_token", args=[NS, SA, 600, ["istio-ca"]])["status"]["token"]


def test_a_watch_the_server_never_ends_is_cut(setup: Setup) -> None:
    agent = opened(setup)
    _, rv = agent.kube("get_for_watch", "GROUPS", NS, GROUP)
    # The watch trickles newlines forever and ignores its timeoutSeconds; the list is left alone.
    setup.api.faults.trickle(0.5, path="workloadgroups", query="watch=")
    err = cut(agent, "kube", method="watch", args=["GROUPS", NS, GROUP, rv, 1])
    assert "watch" in str(err) and "not ended" in str(err)
    setup.api.faults.clear()
    assert agent.kube("watch", "GROUPS", NS, GROUP, rv, 1) == []  # ends at its timeout, as asked
