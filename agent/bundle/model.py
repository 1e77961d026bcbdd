"""Parse and validate a mesh bundle. Pure: bytes in, a frozen Bundle (or every problem found) out.

A bundle is the set of files `istioctl x workload entry configure` writes (cluster.env, mesh.yaml,
root-cert.pem, istio-token, hosts) plus optional extras (workloadgroup.yaml, kubeconfig, sidecar.yaml,
SHA256SUMS). Nothing here touches the disk or the network, so every rule is unit-tested directly.

Problems are reported as `file:line: message` (line omitted when unknown), all of them at once, so an
operator fixes a bad bundle in one round.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from agent import jwtclaims, safeload
from agent.config import (
    BundleConfig,
    PackageConfig,
)
from agent.health.config import ProbeConfig

REQUIRED_FILES = ("cluster.env", "mesh.yaml", "root-cert.pem", "istio-token")
# istioctl always writes `hosts`, but it is empty when no gateway address was found; accept it missing.
OPTIONAL_FILES = ("hosts", "workloadgroup.yaml", "kubeconfig", "sidecar.yaml", "SHA256SUMS")
KNOWN_FILES = REQUIRED_FILES + OPTIONAL_FILES

AUTOREGISTER_KEY = "ISTIO_META_AUTO_REGISTER_GROUP"
TOKEN_AUDIENCE = "istio-ca"
CERT_WARN_BEFORE = 30 * 86400.0  # a root certificate this close to expiry gets a warning
CLOCK_SKEW = 300.0  # a token issued this far in the future means the VM's clock is wrong


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


# --- cluster.env ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class EnvEntry:
    key: str
    value: str
    line: int  # 1-based line where the entry starts
    span: tuple[int, int]  # character offsets of the whole line(s), newline included


_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# What a shell leaves alone outside quotes; the same set istioctl's quoting leaves unquoted.
_SAFE_UNQUOTED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_@%+=:,./-")
_DOUBLE_QUOTE_UNSAFE = frozenset('$`\\"')


def _scan_value(text: str, pos: int, line: int) -> tuple[str | None, int, int, str | None]:
    """Read one shell word at pos. Returns (value, end, end_line, problem); value None on a problem.

    Accepted: 'single quoted' (literal, may span lines), "double quoted" without $ ` \\ (so nothing
    is expanded; this is how istioctl writes a quote: '"'"'), and unquoted safe characters.
    """
    out: list[str] = []
    n = len(text)
    while pos < n:
        ch = text[pos]
        if ch == "'":
            end = text.find("'", pos + 1)
            if end < 0:
                return None, n, line, "unterminated single quote"
            chunk = text[pos + 1:end]
            out.append(chunk)
            line += chunk.count("\n")
            pos = end + 1
        elif ch == '"':
            end = text.find('"', pos + 1)
            if end < 0:
                return None, n, line, "unterminated double quote"
            chunk = text[pos + 1:end]
            bad = sorted(set(chunk) & _DOUBLE_QUOTE_UNSAFE)
            if bad:
                return None, end + 1, line, (f"{bad[0]!r} inside double quotes would be expanded by a shell; "
                                             "use single quotes")
            out.append(chunk)
            line += chunk.count("\n")
            pos = end + 1
        elif ch in _SAFE_UNQUOTED or ch == "#":  # inside a word, # is literal to a shell
            out.append(ch)
            pos += 1
        elif ch in " \t\n":
            break
        elif ch == "\r":
            return None, pos, line, "carriage return (DOS line ending); save the file with Unix line endings"
        elif ch == "$" or ch == "`":
            return None, pos, line, (f"unquoted {ch!r}: a shell would expand it (command or variable "
                                     "substitution); quote the value with single quotes")
        else:
            return None, pos, line, (f"unquoted {ch!r} is special to a shell; "
                                     "quote the value with single quotes")
    return "".join(out), pos, line, None


def _skip_line(text: str, pos: int) -> int:
    end = text.find("\n", pos)
    return len(text) if end < 0 else end + 1


def scan_cluster_env(text: str, file: str = "cluster.env") -> tuple[list[EnvEntry], list[str]]:
    """Entries in file order, and problems as `file:line: message`. Never raises."""
    entries: list[EnvEntry] = []
    problems: list[str] = []
    first_line: dict[str, int] = {}
    pos, line, n = 0, 1, len(text)
    while pos < n:
        start, start_line = pos, line
        while pos < n and text[pos] in " \t":
            pos += 1
        if pos >= n:
            break
        if text[pos] == "\n":
            pos, line = pos + 1, line + 1
            continue
        if text[pos] == "#":
            pos, line = _skip_line(text, pos), line + 1
            continue
        m = _KEY.match(text, pos)
        if text[pos] == "\r":
            problems.append(f"{file}:{line}: carriage return (DOS line ending); "
                            "save the file with Unix line endings")
            pos, line = _skip_line(text, pos), line + 1
            continue
        if not m or m.end() >= n or text[m.end()] != "=":
            shown = text[pos:_skip_line(text, pos)].rstrip("\r\n")[:60]
            problems.append(f"{file}:{line}: expected KEY='value', got {shown!r}")
            pos, line = _skip_line(text, pos), line + 1
            continue
        key = m.group(0)
        value, pos, line, problem = _scan_value(text, m.end() + 1, line)
        if problem is None:
            # Only blanks, or blanks then a comment, may follow the value.
            while pos < n and text[pos] in " \t":
                pos += 1
            if pos < n and text[pos] == "\r":
                problem = "carriage return (DOS line ending); save the file with Unix line endings"
            elif pos < n and text[pos] not in "\n#":
                problem = ("text after the value (a shell would run it as a command); "
                           "quote the whole value with single quotes")
        if problem is not None:
            problems.append(f"{file}:{line}: {key}: {problem}")
            pos = _skip_line(text, pos)
            line += 1
            continue
        pos = _skip_line(text, pos)
        line += 1
        if key in first_line:
            problems.append(f"{file}:{start_line}: {key}: duplicate key (first on line {first_line[key]})")
            continue
        first_line[key] = start_line
        assert value is not None
        entries.append(EnvEntry(key, value, start_line, (start, pos)))
    return entries, problems


def parse_cluster_env(text: str, file: str = "cluster.env") -> list[tuple[str, str]]:
    """(key, value) pairs in file order; raises BundleError listing every bad line."""
    entries, problems = scan_cluster_env(text, file)
    if problems:
        raise BundleError(problems)
    return [(e.key, e.value) for e in entries]


# istioctl's quoting (Go, ported from a Python shellescape): its "safe" set is written in a raw string
# as `\\w`, so it means a backslash and the letter w, not word characters. Nearly every value ends up
# single-quoted (istioctl's own golden files: CA_ADDR='istiod.istio-system.svc:15012'); only values made
# of these characters alone stay bare.
_ISTIOCTL_SAFE = frozenset("\\w@%+=:,./-")


def quote_value(value: str) -> str:
    """A value quoted as istioctl does: '' when empty, bare only when every character is in its
    (accidentally tiny) safe set, else single-quoted with ' written '"'"'."""
    if not value:
        return "''"
    if all(ch in _ISTIOCTL_SAFE for ch in value):
        return value
    return "'" + value.replace("'", "'\"'\"'") + "'"


def format_cluster_env(pairs: Mapping[str, str] | list[tuple[str, str]], sort: bool = True) -> str:
    """cluster.env text in istioctl's exact format: `KEY=value` lines sorted as whole lines, each value
    quoted as istioctl does, a final newline (istioctl writes just "\\n" for an empty map)."""
    items = list(pairs.items()) if isinstance(pairs, Mapping) else list(pairs)
    lines = [f"{k}={quote_value(v)}" for k, v in items]
    if sort:
        lines.sort()
    return "\n".join(lines) + "\n"


def drop_env_key(text: str, entries: list[EnvEntry], key: str) -> str:
    """text without the line(s) holding key; every other byte kept."""
    for e in entries:
        if e.key == key:
            return text[:e.span[0]] + text[e.span[1]:]
    return text


# --- hosts ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HostLine:
    address: str
    names: tuple[str, ...]

    def __str__(self) -> str:
        return " ".join((self.address, *self.names))


_LABEL = r"[A-Za-z0-9_][A-Za-z0-9_-]{0,62}"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?")


def scan_hosts(text: str, file: str = "hosts") -> tuple[list[HostLine], list[str]]:
    out: list[HostLine] = []
    problems: list[str] = []
    for i, raw in enumerate(text.split("\n"), 1):
        if raw.endswith("\r"):
            problems.append(f"{file}:{i}: carriage return (DOS line ending)")
            continue
        body = raw.split("#", 1)[0].strip()
        if not body:
            continue
        parts = body.split()
        if len(parts) < 2:
            problems.append(f"{file}:{i}: expected '<address> <hostname>', got {body!r}")
            continue
        try:
            ipaddress.ip_address(parts[0])
        except ValueError:
            problems.append(f"{file}:{i}: {parts[0]!r} is not an IPv4 or IPv6 address")
            continue
        bad = [h for h in parts[1:] if not _HOSTNAME.fullmatch(h)]
        if bad:
            problems.append(f"{file}:{i}: {bad[0]!r} is not a valid hostname")
            continue
        out.append(HostLine(parts[0], tuple(parts[1:])))
    return out, problems


# --- YAML helpers ---------------------------------------------------------------------------------

def _load_yaml(text: str, file: str, problems: list[str]) -> Any:
    """Through agent.safeload: size, depth and value caps, no anchors, one line per refusal."""
    try:
        return safeload.load_yaml(text, file)
    except safeload.LoadError as exc:
        problems.append(str(exc))
        return None


def _is_str_map(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())


def _int_in(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


# --- mesh.yaml and the readiness probe ------------------------------------------------------------

def probe_from_istio(p: Any, where: str, problems: list[str]) -> ProbeConfig | None:
    """Istio's ReadinessProbe (camelCase, as in mesh.yaml and the WorkloadGroup) as our ProbeConfig,
    through the health package's converter (the one place that knows the API's defaults)."""
    from agent.health.probe_spec import ProbeSpecError
    from agent.health.probe_spec import probe_from_istio as convert

    try:
        return convert(p, where)
    except ProbeSpecError as exc:
        problems.append(str(exc))
        return None


def check_mesh_config(doc: Any, problems: list[str], file: str = "mesh.yaml", *,
                      allow_exec: bool = False) -> tuple[dict, ProbeConfig | None]:
    """The defaultConfig (ProxyConfig) and its readinessProbe, if any. An exec probe is refused unless
    allow_exec (bundle.allow_exec_probe): a bundle must not make this machine run a command."""
    if not isinstance(doc, dict):
        problems.append(f"{file}: expected a mapping with defaultConfig")
        return {}, None
    pc = doc.get("defaultConfig")
    if not isinstance(pc, dict):
        problems.append(f"{file}: defaultConfig: expected a mapping (a ProxyConfig)")
        return {}, None
    md = pc.get("proxyMetadata")
    if md is not None and not _is_str_map(md):
        problems.append(f"{file}: defaultConfig.proxyMetadata: expected a map of strings")
    da = pc.get("discoveryAddress")
    if da is not None and (not isinstance(da, str) or ":" not in da):
        problems.append(f"{file}: defaultConfig.discoveryAddress: expected host:port, got {da!r}")
    probe = None
    if pc.get("readinessProbe") is not None:
        probe = probe_from_istio(pc["readinessProbe"], f"{file}: defaultConfig.readinessProbe", problems)
        probe = _refuse_exec(probe, f"{file}: defaultConfig.readinessProbe", allow_exec, problems)
    return pc, probe


def _refuse_exec(probe: ProbeConfig | None, where: str, allow_exec: bool,
                 problems: list[str]) -> ProbeConfig | None:
    from agent.health.probe_spec import exec_refusal

    if probe is not None and probe.exec is not None and not allow_exec:
        problems.append(exec_refusal(where))
        return None
    return probe


# --- root-cert.pem --------------------------------------------------------------------------------

_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.S)


def _not_after(cert: Any) -> float:
    after = getattr(cert, "not_valid_after_utc", None)  # cryptography >= 42
    if after is None:
        after = cert.not_valid_after.replace(tzinfo=dt.UTC)
    return after.timestamp()


def _not_before(cert: Any) -> float:
    before = getattr(cert, "not_valid_before_utc", None)
    if before is None:
        before = cert.not_valid_before.replace(tzinfo=dt.UTC)
    return before.timestamp()


def _when(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_root_cert(text: str, now: float, problems: list[str], warnings: list[str],
                    file: str = "root-cert.pem") -> float | None:
    """The earliest expiry among the certificates, or None when unusable."""
    from cryptography import x509

    blocks = list(_PEM_BLOCK.finditer(text))
    if not blocks:
        problems.append(f"{file}: no PEM certificate found")
        return None
    earliest: float | None = None
    for i, m in enumerate(blocks, 1):
        line = text.count("\n", 0, m.start()) + 1
        label = m.group(1)
        if label != "CERTIFICATE":
            what = "a private key; never ship keys in a bundle" if "PRIVATE KEY" in label else label
            problems.append(f"{file}:{line}: block {i} is {what}, not a CERTIFICATE")
            continue
        try:
            cert = x509.load_pem_x509_certificate(m.group(0).encode("ascii"))
        except (ValueError, UnicodeEncodeError) as exc:
            problems.append(f"{file}:{line}: certificate {i} cannot be read: {exc}")
            continue
        subject = cert.subject.rfc4514_string() or "(empty subject)"
        after, before = _not_after(cert), _not_before(cert)
        if after <= now:
            problems.append(f"{file}:{line}: certificate {i} ({subject}) expired at {_when(after)}")
            continue
        if after - now < CERT_WARN_BEFORE:
            warnings.append(f"{file}: certificate {i} ({subject}) expires soon, at {_when(after)}")
        if before > now + CLOCK_SKEW:
            warnings.append(f"{file}: certificate {i} ({subject}) is not valid before {_when(before)}; "
                            "is this machine's clock right?")
        earliest = after if earliest is None else min(earliest, after)
    rest = _PEM_BLOCK.sub("", text).strip()
    if rest:
        problems.append(f"{file}: text outside PEM blocks")
    return earliest


# --- istio-token ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenInfo:
    expiry: float | None
    issued_at: float | None
    subject: str
    audiences: tuple[str, ...]


def check_token(text: str, env: Mapping[str, str], now: float, problems: list[str],
                warnings: list[str], file: str = "istio-token") -> TokenInfo | None:
    """Decode the JWT's claims (agent.jwtclaims) and check them against cluster.env. The signature is the
    API server's to check (istiod sends the token to it in a TokenReview); a forged token gets no
    certificate."""
    try:
        tok = jwtclaims.read(text)
    except jwtclaims.TokenError as exc:
        problems.append(f"{file}: {exc}")
        return None
    claims = tok.claims
    before = len(problems)
    exp, iat, nbf = tok.expiry, tok.issued_at, tok.not_before
    if exp is not None and exp <= now:
        problems.append(f"{file}: the token expired at {_when(exp)}; make a new bundle")
    if exp is None:
        warnings.append(f"{file}: the token has no expiry (exp); "
                        "the bundle is refreshed every bundle.refresh_interval")
    for key, v in (("iat", iat), ("nbf", nbf)):
        if v is not None and v > now + CLOCK_SKEW:
            warnings.append(f"{file}: claim {key} is {_when(v)}, in the future; "
                            "is this machine's clock right?")
    audiences = tok.audiences
    if TOKEN_AUDIENCE not in audiences:
        problems.append(f"{file}: audience must include {TOKEN_AUDIENCE!r}, got {list(audiences)}; "
                        "make the token with `--audience istio-ca` (istioctl does)")
    sub = claims.get("sub")
    prefix = "system:serviceaccount:"
    if not isinstance(sub, str) or not sub.startswith(prefix) or sub.count(":") != 3:
        problems.append(f"{file}: subject must be system:serviceaccount:<namespace>:<name>, got {sub!r}")
        sub = ""
    else:
        ns, sa = sub[len(prefix):].split(":")
        want_ns, want_sa = env.get("POD_NAMESPACE"), env.get("SERVICE_ACCOUNT")
        if want_ns is not None and ns != want_ns:
            problems.append(f"{file}: token is for namespace {ns!r} but cluster.env POD_NAMESPACE "
                            f"is {want_ns!r}")
        if want_sa is not None and sa != want_sa:
            problems.append(f"{file}: token is for service account {sa!r} but cluster.env SERVICE_ACCOUNT "
                            f"is {want_sa!r}")
    if len(problems) != before:
        return None
    return TokenInfo(exp, iat, sub, audiences)


# --- extras ---------------------------------------------------------------------------------------

_WG_VERSIONS = ("networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def check_workload_group(doc: Any, env: Mapping[str, str], problems: list[str], warnings: list[str],
                         file: str = "workloadgroup.yaml", *, allow_exec: bool = False) -> dict | None:
    """A structural check of the WorkloadGroup (the shape the CRD schema requires), and its consistency
    with cluster.env. The API server does the full schema validation when the group is applied."""
    before = len(problems)
    if not isinstance(doc, dict):
        problems.append(f"{file}: expected a WorkloadGroup object")
        return None
    if doc.get("apiVersion") not in _WG_VERSIONS:
        problems.append(f"{file}: apiVersion must be one of {', '.join(_WG_VERSIONS)}, "
                        f"got {doc.get('apiVersion')!r}")
    if doc.get("kind") != "WorkloadGroup":
        problems.append(f"{file}: kind must be WorkloadGroup, got {doc.get('kind')!r}")
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    if not isinstance(name, str) or not _DNS_SUBDOMAIN.fullmatch(name):
        problems.append(f"{file}: metadata.name must be a DNS subdomain name, got {name!r}")
    ns = meta.get("namespace") if isinstance(meta, dict) else None
    if ns is not None and (not isinstance(ns, str) or not _DNS_LABEL.fullmatch(ns)):
        problems.append(f"{file}: metadata.namespace must be a DNS label, got {ns!r}")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        problems.append(f"{file}: spec: expected a mapping")
        return None
    for k in spec:
        if k not in ("metadata", "template", "probe"):
            problems.append(f"{file}: spec.{k}: unknown field")
    md = spec.get("metadata")
    if md is not None:
        if not isinstance(md, dict):
            problems.append(f"{file}: spec.metadata: expected a mapping")
        else:
            for k in ("labels", "annotations"):
                if md.get(k) is not None and not _is_str_map(md[k]):
                    problems.append(f"{file}: spec.metadata.{k}: expected a map of strings")
    tpl = spec.get("template")
    if not isinstance(tpl, dict):
        problems.append(f"{file}: spec.template: expected a mapping (a WorkloadEntry without address)")
    else:
        allowed = {"address", "ports", "labels", "network", "locality", "weight", "serviceAccount"}
        for k in tpl:
            if k not in allowed:
                problems.append(f"{file}: spec.template.{k}: unknown field")
        if tpl.get("address"):
            problems.append(f"{file}: spec.template.address: must be empty in a WorkloadGroup")
        ports = tpl.get("ports")
        if ports is not None:
            if not isinstance(ports, dict):
                problems.append(f"{file}: spec.template.ports: expected a map of name to port")
            else:
                for pname, pv in ports.items():
                    if not _int_in(pv, 1, 65535):
                        problems.append(f"{file}: spec.template.ports.{pname}: expected 1..65535, got {pv!r}")
        if tpl.get("labels") is not None and not _is_str_map(tpl["labels"]):
            problems.append(f"{file}: spec.template.labels: expected a map of strings")
        for k in ("network", "locality", "serviceAccount"):
            if tpl.get(k) is not None and not isinstance(tpl[k], str):
                problems.append(f"{file}: spec.template.{k}: expected a string")
        if tpl.get("weight") is not None and not _int_in(tpl["weight"], 0, 4294967295):
            problems.append(f"{file}: spec.template.weight: expected 0..4294967295")
        sa, want_sa = tpl.get("serviceAccount"), env.get("SERVICE_ACCOUNT")
        if isinstance(sa, str) and want_sa is not None and sa != want_sa:
            problems.append(f"{file}: spec.template.serviceAccount {sa!r} differs from cluster.env "
                            f"SERVICE_ACCOUNT {want_sa!r}")
    if spec.get("probe") is not None:
        _refuse_exec(probe_from_istio(spec["probe"], f"{file}: spec.probe", problems), f"{file}: spec.probe",
                     allow_exec, problems)
    if isinstance(ns, str) and env.get("POD_NAMESPACE") not in (None, ns):
        problems.append(f"{file}: metadata.namespace {ns!r} differs from cluster.env POD_NAMESPACE "
                        f"{env.get('POD_NAMESPACE')!r}")
    wname = env.get("ISTIO_META_WORKLOAD_NAME")
    if isinstance(name, str) and wname is not None and name != wname:
        warnings.append(f"{file}: metadata.name {name!r} differs from cluster.env ISTIO_META_WORKLOAD_NAME "
                        f"{wname!r}")
    return doc if len(problems) == before else None


def check_kubeconfig(doc: Any, problems: list[str], warnings: list[str],
                     file: str = "kubeconfig") -> dict | None:
    """The registry credential. Refuses exec and auth-provider plugins: a bundle must never make this
    machine run a command."""
    before = len(problems)
    if not isinstance(doc, dict) or doc.get("kind", "Config") != "Config":
        problems.append(f"{file}: expected a kubeconfig (kind: Config)")
        return None
    sections: dict[str, dict[str, Any]] = {}
    for sect, inner in (("clusters", "cluster"), ("users", "user"), ("contexts", "context")):
        items = doc.get(sect)
        if not isinstance(items, list) or not items:
            problems.append(f"{file}: {sect}: expected a non-empty list")
            continue
        named: dict[str, Any] = {}
        for i, it in enumerate(items):
            if not isinstance(it, dict) or not isinstance(it.get("name"), str) or \
                    not isinstance(it.get(inner), dict):
                problems.append(f"{file}: {sect}[{i}]: expected {{name, {inner}}}")
                continue
            named[it["name"]] = it[inner]
        sections[sect] = named
    for uname, user in sections.get("users", {}).items():
        for plugin in ("exec", "auth-provider"):
            if plugin in user:
                problems.append(f"{file}: users.{uname}.{plugin}: credential plugins are refused (they run "
                                "commands); use a token")
        for k in ("tokenFile", "client-certificate", "client-key"):
            if k in user:
                warnings.append(f"{file}: users.{uname}.{k} refers to a file on this machine; "
                                "prefer inline data")
    for cname, cl in sections.get("clusters", {}).items():
        if not isinstance(cl.get("server"), str) or not cl["server"].startswith("https://"):
            problems.append(f"{file}: clusters.{cname}.server: expected an https:// URL")
        if cl.get("insecure-skip-tls-verify"):
            problems.append(f"{file}: clusters.{cname}: insecure-skip-tls-verify is refused")
    cur = doc.get("current-context")
    contexts = sections.get("contexts", {})
    if contexts and (not isinstance(cur, str) or cur not in contexts):
        problems.append(f"{file}: current-context {cur!r} is not one of the contexts")
    for ctx_name, ctx in contexts.items():
        for ref, sect in (("cluster", "clusters"), ("user", "users")):
            name = ctx.get(ref)
            if not isinstance(name, str) or name not in sections.get(sect, {}):
                problems.append(f"{file}: contexts.{ctx_name}.{ref} names no {ref}")
    return doc if len(problems) == before else None


def check_sidecar(doc: Any, problems: list[str], file: str = "sidecar.yaml") -> PackageConfig | None:
    """The sidecar package the bundle asks for: url, version, sha256 (all three)."""
    before = len(problems)
    if not isinstance(doc, dict):
        problems.append(f"{file}: expected a mapping with url, version, sha256")
        return None
    for k in doc:
        if k not in ("url", "version", "sha256"):
            problems.append(f"{file}: {k}: unknown key (expected url, version, sha256)")
    for k in ("url", "version", "sha256"):
        v = doc.get(k)
        if v is None or v == "":
            problems.append(f"{file}: {k}: required")
        elif not isinstance(v, str):
            problems.append(f"{file}: {k}: expected a string, got {v!r}; put it in quotes")
    url, sha = doc.get("url"), doc.get("sha256")
    if isinstance(url, str) and url.startswith("http://"):
        problems.append(f"{file}: url: http:// is refused; use https://")
    if isinstance(sha, str) and not re.fullmatch(r"[0-9a-fA-F]{64}", sha):
        problems.append(f"{file}: sha256: expected 64 hex digits")
    if len(problems) != before or not isinstance(sha, str):
        return None
    return PackageConfig(url=url, version=doc["version"], sha256=sha.lower())


def check_sums(text: str, files: Mapping[str, bytes], problems: list[str], file: str = "SHA256SUMS") -> None:
    """`sha256sum` output: every listed file present and matching, no file unlisted."""
    listed: dict[str, int] = {}
    for i, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        m = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](.+)", raw)
        if not m:
            problems.append(f"{file}:{i}: expected '<sha256>  <file>'")
            continue
        digest, name = m.group(1).lower(), m.group(2)
        name = name[2:] if name.startswith("./") else name
        if name in listed:
            problems.append(f"{file}:{i}: {name} listed twice")
            continue
        listed[name] = i
        if name not in files:
            problems.append(f"{file}:{i}: {name} is listed but not in the bundle")
        elif hashlib.sha256(files[name]).hexdigest() != digest:
            problems.append(f"{file}:{i}: {name}: checksum mismatch")
    for name in sorted(files):
        if name != file and name not in listed:
            problems.append(f"{file}: {name} is in the bundle but not listed")


# --- the whole bundle -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Bundle:
    """A validated bundle. `files` holds the bytes to install (cluster.env without the auto-registration
    key when it was dropped); `probe` is the mesh.yaml readinessProbe as agent.health.config.ProbeConfig."""
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
