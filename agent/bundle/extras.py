"""The bundle's optional files beside the mesh's settings: kubeconfig (the registry credential; no
plugin that runs a command), sidecar.yaml (the sidecar package to install) and SHA256SUMS. Pure;
problems are appended as `file: message`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from agent.config import PackageConfig


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

