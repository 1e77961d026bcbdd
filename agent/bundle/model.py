"""Parse and validate a mesh bundle. Pure: bytes in, a frozen Bundle (or every problem found) out.

A bundle is the set of files `istioctl x workload entry configure` writes (cluster.env, mesh.yaml,
root-cert.pem, istio-token, hosts) plus optional extras (workloadgroup.yaml, kubeconfig, sidecar.yaml,
SHA256SUMS). Nothing here touches the disk or the network, so every rule is unit-tested directly.
Each file's rules are in the module named after it (agent.bundle.clusterenv, .credentials for
root-cert.pem and istio-token, .meshconfig for mesh.yaml and workloadgroup.yaml, .extras, .hosts);
this module puts them together into one Bundle.

Problems are reported as `file:line: message` (line omitted when unknown), all of them at once, so an
operator fixes a bad bundle in one round.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from agent import safeload
from agent.bundle.clusterenv import drop_env_key, scan_cluster_env
from agent.bundle.credentials import check_root_cert, check_token
from agent.bundle.extras import check_kubeconfig, check_sidecar, check_sums
from agent.bundle.hosts import HostLine, scan_hosts
from agent.bundle.meshconfig import check_mesh_config, check_workload_group
from agent.config import BundleConfig, PackageConfig
from agent.health.config import ProbeConfig

REQUIRED_FILES = ("cluster.env", "mesh.yaml", "root-cert.pem", "istio-token")
# istioctl always writes `hosts`, but it is empty when no gateway address was found; accept it missing.
OPTIONAL_FILES = ("hosts", "workloadgroup.yaml", "kubeconfig", "sidecar.yaml", "SHA256SUMS")
KNOWN_FILES = REQUIRED_FILES + OPTIONAL_FILES

AUTOREGISTER_KEY = "ISTIO_META_AUTO_REGISTER_GROUP"


class BundleError(Exception):
    """The bundle cannot be used. `problems` lists every reason, one line each."""

    def __init__(self, problems: list[str]) -> None:
        problems = [one_line(p) for p in problems]
        super().__init__("\n".join(problems))
        self.problems = problems


def one_line(text: str) -> str:
    """A problem as one printable line: names and values from the bundle may hold newlines or control
    characters, which are shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def parse_cluster_env(text: str, file: str = "cluster.env") -> list[tuple[str, str]]:
    """(key, value) pairs in file order; raises BundleError listing every bad line."""
    entries, problems = scan_cluster_env(text, file)
    if problems:
        raise BundleError(problems)
    return [(e.key, e.value) for e in entries]


def _load_yaml(text: str, file: str, problems: list[str]) -> Any:
    """Through agent.safeload: size, depth and value caps, no anchors, one line per refusal."""
    try:
        return safeload.load_yaml(text, file)
    except safeload.LoadError as exc:
        problems.append(str(exc))
        return None


# --- the whole bundle -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Bundle:
    """A validated bundle. `files` holds the bytes to install (cluster.env without the auto-registration
    key when it was dropped); `probe` is the mesh.yaml readinessProbe as agent.config.ProbeConfig."""
    files: Mapping[str, bytes]
    env: tuple[tuple[str, str], ...]
    proxy_config: Mapping[str, Any]
    probe: ProbeConfig | None
    token_expiry: float | None
    token_issued_at: float | None
    token_subject: str
    cert_expiry: float
    hosts: tuple[HostLine, ...]
    workload_group: Mapping[str, Any] | None
    kubeconfig: Mapping[str, Any] | None
    sidecar: PackageConfig | None
    digest: str  # sha256 of the bundle as received (names and bytes)
    warnings: tuple[str, ...]
    dropped_keys: tuple[str, ...] = ()
    extras: tuple[str, ...] = field(default=())  # names of the optional extras present

    @property
    def version(self) -> str:
        return self.digest[:12]

    @property
    def env_map(self) -> dict[str, str]:
        return dict(self.env)

    @property
    def hosts_lines(self) -> tuple[str, ...]:
        return tuple(str(h) for h in self.hosts)


def bundle_digest(files: Mapping[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        data = files[name]
        h.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return h.hexdigest()


def _text(files: Mapping[str, bytes], name: str, problems: list[str]) -> str | None:
    data = files.get(name)
    if data is None:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        problems.append(f"{name}:{line}: not UTF-8 text")
        return None
    if "\0" in text:
        problems.append(f"{name}:{text.count(chr(10), 0, text.index(chr(0))) + 1}: contains a NUL byte")
        return None
    return text


def parse_bundle(files: Mapping[str, bytes], now: float, cfg: BundleConfig) -> Bundle:
    """Validate a whole bundle (file name -> bytes) at wall-clock time `now` (epoch seconds).
    Returns a frozen Bundle, or raises BundleError listing every problem."""
    problems: list[str] = []
    warnings: list[str] = []
    unknown = sorted(n for n in files if n not in KNOWN_FILES)
    for n in unknown:
        problems.append(f"{n}: unknown file; a bundle holds only {', '.join(KNOWN_FILES)}")
    for n in REQUIRED_FILES:
        if n not in files:
            problems.append(f"{n}: missing from the bundle")
    if "SHA256SUMS" in files:
        sums = _text(files, "SHA256SUMS", problems)
        if sums is not None:
            check_sums(sums, files, problems)

    install_files = {n: bytes(files[n]) for n in files if n in KNOWN_FILES}
    env: list[tuple[str, str]] = []
    dropped: list[str] = []
    text = _text(files, "cluster.env", problems)
    if text is not None:
        entries, env_problems = scan_cluster_env(text)
        problems.extend(env_problems)
        env = [(e.key, e.value) for e in entries]
        env_map = dict(env)
        if AUTOREGISTER_KEY in env_map:
            group = env_map[AUTOREGISTER_KEY]
            if cfg.on_autoregister == "refuse":
                problems.append(f"cluster.env: {AUTOREGISTER_KEY}={group!r}: the bundle was made with "
                                "--autoregister, so istiod would register this VM a second time; make it "
                                "without --autoregister (or set bundle.on_autoregister: drop)")
            else:
                warnings.append(f"cluster.env: dropped {AUTOREGISTER_KEY}={group!r}: mesh-agent registers "
                                "this VM itself; istiod's auto-registration would make a second entry")
                install_files["cluster.env"] = drop_env_key(text, entries, AUTOREGISTER_KEY).encode()
                env = [(k, v) for k, v in env if k != AUTOREGISTER_KEY]
                dropped.append(AUTOREGISTER_KEY)
        for key in ("POD_NAMESPACE", "SERVICE_ACCOUNT"):
            if key not in env_map and not env_problems:
                warnings.append(f"cluster.env: {key} is not set")
    env_map = dict(env)

    proxy_config: dict = {}
    probe = None
    text = _text(files, "mesh.yaml", problems)
    if text is not None:
        before = len(problems)
        doc = _load_yaml(text, "mesh.yaml", problems)
        if len(problems) == before:
            proxy_config, probe = check_mesh_config(doc, problems, allow_exec=cfg.allow_exec_probe)

    cert_expiry = None
    text = _text(files, "root-cert.pem", problems)
    if text is not None:
        cert_expiry = check_root_cert(text, now, problems, warnings)

    token = None
    text = _text(files, "istio-token", problems)
    if text is not None:
        token = check_token(text, env_map, now, problems, warnings)

    hosts: list[HostLine] = []
    text = _text(files, "hosts", problems)
    if text is not None:
        hosts, host_problems = scan_hosts(text)
        problems.extend(host_problems)

    def yaml_extra(name: str) -> tuple[bool, Any]:
        """(loaded, document) for an optional YAML file."""
        t = _text(files, name, problems)
        if t is None:
            return False, None
        before = len(problems)
        d = _load_yaml(t, name, problems)
        return len(problems) == before, d

    wg = kube = None
    sidecar = None
    loaded, d = yaml_extra("workloadgroup.yaml")
    if loaded:
        wg = check_workload_group(d, env_map, problems, warnings, allow_exec=cfg.allow_exec_probe)
    loaded, d = yaml_extra("kubeconfig")
    if loaded:
        kube = check_kubeconfig(d, problems, warnings)
    loaded, d = yaml_extra("sidecar.yaml")
    if loaded:
        sidecar = check_sidecar(d, problems)

    if problems:
        raise BundleError(problems)
    assert token is not None and cert_expiry is not None
    return Bundle(
        files=MappingProxyType(install_files),
        env=tuple(env),
        proxy_config=MappingProxyType(proxy_config),
        probe=probe,
        token_expiry=token.expiry,
        token_issued_at=token.issued_at,
        token_subject=token.subject,
        cert_expiry=cert_expiry,
        hosts=tuple(hosts),
        workload_group=MappingProxyType(wg) if wg is not None else None,
        kubeconfig=MappingProxyType(kube) if kube is not None else None,
        sidecar=sidecar,
        digest=bundle_digest(files),
        warnings=tuple(warnings),
        dropped_keys=tuple(dropped),
        extras=tuple(n for n in OPTIONAL_FILES if n in files and n != "hosts"),
    )


def redacted_token(text: str) -> str:
    """The token for display: its claims are not secret, its signature is what makes it usable."""
    parts = text.strip().split(".")
    return f"{parts[0][:8]}...[REDACTED]" if parts and parts[0] else "[REDACTED]"


def summary(bundle: Bundle) -> dict[str, Any]:
    """What `mesh-agent bundle show` prints: everything parsed, no secret."""
    from agent.config import to_dict

    return {
        "version": bundle.version,
        "digest": bundle.digest,
        "files": {n: len(b) for n, b in sorted(bundle.files.items())},
        "env": dict(bundle.env),
        "dropped_keys": list(bundle.dropped_keys),
        "discovery_address": bundle.proxy_config.get("discoveryAddress"),
        "probe": to_dict(bundle.probe) if bundle.probe else None,
        "token": {"subject": bundle.token_subject, "expiry": bundle.token_expiry,
                  "issued_at": bundle.token_issued_at,
                  "value": redacted_token(bundle.files["istio-token"].decode())},
        "cert_expiry": bundle.cert_expiry,
        "hosts": list(bundle.hosts_lines),
        "workload_group": (bundle.workload_group.get("metadata") or {}).get("name")
        if bundle.workload_group else None,
        "kubeconfig": "present (credentials not shown)" if bundle.kubeconfig else None,
        "sidecar": to_dict(bundle.sidecar) if bundle.sidecar else None,
        "warnings": list(bundle.warnings),
    }
