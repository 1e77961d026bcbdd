"""Pure parts of the Kubernetes API emulator: selectors, patches, metadata rules, JWTs."""

from __future__ import annotations

import pytest

from devkit.kubeapi import meta
from devkit.kubeapi.auth import API_AUDIENCE, Authenticator, Identity, rules
from devkit.kubeapi.patch import PatchError, json_patch, merge_patch, strategic_merge_patch
from devkit.kubeapi.selectors import SelectorError, field_selector, label_selector


def obj(**labels: str) -> dict:
    return {"metadata": {"name": "n", "namespace": "ns", "labels": labels}}


@pytest.mark.parametrize("selector,matches", [
    ("app=a", True), ("app==a", True), ("app!=a", False), ("app in (a, b)", True), ("app notin (a)", False),
    ("app", True), ("!app", False), ("!other", True), ("app=a,tier=web", False), ("", True),
])
def test_label_selectors(selector: str, matches: bool) -> None:
    assert label_selector(selector)(obj(app="a")) is matches


def test_bad_selectors_are_errors() -> None:
    with pytest.raises(SelectorError):
        label_selector("app in a")
    with pytest.raises(SelectorError):
        field_selector("spec.address=1")
    assert field_selector("metadata.name=n,metadata.namespace!=x")(obj())


def test_merge_patch() -> None:
    assert merge_patch({"a": {"b": 1, "c": 2}, "l": [1]}, {"a": {"b": None, "d": 3}, "l": [2]}) == {
        "a": {"c": 2, "d": 3}, "l": [2]}


def test_json_patch_operations_and_failures() -> None:
    doc = {"a": [1, 2], "b": {"c": 1}}
    out = json_patch(doc, [{"op": "add", "path": "/a/-", "value": 3}, {"op": "remove", "path": "/b/c"},
                           {"op": "move", "from": "/a", "path": "/m"},
                           {"op": "copy", "from": "/m/0", "path": "/x"}])
    assert out == {"b": {}, "m": [1, 2, 3], "x": 1} and doc == {"a": [1, 2], "b": {"c": 1}}
    for bad in ([{"op": "remove", "path": "/nope"}], [{"op": "test", "path": "/b/c", "value": 2}],
                [{"op": "replace", "path": "/a/5", "value": 1}], {"op": "add"}):
        with pytest.raises(PatchError):
            json_patch(doc, bad)


def test_strategic_merge_patch_directives() -> None:
    live = {"metadata": {"finalizers": ["a"]},
            "spec": {"ports": [{"port": 80, "name": "x"}], "sel": {"k": "v"}}}
    patch = {"metadata": {"finalizers": ["b"]},
             "spec": {"$setElementOrder/ports": [{"port": 80}], "ports": [{"port": 80, "name": "y"}],
                      "sel": {"$patch": "replace", "n": "m"}}}
    out = strategic_merge_patch(live, patch)
    assert out == {"metadata": {"finalizers": ["a", "b"]},
                   "spec": {"ports": [{"port": 80, "name": "y"}], "sel": {"n": "m"}}}


@pytest.mark.parametrize("name,rule,ok", [
    ("billing-10-0-0-1", "subdomain", True), ("billing-fd00--1", "subdomain", True),
    ("a.b", "subdomain", True),
    ("Billing", "subdomain", False), ("-a", "subdomain", False), ("a" * 254, "subdomain", False),
    ("a.b", "label", False), ("1svc", "dns1035", False), ("svc-1", "dns1035", True),
])
def test_names(name: str, rule: str, ok: bool) -> None:
    assert (meta.name_errors(name, rule) == []) is ok


def test_labels_and_annotations() -> None:
    assert meta.label_errors({"app.kubernetes.io/name": "x", "v": ""}) == []
    assert len(meta.label_errors({"bad key!": "x", "k": "-x", "l": "x" * 64})) == 3
    assert meta.annotation_errors({"istio.io/autoRegistrationGroup": "g"}) == []
    assert meta.owner_reference_errors([{"apiVersion": "v1", "kind": "K", "name": "n", "uid": "u",
                                         "controller": True}] * 2)


def test_minted_tokens_verify_and_expire() -> None:
    auth = Authenticator()
    token, exp = auth.mint("ns", "sa", "uid-1", [API_AUDIENCE], 600, now=1_000)
    assert exp == 1_600 and auth.verify_jwt(token)["sub"] == "system:serviceaccount:ns:sa"
    assert auth.authenticate(token, lambda ns, name: "uid-1") is None  # expired long ago
    fresh, _ = auth.mint("ns", "sa", "uid-1", [API_AUDIENCE], 600)
    assert auth.authenticate(fresh, lambda ns, name: "uid-1") == Identity(
        "system:serviceaccount:ns:sa", ("system:serviceaccounts", "system:serviceaccounts:ns"), "uid-1")
    assert auth.authenticate(fresh[:-4] + "AAAA", lambda ns, name: "uid-1") is None


def test_rules_scope() -> None:
    rule = rules("get,list", "workloadentries", "vm")
    assert rule.allows("get", "networking.istio.io", "workloadentries", "vm", "x")
    assert not rule.allows("get", "networking.istio.io", "workloadentries", "", "x")
    assert not rule.allows("delete", "networking.istio.io", "workloadentries", "vm", "x")
    assert not rule.allows("get", "networking.istio.io", "workloadentries/status", "vm", "x")


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("True", True), ("1", True), ("t", True),
                                                 ("false", False), ("False", False), (None, False), ("", False)])
def test_boolean_query_parameters_parse_like_the_api_server(value: str | None, expected: bool) -> None:
    """Python clients before 24 send force=True and watch=True; a real server takes both."""
    from devkit.kubeapi.server import _flag

    assert _flag(value) is expected


def _attrs(operation: str = "UPDATE", subresource: str = "", version: str = "v1beta1") -> object:
    from devkit.kubeapi.admission import Attributes

    return Attributes(operation, "networking.istio.io", version, "workloadentries", "WorkloadEntry", subresource,
                      "ns", "e", Identity("u"), {"metadata": {"labels": {"app": "a"}}}, None)


@pytest.mark.parametrize(("rule", "subresource", "exact", "matches"), [
    ({"resources": ["workloadentries"]}, "", False, True),
    ({"resources": ["workloadentries"]}, "status", False, False),
    ({"resources": ["workloadentries/status"]}, "status", False, True),
    ({"resources": ["*"]}, "status", False, False),
    ({"resources": ["*/*"]}, "status", False, True),
    ({"resources": ["*/status"]}, "status", False, True),
    ({"resources": ["workloadentries"], "apiVersions": ["v1"]}, "", True, False),  # Exact: v1 is not v1beta1
    ({"resources": ["workloadentries"], "operations": ["CREATE"]}, "", False, False),
    ({"resources": ["workloadentries"], "resourceNames": ["other"]}, "", False, False),
    ({"resources": ["workloadentries"], "scope": "Cluster"}, "", False, False),
])
def test_admission_resource_rules(rule: dict, subresource: str, exact: bool, matches: bool) -> None:
    from devkit.kubeapi.admission import resources_match

    full = {"apiGroups": ["networking.istio.io"], "apiVersions": ["v1"], "operations": ["UPDATE"], **rule}
    match = {"resourceRules": [full], "matchPolicy": "Exact" if exact else "Equivalent"}
    got = resources_match(match, _attrs(subresource=subresource), ("v1", "v1beta1"), {}, rules_required=True)
    assert got is matches


def test_admission_selectors() -> None:
    from devkit.kubeapi.admission import resources_match, selector_matches

    assert selector_matches(None, {})
    assert selector_matches({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1"]}]}, {"a": "1"})
    assert not selector_matches({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"a": "1"})
    assert not selector_matches({"matchLabels": {"a": "1"}, "matchExpressions": [
        {"key": "b", "operator": "Exists"}]}, {"a": "1"})
    rule = {"resourceRules": [{"apiGroups": ["*"], "apiVersions": ["*"], "operations": ["*"], "resources": ["*"]}]}
    assert resources_match({**rule, "objectSelector": {"matchLabels": {"app": "a"}}}, _attrs(), (), None,
                           rules_required=True)
    assert not resources_match({**rule, "namespaceSelector": {"matchLabels": {"team": "x"}}}, _attrs(), (),
                               {"team": "y"}, rules_required=True)
    assert not resources_match({**rule, "excludeResourceRules": rule["resourceRules"]}, _attrs(), (), None,
                               rules_required=True)
