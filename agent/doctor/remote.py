"""The doctor checks of what the agent talks to: the cloud identity, istiod, the API server and the
clock against it, the agent's RBAC, and the WorkloadGroup."""

from __future__ import annotations

import email.utils
import json
import shutil
import socket
import time

from agent.doctor.check import FAIL, PASS, SKEW, SKIP, SOON, WARN, Check, Context, span
from agent.units import Duration

IDENTITY_HINTS = {
    "gcp": "on GCP, the VM needs a service account attached; elsewhere set identity.provider",
    "azure": "on Azure, assign the VM a managed identity (identity.azure.client_id for a user-assigned one)",
    "aws": "on AWS, attach an instance role allowed sts:GetWebIdentityToken, enable outbound identity "
           "federation for the account, and set identity.aws.region",
    "oidc-file": "is the system that writes identity.file (e.g. spiffe-helper) running?",
}


def check_identity(ctx: Context, timeout: float) -> list[Check]:
    """With an identity provider: the metadata service answers, a token comes back, its audience is the
    configured one, and it is not about to expire; the running agent's own token too."""
    if ctx.cfg is None or ctx.cfg.identity.provider == "none":
        return []
    import dataclasses

    from agent.identity.common import IdentityError, audiences, token_from_jwt
    from agent.identity.refresh import describe, make_provider, token_file

    ic = dataclasses.replace(ctx.cfg.identity, timeout=Duration(min(float(ctx.cfg.identity.timeout), timeout)),
                             tries=1)
    provider = make_provider(ic)
    try:
        token = provider.fetch()
    except IdentityError as exc:
        return [Check("identity", FAIL, f"{ic.provider}: {exc}", IDENTITY_HINTS[ic.provider])]
    now = time.time()
    out = [Check("identity", PASS, f"{ic.provider} token from {provider.where}: {describe(token)}")]
    left = token.expiry - now
    if left <= 0:
        out.append(Check("identity expiry", FAIL, f"the token expired {span(-left)} ago",
                         IDENTITY_HINTS[ic.provider]))
    elif left < min(SOON, token.lifetime / 4):
        out.append(Check("identity expiry", WARN, f"the token expires in {span(left)}",
                         IDENTITY_HINTS[ic.provider]))
    else:
        out.append(Check("identity expiry", PASS, f"valid for {span(left)} (lifetime {span(token.lifetime)})"))
    got = audiences(token.claims)
    if ic.audience and ic.audience not in got:
        out.append(Check("identity audience", FAIL, f"the token is for {', '.join(got) or 'no audience'}, "
                         f"not {ic.audience}", "the API server accepts only its jwt issuer.audiences"))
    else:
        out.append(Check("identity audience", PASS, ", ".join(got) or "none"))
    kept = token_file(ctx.cfg)
    if ic.provider != "oidc-file" and kept:
        try:
            with open(kept, encoding="utf-8") as f:
                running = token_from_jwt(f.read())
        except (OSError, IdentityError):
            running = None
        if running is None:
            out.append(Check("identity token file", WARN, f"{kept} holds no token", "is the agent running?"))
        elif running.expiry <= now:
            out.append(Check("identity token file", FAIL, f"the agent's token in {kept} expired "
                             f"{span(now - running.expiry)} ago",
                             "the agent has stopped refreshing it: see `mesh-agent status` and its log"))
        else:
            out.append(Check("identity token file", PASS,
                             f"the agent's token is valid for {span(running.expiry - now)}"))
    ctx.identity_token = _private_token_file(token.jwt)
    return out


def _private_token_file(jwt: str) -> str:
    """The fresh token where the API checks' client reads it, removed when doctor exits."""
    import atexit
    import os
    import tempfile

    directory = tempfile.mkdtemp(prefix="mesh-agent-doctor-")
    path = os.path.join(directory, "token")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(jwt)
    atexit.register(shutil.rmtree, directory, True)
    return path


def check_istiod(ctx: Context, timeout: float) -> list[Check]:
    """TCP to istiod's discovery and CA addresses, resolved through the bundle's hosts lines first."""
    if ctx.bundle is None:
        return [Check("istiod", SKIP, "no bundle")]
    env = ctx.bundle.env_map
    targets = {}
    discovery = (ctx.bundle.proxy_config or {}).get("discoveryAddress")
    if discovery:
        targets["discovery"] = str(discovery)
    targets["CA"] = env.get("CA_ADDR") or "istiod.istio-system.svc:15012"
    hosts = {name: line.address for line in ctx.bundle.hosts for name in line.names}
    out = []
    for what, target in targets.items():
        host, _, port = target.rpartition(":")
        host = host.strip("[]")
        address = hosts.get(host, host)
        try:
            with socket.create_connection((address, int(port)), timeout=timeout):
                pass
        except (OSError, ValueError) as exc:
            out.append(Check(f"istiod {what}", FAIL, f"{target} ({address}): {getattr(exc, 'strerror', None) or exc}",
                             "check the east-west gateway address in the bundle's hosts file and the "
                             "firewall between this VM and it"))
        else:
            out.append(Check(f"istiod {what}", PASS, f"{target} ({address}) accepts connections"))
    return out


def check_api(ctx: Context, timeout: float) -> list[Check]:
    if ctx.cfg is None:
        return [Check("API", SKIP, "no valid configuration"),
                Check("clock", SKIP, "no API server configured to compare with")]
    if not ctx.cfg.registry.enabled and ctx.cfg.bundle.source != "kubernetes":
        return [Check("API", SKIP, "registry.enabled is false"),
                Check("clock", SKIP, "no API server configured to compare with (registry.enabled is false)")]
    from agent.bundle.store import last_good_file
    from agent.kube.client import Kube
    from agent.registry.service import PlanError, credentials

    r = ctx.cfg.registry
    shipped = last_good_file(ctx.layout, "kubeconfig") if ctx.layout is not None else None
    try:
        creds = credentials(r, str(shipped) if shipped is not None and shipped.exists() else None,
                            ctx.identity_token)
    except PlanError as exc:
        return [Check("API", FAIL, str(exc), "set registry.kubeconfig, or ship a kubeconfig in the bundle"),
                Check("clock", SKIP, "no API server to compare with")]
    try:
        # The doctor's timeout bounds each of its requests as a whole.
        ctx.kube = Kube.from_credentials(creds, timeout=timeout, deadline=timeout)
        from kubernetes import client

        started = time.time()
        # The raw answer (old and new clients alike): its Date header tells the clock skew.
        resp = ctx.kube.request("get", "/version", client.VersionApi(ctx.kube.api_client).get_code,
                                _preload_content=False, _request_timeout=(timeout, timeout))
        finished = time.time()
    except Exception as exc:
        ctx.kube = None
        return [Check("API", FAIL, f"{_server(ctx)}: {_short(exc)}",
                      "check the server address, its CA and the network path to it"),
                Check("clock", SKIP, "the API server did not answer, so there is nothing to compare with")]
    out = [Check("API", PASS, f"{_server(ctx)} answers (Kubernetes "
                 f"{json.loads(resp.data).get('gitVersion', '?')})")]
    date = resp.headers.get("Date")
    if date:
        server_time = email.utils.parsedate_to_datetime(date).timestamp()
        skew = server_time - (started + finished) / 2
        level = PASS if abs(skew) < SKEW else WARN
        out.append(Check("clock", level, f"{skew:+.1f}s against the API server",
                         "" if level == PASS else "run timesyncd or chrony: token and lease times depend on it"))
    else:
        out.append(Check("clock", SKIP, "the API server's answer had no Date header to compare with"))
    env = ctx.bundle.env_map if ctx.bundle is not None else {}
    ctx.namespace = r.namespace or env.get("POD_NAMESPACE")
    ctx.group = r.group or env.get("ISTIO_META_WORKLOAD_NAME")
    return out


def check_rbac(ctx: Context, timeout: float) -> list[Check]:
    if ctx.kube is None or not ctx.namespace:
        return [Check("RBAC", SKIP, "API not reachable or namespace unknown")]
    from kubernetes import client

    from agent.registry.manifests import AGENT_RULES

    api = client.AuthorizationV1Api(ctx.kube.api_client)
    denied = []
    asked = 0
    for rule in AGENT_RULES:
        for resource in rule["resources"]:
            plural, _, sub = resource.partition("/")
            for verb in rule["verbs"]:
                attrs = {"verb": verb, "group": rule["apiGroups"][0], "resource": plural,
                         "namespace": ctx.namespace}
                if sub:
                    attrs["subresource"] = sub
                body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                        "spec": {"resourceAttributes": attrs}}
                resp = ctx.kube.request("create", "selfsubjectaccessreviews",
                                        api.create_self_subject_access_review, body, _preload_content=False,
                                        _request_timeout=(timeout, timeout))
                asked += 1
                if not (json.loads(resp.data).get("status") or {}).get("allowed"):
                    denied.append(f"{verb} {resource}")
    out = []
    if denied:
        out.append(Check("RBAC", FAIL, f"denied in {ctx.namespace}: {', '.join(denied)}",
                         "apply the Role and RoleBinding that `mesh-agent manifests` prints"))
    else:
        out.append(Check("RBAC", PASS, f"all {asked} permissions the agent uses are granted in {ctx.namespace}"))
    if ctx.cfg is not None and ctx.cfg.bundle.source.strip() == "kubernetes" and ctx.bundle is not None:
        out.extend(_cluster_source_access(ctx))
    return out


def _cluster_source_access(ctx: Context) -> list[Check]:
    from agent.bundle import cluster_source

    assert ctx.cfg is not None
    settings = cluster_source.settings_from_config(ctx.cfg.bundle)
    sa = ctx.bundle.env_map.get("SERVICE_ACCOUNT", "")
    out = []
    for a in cluster_source.access_checks(ctx.kube, settings, sa):
        level = PASS if a.allowed else (FAIL if a.required else WARN)
        out.append(Check("RBAC (bundle source)", level, a.what, a.hint))
    return out


def check_group(ctx: Context, _t: float) -> list[Check]:
    """Each app's WorkloadGroup exists (several apps: one line each), and runs as the service account of
    the sidecar the apps share."""
    if ctx.kube is None or not ctx.namespace:
        return [Check("WorkloadGroup", SKIP, "API not reachable or namespace unknown")]
    from agent import apps
    from agent.kube.client import GROUPS
    from agent.kube.errors import ApiError

    several = ctx.cfg is not None and bool(ctx.cfg.apps)
    wanted = [(a.name, a.group) for a in apps.apps(ctx.cfg)] if several and ctx.cfg is not None \
        else [(None, ctx.group)]
    sa = ctx.bundle.env_map.get("SERVICE_ACCOUNT") if ctx.bundle is not None else None
    out = []
    for app, name in wanted:
        what = f"WorkloadGroup ({app})" if app else "WorkloadGroup"
        if not name:
            out.append(Check(what, SKIP, "group unknown (no registry.group, no bundle yet)"))
            continue
        try:
            group = ctx.kube.get(GROUPS, ctx.namespace, name)
        except ApiError as exc:
            out.append(Check(what, FAIL, str(exc)))
            continue
        if group is None:
            out.append(Check(what, FAIL, f"{ctx.namespace}/{name} does not exist",
                             "apply the WorkloadGroup that `mesh-agent manifests` prints"))
            continue
        runs_as = ((group.get("spec") or {}).get("template") or {}).get("serviceAccount")
        if several and sa and runs_as and runs_as != sa:
            out.append(Check(what, FAIL, f"{ctx.namespace}/{name} runs as service account {runs_as}, the shared "
                             f"sidecar as {sa}", "give the groups of the apps on one VM the same serviceAccount"))
            continue
        out.append(Check(what, PASS, f"{ctx.namespace}/{name} exists"))
    return out


def _server(ctx: Context) -> str:
    return str(getattr(getattr(ctx.kube, "configuration", None), "host", "") or "the API server")


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[-1][:200] if text else type(exc).__name__
