"""ValidatingAdmissionPolicies (admissionregistration.k8s.io/v1), evaluated with CEL as the API server
does on create, update (PUT, patches, server-side apply, subresources) and delete.

For each ValidatingAdmissionPolicyBinding whose policy exists: the policy's matchConstraints and the
binding's matchResources must match the request (resourceRules with operations, apiGroups,
apiVersions, resources incl. subresources and resourceNames; excludeResourceRules; namespaceSelector;
objectSelector); then every matchCondition must be true; then the variables are computed in order
and every validation evaluated. A false validation (or an evaluation error under failurePolicy Fail)
is a denial: with validationAction Deny the request fails with the server's Status, Warn adds a
Warning header, Audit is recorded. Not done: paramKind/paramRef, auditAnnotations' values,
type checking, cost limits, the `authorizer` variable.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from devkit.kubeapi import cel
from devkit.kubeapi.auth import Identity
from devkit.kubeapi.status import ApiError, FieldError, invalid, required

log = logging.getLogger(__name__)

GROUP = "admissionregistration.k8s.io"
POLICIES = (GROUP, "validatingadmissionpolicies")
BINDINGS = (GROUP, "validatingadmissionpolicybindings")
REASONS = {"Unauthorized": 401, "Forbidden": 403, "Invalid": 422, "RequestEntityTooLarge": 413}


@functools.lru_cache(maxsize=512)
def _compiled(text: str) -> cel.Expression:
    return cel.Expression(text)


@dataclass(frozen=True)
class Attributes:
    """What one write is: the admission request of the real server, minus what is not needed here."""

    operation: str            # CREATE | UPDATE | DELETE
    group: str
    version: str
    plural: str
    kind: str
    subresource: str
    namespace: str
    name: str
    identity: Identity
    object: dict[str, Any] | None
    old_object: dict[str, Any] | None
    dry_run: bool = False

    def request(self) -> dict[str, Any]:
        resource = {"group": self.group, "version": self.version, "resource": self.plural}
        kind = {"group": self.group, "version": self.version, "kind": self.kind}
        return {"operation": self.operation, "kind": kind, "resource": resource,
                "subResource": self.subresource, "requestKind": kind, "requestResource": resource,
                "requestSubResource": self.subresource, "name": self.name, "namespace": self.namespace,
                "userInfo": {"username": self.identity.user, "uid": self.identity.uid,
                             "groups": list(self.identity.all_groups)},
                "dryRun": self.dry_run}


# --- matching --------------------------------------------------------------------------------------

def selector_matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A metav1.LabelSelector; an empty (or absent) one matches everything."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def _rule_matches(rule: dict[str, Any], a: Attributes, versions: tuple[str, ...], exact: bool) -> bool:
    def has(field: str, value: str) -> bool:
        items = rule.get(field) or []
        return "*" in items or value in items

    if not (has("operations", a.operation) and has("apiGroups", a.group)):
        return False
    rule_versions = rule.get("apiVersions") or []
    if "*" not in rule_versions and a.version not in rule_versions and (
            exact or not any(v in versions for v in rule_versions)):
        return False
    resources = rule.get("resources") or []
    wanted = {a.plural if not a.subresource else f"{a.plural}/{a.subresource}", "*/*",
              f"{a.plural}/*" if a.subresource else "", f"*/{a.subresource}" if a.subresource else ""}
    if not a.subresource:
        wanted.add("*")
    if not wanted & set(resources):
        return False
    scope = rule.get("scope") or "*"
    if (scope == "Namespaced" and not a.namespace) or (scope == "Cluster" and a.namespace):
        return False
    names = rule.get("resourceNames") or []
    return not names or a.name in names


def resources_match(match: dict[str, Any] | None, a: Attributes, versions: tuple[str, ...],
                    namespace_labels: dict[str, str] | None, *, rules_required: bool) -> bool:
    """A policy's matchConstraints (rules_required) or a binding's matchResources."""
    match = match or {}
    exact = match.get("matchPolicy") == "Exact"
    rules = match.get("resourceRules") or []
    if (rules or rules_required) and not any(_rule_matches(r, a, versions, exact) for r in rules):
        return False
    if any(_rule_matches(r, a, versions, exact) for r in match.get("excludeResourceRules") or []):
        return False
    if namespace_labels is not None and not selector_matches(match.get("namespaceSelector"), namespace_labels):
        return False
    if match.get("objectSelector"):
        objs = [o for o in (a.object, a.old_object) if o]
        if not any(selector_matches(match["objectSelector"], (o.get("metadata") or {}).get("labels") or {})
                   for o in objs):
            return False
    return True


# --- evaluation ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    policy: str
    binding: str
    actions: tuple[str, ...]
    message: str
    reason: str


def evaluate(policy: dict[str, Any], binding: dict[str, Any], a: Attributes,
              namespace_object: dict[str, Any] | None) -> Decision | None:
    """The first denial of this policy for this request, or None if it admits it."""
    spec = policy.get("spec") or {}
    fail = (spec.get("failurePolicy") or "Fail") == "Fail"
    pname, bname = policy["metadata"]["name"], binding["metadata"]["name"]
    actions = tuple((binding.get("spec") or {}).get("validationActions") or ())
    env: dict[str, Any] = {"object": a.object, "oldObject": a.old_object, "request": a.request(),
                           "namespaceObject": namespace_object, "params": None}

    def deny(message: str, reason: str = "") -> Decision:
        return Decision(pname, bname, actions, message, reason or "Invalid")

    def error_of(text: str, exc: Exception) -> str:
        return f"expression '{text}' resulted in error: {exc}"

    # Any false condition means the policy does not apply, errors elsewhere notwithstanding; errors
    # without a false condition follow failurePolicy (all of them in one message, as an aggregate).
    errors: list[str] = []
    for cond in spec.get("matchConditions") or []:
        try:
            result = _compiled(cond.get("expression", ""))(**env, variables={})
        except (cel.CelCompileError, cel.CelEvalError) as exc:
            errors.append(error_of(cond.get("expression", ""), exc))
            continue
        if result is not True:
            return None
    if errors:
        return deny(errors[0] if len(errors) == 1 else f"[{', '.join(errors)}]") if fail else None
    variables: dict[str, Any] = {}
    broken: dict[str, Exception] = {}
    from celpy import celtypes

    for var in spec.get("variables") or []:
        try:
            variables[var["name"]] = _compiled(var.get("expression", "")).evaluate_cel(
                **env, variables=celtypes.MapType({celtypes.StringType(k): v for k, v in variables.items()}))
        except (cel.CelCompileError, cel.CelEvalError) as exc:
            broken[var["name"]] = exc
    cel_vars = celtypes.MapType({celtypes.StringType(k): v for k, v in variables.items()})
    for v in spec.get("validations") or []:
        text = v.get("expression", "")
        try:
            result = _compiled(text)(**env, variables=cel_vars)
            if not isinstance(result, bool):
                raise cel.CelEvalError(f"expected a boolean, got {result!r}")
        except (cel.CelCompileError, cel.CelEvalError) as exc:
            cause: Exception = exc
            for name, var_exc in broken.items():
                if f"variables.{name}" in text:
                    cause = var_exc
            if fail:
                return deny(error_of(text, cause))
            continue
        if result:
            continue
        message = v.get("message") or f"failed expression: {text.strip()}"
        if v.get("messageExpression"):
            try:
                custom = _compiled(v["messageExpression"])(**env, variables=cel_vars)
                if isinstance(custom, str) and custom.strip() and "\n" not in custom:
                    message = custom
            except (cel.CelCompileError, cel.CelEvalError) as exc:
                log.info("messageExpression of %s failed: %s", pname, exc)
        return deny(message, v.get("reason") or "")
    return None


def admit(store: Any, a: Attributes, versions: tuple[str, ...], warn: Callable[[str], None],
          audit: list[str]) -> None:
    """Raise the server's Status if a binding with action Deny denies this request."""
    bindings = sorted(store.items(BINDINGS), key=lambda b: b["metadata"]["name"])
    if not bindings:
        return
    policies = {p["metadata"]["name"]: p for p in store.items(POLICIES)}
    namespace_object = store.get(("", "namespaces"), "", a.namespace) if a.namespace else None
    if a.plural == "namespaces":
        target = a.object or a.old_object or {}
        ns_labels: dict[str, str] | None = (target.get("metadata") or {}).get("labels") or {}
    elif a.namespace:
        ns_labels = ((namespace_object or {}).get("metadata") or {}).get("labels") or {}
    else:
        ns_labels = None  # cluster-scoped: namespaceSelector does not apply
    denied: list[Decision] = []
    for binding in bindings:
        bspec = binding.get("spec") or {}
        policy = policies.get(bspec.get("policyName", ""))
        if policy is None:
            continue
        if not resources_match((policy.get("spec") or {}).get("matchConstraints"), a, versions, ns_labels,
                               rules_required=True):
            continue
        if bspec.get("matchResources") and not resources_match(bspec["matchResources"], a, versions,
                                                               ns_labels, rules_required=False):
            continue
        decision = evaluate(policy, binding, a, namespace_object)
        if decision is None:
            continue
        text = (f"ValidatingAdmissionPolicy '{decision.policy}' with binding '{decision.binding}' denied "
                f"request: {decision.message}")
        if "Warn" in decision.actions:
            warn(f"Validation failed for ValidatingAdmissionPolicy '{decision.policy}' with binding "
                 f"'{decision.binding}': {decision.message}")
        if "Audit" in decision.actions:
            audit.append(text)
            log.info("audit: %s", text)
        if "Deny" in decision.actions:
            denied.append(decision)
    if denied:
        d = denied[0]
        message = f"ValidatingAdmissionPolicy '{d.policy}' with binding '{d.binding}' denied request: {d.message}"
        what = f"{a.plural}.{a.group}" if a.group else a.plural
        subject = f'{what} "{a.name}"' if a.name else what
        raise ApiError(REASONS.get(d.reason, 422), d.reason, f"{subject} is forbidden: {message}",
                       {"name": a.name, "group": a.group, "kind": a.plural, "causes": [{"message": message}]})


# --- checking the policy objects themselves -----------------------------------------------------------

def _check_expressions(items: list[Any], path: str, keys: tuple[str, ...]) -> list[FieldError]:
    errors: list[FieldError] = []
    for i, item in enumerate(items):
        for key in keys:
            text = (item or {}).get(key)
            if key == "expression" and not text:
                errors.append(required(f"{path}[{i}].{key}", ""))
                continue
            if text:
                try:
                    _compiled(text)
                except cel.CelCompileError as exc:
                    errors.append(invalid(f"{path}[{i}].{key}", text, f"compilation failed: {exc}"))
    return errors


def policy_errors(plural: str, obj: dict[str, Any]) -> list[FieldError]:
    """What the server's validation says about a policy or binding beyond its schema."""
    spec = obj.get("spec") or {}
    errors: list[FieldError] = []
    if plural == POLICIES[1]:
        if not spec.get("validations") and not spec.get("auditAnnotations"):
            errors.append(required("spec.validations",
                                   "validations or auditAnnotations must contain at least one item"))
        if not (spec.get("matchConstraints") or {}).get("resourceRules"):
            errors.append(required("spec.matchConstraints.resourceRules", ""))
        errors += _check_expressions(spec.get("validations") or [], "spec.validations",
                                     ("expression", "messageExpression"))
        errors += _check_expressions(spec.get("matchConditions") or [], "spec.matchConditions", ("expression",))
        errors += _check_expressions(spec.get("variables") or [], "spec.variables", ("expression",))
        names = [c.get("name") for c in spec.get("matchConditions") or []]
        for i, name in enumerate(names):
            if name in names[:i]:
                errors.append(FieldError(f"spec.matchConditions[{i}].name", "FieldValueDuplicate",
                                         f'Duplicate value: "{name}"'))
    elif plural == BINDINGS[1]:
        if not spec.get("policyName"):
            errors.append(required("spec.policyName", ""))
        actions = spec.get("validationActions") or []
        if not actions:
            errors.append(required("spec.validationActions", ""))
        if "Deny" in actions and "Warn" in actions:
            errors.append(invalid("spec.validationActions", actions,
                                  "must not contain both Deny and Warn (repeating the same validation "
                                  "failure information in the API response and headers serves no purpose)"))
    return errors
