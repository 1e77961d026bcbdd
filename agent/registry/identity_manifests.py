"""The cloud-identity part of `mesh-agent manifests` (docs/identity.md): the API server's `jwt`
authenticator for a cloud's instance tokens, its AuthenticationConfiguration, RoleBindings giving
the VMs' identity group what the agents' service account has, and the admission policy that fences
each VM to its own entries and leases (the API server tells VMs apart by their usernames). Pure."""

from __future__ import annotations

import json
import re
from typing import Any

IDENTITY_PROVIDERS = ("gcp", "azure", "aws", "oidc")
GCP_ISSUER = "https://accounts.google.com"
AWS_CLAIMS = "claims['https://sts.amazonaws.com/']"
# Every per-VM username the authenticator maps starts with this; service accounts never do.
VM_USER_PREFIX = "mesh-vm:"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"


def cel_str(value: str) -> str:
    """A CEL string literal (a JSON string is one)."""
    return json.dumps(value)


def identity_group(namespace: str, group: str) -> str:
    """The Kubernetes group every VM of this WorkloadGroup authenticates into."""
    return f"mesh-vm:{namespace}:{group}"


def identity_authenticator(*, provider: str, namespace: str, group: str, audience: str,
                           issuer: str | None = None, project: str | None = None, tenant: str | None = None,
                           resource_group: str | None = None, image: str | None = None,
                           role: str | None = None, tags: dict[str, str] | None = None,
                           require: dict[str, str] | None = None, username_claim: str = "sub",
                           issuer_ca: str | None = None) -> dict[str, Any]:
    """One `jwt` authenticator of the API server's AuthenticationConfiguration: the cloud's issuer and
    this audience; rules pinning the project (subscription, account) and, where the cloud's token
    says it, the image or a tag; username mesh-vm:<instance id>; group mesh-vm:<namespace>:<group>."""
    if not audience:
        raise ValueError("--audience is needed with --identity (the audience the agents ask for)")
    rules: list[dict[str, str]] = []

    def rule(expression: str, message: str) -> None:
        rules.append({"expression": expression, "message": message})

    if provider == "gcp":
        if not project:
            raise ValueError("--identity gcp needs --project (the VMs' project id)")
        url = issuer or GCP_ISSUER
        gce = "claims.google.compute_engine"
        rule(f"{gce}.project_id == {cel_str(project)}", f"the VM must be in project {project}")
        if image:
            rule(f"{cel_str(image)} in {gce}.license_id", f"the VM must run the image with licence {image}")
        username = f"'mesh-vm:' + {gce}.instance_id"
        uid = f"{gce}.instance_id"
    elif provider == "azure":
        if not (tenant and project):
            raise ValueError("--identity azure needs --tenant and --project (the subscription id)")
        url = issuer or f"https://sts.windows.net/{tenant}/"
        rule(f"claims.tid == {cel_str(tenant)}", f"the identity must belong to tenant {tenant}")
        scope = f"/subscriptions/{project.lower()}/"
        if resource_group:
            scope += f"resourcegroups/{resource_group.lower()}/"
        rule(f"claims.xms_mirid.lowerAscii().startsWith({cel_str(scope)})", f"the VM must be under {scope}")
        username = "'mesh-vm:' + claims.oid"
        uid = "claims.oid"
    elif provider == "aws":
        if not (issuer and project):
            raise ValueError("--identity aws needs --issuer (the account's outbound federation issuer URL) "
                             "and --project (the account id)")
        url = issuer
        rule(f"{AWS_CLAIMS}.aws_account == {cel_str(project)}", f"the role must be in account {project}")
        if role:
            arn = f"arn:aws:iam::{project}:role/{role}"
            rule(f"claims.sub == {cel_str(arn)}", f"the token must be the role {role}'s")
        for key, value in sorted((tags or {}).items()):
            rule(f"{AWS_CLAIMS}.principal_tags[{cel_str(key)}] == {cel_str(value)}",
                 f"the role must have tag {key}={value}")
        username = f"'mesh-vm:' + {AWS_CLAIMS}.ec2_source_instance_arn.split('/')[1]"
        uid = f"{AWS_CLAIMS}.ec2_source_instance_arn"
    elif provider == "oidc":
        if not issuer:
            raise ValueError("--identity oidc needs --issuer")
        url = issuer
        for key, value in sorted((require or {}).items()):
            rule(f"claims.{key} == {cel_str(value)}" if re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key)
                 else f"claims[{cel_str(key)}] == {cel_str(value)}", f"the token's {key} must be {value}")
        username = f"'mesh-vm:' + claims.{username_claim}" if re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", username_claim) \
            else f"'mesh-vm:' + claims[{cel_str(username_claim)}]"
        uid = None
    else:
        raise ValueError(f"--identity must be one of {', '.join(IDENTITY_PROVIDERS)}, got {provider!r}")
    if not url.startswith("https://"):
        raise ValueError(f"the issuer URL must be https://, got {url!r}")
    issuer_doc: dict[str, Any] = {"url": url, "audiences": [audience]}
    if issuer_ca:
        issuer_doc["certificateAuthority"] = issuer_ca
    mappings: dict[str, Any] = {"username": {"expression": username},
                                "groups": {"expression": f"[{cel_str(identity_group(namespace, group))}]"}}
    if uid:
        mappings["uid"] = {"expression": uid}
    return {"issuer": issuer_doc, "claimValidationRules": rules, "claimMappings": mappings}


def authentication_configuration(*authenticators: dict[str, Any]) -> dict[str, Any]:
    """The file the API server reads with --authentication-config. An issuer may appear only once: the
    VM groups of one cloud project share one authenticator (see docs/identity.md)."""
    return {"apiVersion": "apiserver.config.k8s.io/v1beta1", "kind": "AuthenticationConfiguration",
            "jwt": list(authenticators)}


def identity_bindings(docs: list[dict[str, Any]], namespace: str, group: str) -> list[dict[str, Any]]:
    """RoleBindings giving the group's VM identity group exactly what the service account's bindings give
    (the same Roles: least privilege is the same on both paths)."""
    out = []
    subject = {"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": identity_group(namespace, group)}
    agent_role = f"mesh-agent-{group}"
    for doc in docs:
        if doc["kind"] != "RoleBinding" or doc["roleRef"]["name"].startswith("mesh-agent-reaper-"):
            continue
        if doc["roleRef"]["name"] != agent_role and doc["metadata"]["namespace"] == namespace:
            continue
        binding = json.loads(json.dumps(doc))
        binding["metadata"]["name"] = f"{doc['metadata']['name']}-identity"
        binding["subjects"] = [dict(subject)]
        out.append(binding)
    return out


def owner_policy(*, namespace: str, group: str, name: str, resource_rules: list[dict[str, Any]],
                 owner_annotation: str, labels: dict[str, str], token_audience: str) -> list[dict[str, Any]]:
    """A second ValidatingAdmissionPolicy and binding, for per-VM identities only: a VM writes and
    deletes only the WorkloadEntries and Leases that record its own API username in `owner_annotation`
    (the agent writes it there, agent.registry.entry.OWNER_ANNOTATION). On create and update the new
    object must name the caller; on update and delete the old one must too, so no sibling's entry or
    lease can be withdrawn, rewritten or taken over, even one whose lease expired (the reaper, a
    service account, removes those). Matched: members of the group's identity group whose username is
    a per-VM one (`mesh-vm:...`), never a service account: those are shared by the group's VMs (and
    the reaper), so pinning them would fence nothing. The same VMs may ask TokenRequest (the bundle
    source `kubernetes`) only for `token_audience` (istio-ca): a service-account token for the API
    server's audience would let a VM write as the group's service account, round this policy."""
    user = "request.userInfo.username"
    ann = cel_str(owner_annotation)

    def owner_of(o: str) -> str:
        return f"has({o}.metadata.annotations) && {ann} in {o}.metadata.annotations"

    def shown(var: str) -> str:
        return f"(variables.{var} == '' ? 'nobody (no {owner_annotation} annotation)' : variables.{var})"

    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name, "labels": dict(labels)},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [*resource_rules, {
                "apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                "resources": ["serviceaccounts/token"]}]},
            "matchConditions": [
                {"name": "group-vms", "expression": f"{cel_str(identity_group(namespace, group))} in "
                                                    "request.userInfo.groups"},
                {"name": "per-vm-username", "expression": f"{user}.startsWith({cel_str(VM_USER_PREFIX)}) && "
                                                          f"!{user}.startsWith({cel_str(SERVICE_ACCOUNT_PREFIX)})"}],
            "variables": [
                {"name": "isToken", "expression": "request.resource.resource == 'serviceaccounts'"},
                {"name": "kind", "expression": "request.resource.resource == 'workloadentries' ? "
                                               "'WorkloadEntry' : 'Lease'"},
                {"name": "newOwner", "expression": f"request.operation != 'DELETE' && {owner_of('object')} ? "
                                                   f"string(object.metadata.annotations[{ann}]) : ''"},
                {"name": "oldOwner", "expression": f"request.operation != 'CREATE' && {owner_of('oldObject')} ? "
                                                   f"string(oldObject.metadata.annotations[{ann}]) : ''"}],
            "validations": [
                {"expression": f"!variables.isToken || (has(object.spec.audiences) && size(object.spec.audiences) > 0 "
                               f"&& object.spec.audiences.all(a, a == {cel_str(token_audience)}))",
                 "message": f"a VM may ask for service-account tokens only for audience {token_audience}",
                 "messageExpression": f"'a VM may ask for service-account tokens only for audience {token_audience}; "
                                      f"this credential is ' + {user}"},
                {"expression": f"variables.isToken || request.operation == 'CREATE' || variables.oldOwner == {user}",
                 "message": f"a VM may change or delete only the entries and leases whose {owner_annotation} "
                            "annotation names it",
                 "messageExpression": f"variables.kind + ' ' + request.name + ' belongs to ' + {shown('oldOwner')}"
                                      f" + '; this credential is ' + {user}"},
                {"expression": f"variables.isToken || request.operation == 'DELETE' || variables.newOwner == {user}",
                 "message": f"a VM must name itself in the {owner_annotation} annotation of what it writes",
                 "messageExpression": f"variables.kind + ' ' + request.name + ' must name its writer in "
                                      f"annotation {owner_annotation}, not ' + {shown('newOwner')} + "
                                      f"'; this credential is ' + {user}"},
            ],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name, "labels": dict(labels)},
        "spec": {"policyName": name, "validationActions": ["Deny"],
                 "matchResources": {"namespaceSelector": {
                     "matchLabels": {"kubernetes.io/metadata.name": namespace}}}},
    }
    return [policy, binding]
