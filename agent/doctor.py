"""`mesh-agent doctor`: one line per thing the agent needs, pass / warn / fail with a hint, or skip with why.

Each check is a small function returning Check lines; `run_checks` stops nothing on a failure (an admin
wants the whole picture), except that checks needing the API are skipped when it cannot be reached.
Nothing here writes anything outside a private temporary directory; the only traffic is to istiod's
addresses, the API server and, with an identity provider, the cloud's metadata service (or STS).
"""

from __future__ import annotations

import argparse
import email.utils
import json
import shutil
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent import config, proc
from agent.paths import Layout

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"
SOON = 600.0  # a token or certificate closer than this to expiry is a warning
SKEW = 5.0    # clock skew against the API server tolerated before warning
EXAMPLE = "/usr/share/doc/mesh-agent/examples/agent.yaml.example"
SYSTEMD_RUNNING = "/run/systemd/system"  # exists only while systemd is PID 1 (sd_booted(3))


@dataclass(frozen=True)
class Check:
    name: str
    result: str
    message: str
    hint: str = ""

    def line(self) -> str:
        text = f"{self.result.upper():4} {self.name}: {self.message}"
        return text + (f"\n     hint: {self.hint}" if self.hint else "")


@dataclass
class Context:
    """What the checks found so far, so later checks build on earlier ones."""
    path: str
    cfg: config.Config | None = None
    layout: Layout | None = None
    bundle: Any = None
    kube: Any = None
    namespace: str | None = None
    group: str | None = None
    identity_token: str | None = None  # the token file the API checks use, with an identity provider


def add_arguments(p: argparse.ArgumentParser, _verb: str) -> None:
    p.add_argument("--config", help=f"agent.yaml (default: ${config.ENV_VAR} or {config.DEFAULT_PATH})")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per network check (default 3)")


def main(args: argparse.Namespace) -> int:
    ctx = Context(config.config_path(args.config))
    checks = run_checks(ctx, args.timeout)
    if args.json:
        print(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        for c in checks:
            print(c.line())
        failed = sum(c.result == FAIL for c in checks)
        warned = sum(c.result == WARN for c in checks)
        print(f"{len(checks)} checks: {failed} failed, {warned} warnings")
    return 1 if any(c.result == FAIL for c in checks) else 0


def run_checks(ctx: Context, timeout: float) -> list[Check]:
    out: list[Check] = []
    steps: list[Callable[[Context, float], list[Check]]] = [
        check_config, check_identity, check_bundle, check_sidecar, check_istiod, check_api, check_rbac,
        check_group, check_ports, check_iptables, check_istio_service]
    for step in steps:
        try:
            out.extend(step(ctx, timeout))
        except Exception as exc:  # a broken check must not hide the others
            out.append(Check(step.__name__.removeprefix("check_"), FAIL, f"the check itself failed: {exc}"))
    return out


# --- the checks, in the order an admin would look -------------------------------------------------

def check_config(ctx: Context, _t: float) -> list[Check]:
    try:
        ctx.cfg = config.load(ctx.path)
    except config.ConfigError as exc:
        first = str(exc.errors[0])
        more = f" (and {len(exc.errors) - 1} more)" if len(exc.errors) > 1 else ""
        hint = (f"write it (the package ships a commented example as {EXAMPLE}), or give --config"
                if not Path(ctx.path).exists() else f"mesh-agent config check {ctx.path}")
        return [Check("config", FAIL, first + more, hint)]
    ctx.layout = Layout.from_config(ctx.cfg)
    if not ctx.cfg.configured:
        return [Check("config", WARN, f"{ctx.path} says configured: false",
                      "the service will not start until it is set to true")]
    return [Check("config", PASS, f"{ctx.path} is valid")]


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

    ic = dataclasses.replace(ctx.cfg.identity, timeout=min(float(ctx.cfg.identity.timeout), timeout), tries=1)
    provider = make_provider(ic)
    try:
        token = provider.fetch()
    except IdentityError as exc:
        return [Check("identity", FAIL, f"{ic.provider}: {exc}", IDENTITY_HINTS[ic.provider])]
    now = time.time()
    out = [Check("identity", PASS, f"{ic.provider} token from {provider.where}: {describe(token)}")]
    left = token.expiry - now
    if left <= 0:
        out.append(Check("identity expiry", FAIL, f"the token expired {_span(-left)} ago",
                         IDENTITY_HINTS[ic.provider]))
    elif left < min(SOON, token.lifetime / 4):
        out.append(Check("identity expiry", WARN, f"the token expires in {_span(left)}",
                         IDENTITY_HINTS[ic.provider]))
    else:
        out.append(Check("identity expiry", PASS, f"valid for {_span(left)} (lifetime {_span(token.lifetime)})"))
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
                             f"{_span(now - running.expiry)} ago",
                             "the agent has stopped refreshing it: see `mesh-agent status` and its log"))
        else:
            out.append(Check("identity token file", PASS,
                             f"the agent's token is valid for {_span(running.expiry - now)}"))
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


def check_bundle(ctx: Context, _t: float) -> list[Check]:
    from agent.bundle import install, model

    if ctx.cfg is None or ctx.layout is None:
        return [Check("bundle", SKIP, "no valid configuration")]
    loaded = install.load_last_good(ctx.layout)
    if loaded is None:
        return [Check("bundle", FAIL, f"no bundle installed yet (source: {ctx.cfg.bundle.source})",
                      f"is the agent running? `mesh-agent bundle fetch --config {ctx.path}` shows whether "
                      "the source answers")]
    info, files = loaded
    try:
        ctx.bundle = model.parse_bundle(files, info.fetched_at, ctx.cfg.bundle)
    except model.BundleError as exc:
        return [Check("bundle", FAIL, f"the installed bundle {info.version} is invalid: {exc}")]
    out = [Check("bundle", PASS, f"{info.version} from {info.source}, installed "
                 f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(info.installed_at))}")]
    drifted = install.drifted(ctx.layout)
    if drifted:
        out.append(Check("bundle files", WARN, f"differ from the installed bundle: {', '.join(drifted)}",
                         "the running agent restores them; edit the bundle at its source instead"))
    now = time.time()
    for what, when, hint in (
            ("token", info.token_expiry, "the agent refreshes at 70% of its lifetime: is the source "
             "serving a fresh one? (`bundle.source: kubernetes` mints tokens itself)"),
            ("root cert", info.cert_expiry, "rotate the mesh root CA and publish a new bundle")):
        if when is None:
            out.append(Check(what, PASS, "does not expire"))
        elif when <= now:
            out.append(Check(what, FAIL if what == "root cert" else WARN,
                             f"expired {_span(now - when)} ago", hint))
        elif when - now < SOON:
            out.append(Check(what, WARN, f"expires in {_span(when - now)}", hint))
        else:
            out.append(Check(what, PASS, f"expires in {_span(when - now)}"))
    return out


def check_sidecar(ctx: Context, _t: float) -> list[Check]:
    """The proxy's binary and, for the istio profile, its user: there, or a package named that brings them."""
    if ctx.cfg is None:
        return [Check("sidecar", SKIP, "no valid configuration")]
    from agent.sidecar.package import PackageSource

    sc = ctx.cfg.sidecar
    binary = sc.command[0] if sc.command else (sc.pilot_agent_binary if sc.profile == "istio" else sc.envoy_binary)
    found = Path(binary).is_file() if "/" in binary else shutil.which(binary) is not None
    missing = [] if found else [binary]
    if sc.profile == "istio" and not _user_exists(sc.user):
        missing.append(f"user {sc.user}")
    if not missing:
        return [Check("sidecar", PASS, f"{binary}" + (f", user {sc.user}" if sc.profile == "istio" else ""))]
    package = PackageSource.from_config(sc.package) or (
        PackageSource.from_config(ctx.bundle.sidecar) if ctx.bundle is not None and ctx.bundle.sidecar else None)
    if package is not None:
        return [Check("sidecar", PASS, f"{' and '.join(missing)} not there yet: the agent installs "
                      f"{package.name} {package.version} from {package.url}")]
    return [Check("sidecar", FAIL, f"{' and '.join(missing)} missing, and no package is named to install",
                  "install istio-sidecar.deb, or name it in sidecar.package or the bundle's sidecar.yaml "
                  "(the agent installs it)" if sc.profile == "istio" else
                  f"install the proxy at {binary} (sidecar.envoy_binary / sidecar.command)")]


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
    from agent.bundle.install import last_good_file
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
        ctx.kube = Kube.from_credentials(creds, timeout=timeout)
        from kubernetes import client

        started = time.time()
        # The raw answer (old and new clients alike): its Date header tells the clock skew.
        resp = client.VersionApi(ctx.kube.api_client).get_code(_preload_content=False,
                                                                _request_timeout=(timeout, timeout))
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
                resp = api.create_self_subject_access_review(body, _preload_content=False,
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
    if ctx.kube is None or not ctx.namespace or not ctx.group:
        return [Check("WorkloadGroup", SKIP, "API not reachable or group unknown")]
    from agent.kube.client import GROUPS
    from agent.kube.errors import ApiError

    try:
        group = ctx.kube.get(GROUPS, ctx.namespace, ctx.group)
    except ApiError as exc:
        return [Check("WorkloadGroup", FAIL, str(exc))]
    if group is None:
        return [Check("WorkloadGroup", FAIL, f"{ctx.namespace}/{ctx.group} does not exist",
                      "apply the WorkloadGroup that `mesh-agent manifests` prints")]
    return [Check("WorkloadGroup", PASS, f"{ctx.namespace}/{ctx.group} exists")]


def check_ports(ctx: Context, _t: float) -> list[Check]:
    """The proxy's ports: free, or held by the sidecar this agent runs."""
    if ctx.cfg is None or ctx.layout is None:
        return [Check("ports", SKIP, "no valid configuration")]
    if ctx.bundle is None:
        return [Check("ports", SKIP, "no bundle: the proxy's ports and address come from it")]
    from agent.sidecar import process
    from agent.sidecar.profiles import ProfileError, read_spec

    try:
        spec = read_spec(ctx.cfg.sidecar, ctx.layout, cluster_env=ctx.bundle.env_map if ctx.bundle else {},
                         hostname=socket.gethostname(), address=None)
    except ProfileError as exc:
        return [Check("ports", FAIL, str(exc))]
    record = process.read_pidfile(ctx.layout.sidecar_pidfile)
    ours = _family(record.pid) if record else set()
    holders = process.port_holders(spec.ports, exclude=ours)
    if holders:
        return [Check("ports", FAIL, "; ".join(map(str, holders)),
                      "stop that process (a leftover Envoy or istio.service?) or change the proxy's ports")]
    return [Check("ports", PASS, f"{', '.join(map(str, spec.ports)) or 'none'}: free or held by our proxy")]


def check_iptables(ctx: Context, _t: float) -> list[Check]:
    # Without a configuration the sidecar settings are the defaults: the istio profile, iptables managed.
    sidecar = ctx.cfg.sidecar if ctx.cfg is not None else config.SidecarConfig()
    why = "" if ctx.cfg is not None else " (no configuration: the default istio profile)"
    if sidecar.profile != "istio":
        return [Check("iptables", SKIP, f"the {sidecar.profile} profile does not redirect traffic")]
    if not sidecar.manage_iptables:
        return [Check("iptables", SKIP, "sidecar.manage_iptables is false")]
    if ctx.bundle is not None and ctx.bundle.env_map.get("ISTIO_CUSTOM_IP_TABLES") == "true":
        return [Check("iptables", SKIP, "the bundle says ISTIO_CUSTOM_IP_TABLES=true")]
    found = shutil.which("iptables") or shutil.which("iptables-legacy")
    if found is None:
        return [Check("iptables", FAIL, f"iptables is not installed{why}", "apt install iptables")]
    return [Check("iptables", PASS, f"{found}{why}")]


def check_istio_service(ctx: Context, _t: float) -> list[Check]:
    """istio-sidecar.deb's own unit must not run the proxy too; say only what systemd actually reports."""
    if ctx.layout is not None and str(ctx.layout.root) != "/":
        return [Check("istio.service", SKIP, f"the configuration's root is {ctx.layout.root}, not this host")]
    if not Path(SYSTEMD_RUNNING).is_dir():
        return [Check("istio.service", SKIP, f"cannot tell: systemd is not running here (no {SYSTEMD_RUNNING})")]
    if shutil.which("systemctl") is None:
        return [Check("istio.service", SKIP, "cannot tell: systemctl is not installed")]
    result = proc.run(["systemctl", "show", "--property=LoadState,ActiveState,UnitFileState",
                       "istio.service"], timeout=10)
    if not result.ok:
        said = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[0]
        return [Check("istio.service", SKIP, f"cannot tell: systemctl show failed: {said}")]
    return [istio_service_state(dict(line.partition("=")[::2] for line in result.stdout.splitlines()))]


def istio_service_state(props: dict[str, str]) -> Check:
    """The check's verdict from `systemctl show`'s LoadState, ActiveState and UnitFileState."""
    load, active = props.get("LoadState", ""), props.get("ActiveState", "")
    enabled = props.get("UnitFileState", "")
    if not load or not active:
        return Check("istio.service", SKIP, "cannot tell: systemctl did not report its state")
    if load == "not-found":
        return Check("istio.service", PASS, "not installed")
    if active in ("active", "activating", "reloading", "deactivating"):
        return Check("istio.service", FAIL, f"is {active} alongside mesh-agent: two proxies fight over ports",
                     "systemctl disable --now istio.service")
    if enabled in ("enabled", "enabled-runtime", "linked", "linked-runtime", "alias"):
        return Check("istio.service", WARN, f"{active} but {enabled}: it starts at the next boot and fights "
                     "mesh-agent over the proxy's ports", "systemctl disable istio.service")
    return Check("istio.service", PASS, f"installed but {active}, {enabled or 'not enabled'}")


# --- small helpers --------------------------------------------------------------------------------

def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _family(pid: int) -> set[int]:
    import psutil

    try:
        p = psutil.Process(pid)
        return {pid, *(c.pid for c in p.children(recursive=True))}
    except psutil.Error:
        return set()


def _server(ctx: Context) -> str:
    return str(getattr(getattr(ctx.kube, "configuration", None), "host", "") or "the API server")


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[-1][:200] if text else type(exc).__name__


def _span(seconds: float) -> str:
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 172800:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d"


if __name__ == "__main__":
    sys.exit(main(argparse.Namespace(config=None, json=False, timeout=3.0)))
