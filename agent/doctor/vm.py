"""The doctor checks of this machine: the configuration, the installed bundle, the proxy's binary and
user, its ports, iptables, and istio-sidecar.deb's own unit."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

from agent import config, proc
from agent.doctor.check import FAIL, PASS, SKIP, SOON, WARN, Check, Context, span
from agent.paths import Layout

EXAMPLE = "/usr/share/doc/mesh-agent/examples/agent.yaml.example"
SYSTEMD_RUNNING = "/run/systemd/system"  # exists only while systemd is PID 1 (sd_booted(3))


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


def check_bundle(ctx: Context, _t: float) -> list[Check]:
    from agent.bundle import install, model, store

    if ctx.cfg is None or ctx.layout is None:
        return [Check("bundle", SKIP, "no valid configuration")]
    loaded = store.load_last_good(ctx.layout)
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
                             f"expired {span(now - when)} ago", hint))
        elif when - now < SOON:
            out.append(Check(what, WARN, f"expires in {span(when - now)}", hint))
        else:
            out.append(Check(what, PASS, f"expires in {span(when - now)}"))
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


def check_ports(ctx: Context, _t: float) -> list[Check]:
    """The proxy's ports: free, or held by the sidecar this agent runs."""
    if ctx.cfg is None or ctx.layout is None:
        return [Check("ports", SKIP, "no valid configuration")]
    if ctx.bundle is None:
        return [Check("ports", SKIP, "no bundle: the proxy's ports and address come from it")]
    from agent.sidecar import adopt, ports
    from agent.sidecar.profiles import ProfileError, read_spec

    try:
        spec = read_spec(ctx.cfg.sidecar, ctx.layout, cluster_env=ctx.bundle.env_map if ctx.bundle else {},
                         hostname=socket.gethostname(), address=None)
    except ProfileError as exc:
        return [Check("ports", FAIL, str(exc))]
    record = adopt.read_pidfile(ctx.layout.sidecar_pidfile)
    ours = _family(record.pid) if record else set()
    holders = ports.port_holders(spec.ports, exclude=ours)
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
