"""The cloud-identity part of `mesh-agent manifests` (docs/identity.md): the API server's `jwt`
authenticator for a cloud's instance tokens, its AuthenticationConfiguration, and RoleBindings giving
the VMs' identity group what the agents' service account has. Pure."""

from __future__ import annotations

import json
import re
from typing import Any

IDENTITY_PROVIDERS = ("gcp", "azure", "aws", "oidc")
GCP_ISSUER = "https://accounts.google.com"
AWS_CLAIMS = "claims['https://sts.amazonaws.com/']"


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
