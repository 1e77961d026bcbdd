"""agent.apps: what each app's parts are configured with (pure), and the one-line summary of several."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from agent import apps, config
from agent.state import Phase, summarize


def load(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "agent.yaml"
    path.write_text("bundle: {source: /b}\n" + textwrap.dedent(text))
    return config.load(str(path))


def test_one_app_is_the_app_section_with_the_registrys_group(tmp_path: Path) -> None:
    cfg = load(tmp_path, "app: {ports: [8080]}\nregistry: {group: billing, labels: {a: b}}\n")
    (one,) = apps.apps(cfg)
    assert one.name == apps.SINGLE and one.group == "billing" and not one.several
    assert one.health is cfg.app
    assert apps.registry_config(cfg, one) is cfg.registry  # unchanged: the single-app path as before
    assert apps.owns_bundle_group(one, "anything")


def test_several_apps_each_with_its_group_and_labels_over_the_vms(tmp_path: Path) -> None:
    cfg = load(tmp_path, """
        registry: {labels: {env: prod, tier: x}}
        apps:
          - {name: billing, ports: [8080]}
          - {name: ledger, group: books, ports: [9090], labels: {tier: books}}
        """)
    billing, ledger = apps.apps(cfg)
    assert (billing.name, billing.group, ledger.name, ledger.group) == ("billing", "billing", "ledger", "books")
    reg = apps.registry_config(cfg, ledger)
    assert reg.group == "books" and reg.labels == {"env": "prod", "tier": "books"}
    assert reg.lease == cfg.registry.lease  # the rest is the VM's
    assert apps.find(cfg, "ledger") == ledger and apps.find(cfg, "nosuch") is None
    assert apps.owns_bundle_group(billing, "billing") and not apps.owns_bundle_group(ledger, "billing")
    assert not apps.owns_bundle_group(ledger, None)


@pytest.mark.parametrize(("text", "error"), [
    ("app: {ports: [1]}\napps: [{name: a}]\n", "agent.yaml:2: app: use either app: (one app) or apps:"),
    ("registry: {group: g}\napps: [{name: a}]\n", "agent.yaml:2: registry.group: with apps:, each app names"),
    ("apps:\n  - {name: a}\n  - {name: a, group: b}\n", "agent.yaml:4: apps[1].name: 'a' is also apps[0]'s name"),
    ("apps:\n  - {name: a, group: g}\n  - {name: b, group: g}\n",
     "agent.yaml:4: apps[1].group: WorkloadGroup 'g' is also apps[0]'s"),
    ("apps:\n  - {name: a, ports: [80, 81]}\n  - {name: b, ports: [81]}\n",
     "agent.yaml:4: apps[1].ports: port 81 is also a's"),
    ("apps:\n  - {name: Billing}\n", "agent.yaml:3: apps[0].name: 'Billing' is not a DNS label"),
    ("apps:\n  - {ports: [80]}\n", "agent.yaml:3: apps[0].name: required key is missing"),
])
def test_apps_that_istio_would_mishandle_are_refused(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(config.ConfigError) as exc:
        load(tmp_path, text)
    assert error in str(exc.value), str(exc.value)


def one(healthy: bool | None, registered: bool, maintenance: bool = False, reason: str = "") -> dict:
    return {"app": {"healthy": healthy, "reason": reason},
            "registration": {"registered": registered, "entry": "e"}, "maintenance": maintenance}


def test_the_summary_names_each_app_when_there_are_several() -> None:
    ready = {"ready": True, "state": "running"}
    assert summarize(Phase.RUNNING, ready, {"app": one(True, True)}) == "registered e"  # as before
    line = summarize(Phase.RUNNING, ready, {"billing": one(True, True), "ledger": one(False, False, reason="x")})
    assert line == "billing: registered e; ledger: withdrawn: app unhealthy (x)"
    assert summarize(Phase.RUNNING, ready, {"a": one(True, False, True), "b": one(True, False, True)}) \
        .startswith("maintenance: entries withdrawn")
    assert summarize(Phase.STOPPING, ready, {"a": one(True, True)}) == "stopping"


def test_without_an_address_the_summary_and_status_say_why_nothing_is_registered() -> None:
    from agent.status import _app_lines

    waiting = {"state": "waiting", "registered": False, "message": "no address for this VM yet: no default route"}
    apps = {"app": {"app": {"healthy": True}, "registration": waiting, "maintenance": False}}
    assert summarize(Phase.RUNNING, {"ready": False, "state": "stopped"}, apps) == waiting["message"]
    assert "  entry:        none: no address for this VM yet: no default route" in _app_lines({}, waiting, 0.0)
