"""`mesh-agent bundle fetch|verify|show|install`: work with a mesh bundle by hand.

Exit codes: 0 fine, 1 the bundle could not be fetched, is invalid or could not be installed,
2 usage, 78 bad configuration file.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent import config as config_mod
from agent import fsutil
from agent.bundle import clusterenv, model, source
from agent.bundle.install import InstallError
from agent.bundle.model import BundleError, parse_bundle
from agent.bundle.source import Fetched, FetchError
from agent.bundle.store import last_good
from agent.config import BundleConfig
from agent.paths import Layout
from agent.redact import register_secret

EX_FAIL = 1
EX_USAGE = 2


def add_arguments(p: argparse.ArgumentParser, _verb: str) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    def common(sp: argparse.ArgumentParser, kinds: str = "https:// URL, file:// URL or path of a .tar.gz, "
               "or a directory") -> None:
        sp.add_argument("source", nargs="?", metavar="SOURCE",
                        help=f"{kinds} (default: bundle.source of the --config file)")
        sp.add_argument("--config", help="agent.yaml whose bundle section (source, CA, token, timeouts, "
                                          "limits) is used; read only when given")

    f = sub.add_parser("fetch", help="fetch and validate a bundle, optionally save it",
                       description="Fetch a bundle from its source, validate it and print what it holds.")
    common(f)
    f.add_argument("--output", "-o", metavar="DIR", help="also save the validated files in DIR")
    f.add_argument("--json", action="store_true", help="print JSON")

    v = sub.add_parser("verify", help="validate a local bundle (directory or .tar.gz), offline",
                       description="Check a bundle without installing it and without the network; "
                                   "print every problem found. Exit 1 when it is invalid.")
    common(v, "path or file:// URL of a .tar.gz, or a directory")

    s = sub.add_parser("show", help="print what a bundle holds (the token redacted)",
                       description="Print a bundle's contents: cluster.env, probe, token subject and "
                                   "expiry, certificate expiry, hosts. With neither SOURCE nor --config: "
                                   "the bundle installed under --root.")
    common(s)
    s.add_argument("--root", help="root prefix of the installed bundle shown without SOURCE and --config "
                                  "(default: /)")
    s.add_argument("--json", action="store_true", help="print JSON")

    i = sub.add_parser("install", help="fetch, validate and install a bundle",
                       description="Fetch, validate and install a bundle atomically into Istio's layout; "
                                   "the previous files are kept if anything fails.")
    common(i)
    i.add_argument("--root", help="install under this root prefix (tests, demos; default: the --config "
                                  "file's root, else /)")
    i.add_argument("--user", help="owner of the installed files (default: sidecar.user, istio-proxy); "
                                  "ownership is only changed when running as root")


def _load(args: argparse.Namespace) -> tuple[BundleConfig, config_mod.Config | None]:
    cfg_file = None
    if args.config:
        cfg_file = config_mod.load(args.config)
        bundle = cfg_file.bundle
        if args.source:
            bundle = dataclasses.replace(bundle, source=args.source)
    elif args.source:
        bundle = BundleConfig(source=args.source)
    else:
        raise _Usage("give a SOURCE, or --config with bundle.source")
    return bundle, cfg_file


class _Usage(Exception):
    pass


class SaveError(Exception):
    """`fetch -o DIR` could not write DIR."""


def main(args: argparse.Namespace) -> int:
    try:
        cfg, full = _load(args)
    except config_mod.ConfigError as exc:
        print(exc, file=sys.stderr)
        return config_mod.EX_CONFIG
    except _Usage as exc:
        if args.action == "show" and not args.config:
            return _show_installed(args)
        print(f"mesh-agent bundle {args.action}: {exc}", file=sys.stderr)
        return EX_USAGE
    try:
        if args.action == "verify":
            return _verify(cfg)
        if args.action == "install":
            return _install(args, cfg, full)
        fetched = source.fetch(cfg)
        assert isinstance(fetched, Fetched)
        bundle = parse_bundle(fetched.files, time.time(), cfg)
        if args.action == "fetch" and args.output:
            _save(Path(args.output), dict(bundle.files))
        _print(model.summary(bundle), fetched.source, args.json)
        return 0
    except (FetchError, BundleError, InstallError, SaveError) as exc:
        _fail(exc)
        return EX_FAIL


def _fail(exc: Exception) -> None:
    lines = str(exc).splitlines() or [type(exc).__name__]
    kind = {FetchError: "cannot fetch the bundle", BundleError: "the bundle is invalid",
            InstallError: "cannot install the bundle", SaveError: "cannot save the bundle"}.get(type(exc), "error")
    print(f"mesh-agent bundle: {kind}:", file=sys.stderr)
    for line in lines:
        print(f"  {line.strip()}", file=sys.stderr)


def _verify(cfg: BundleConfig) -> int:
    scheme = urlsplit(cfg.source).scheme
    if scheme in ("http", "https") or cfg.source.strip() == "kubernetes":
        print(f"mesh-agent bundle verify: {cfg.source} is not local: verify works offline on a directory "
              "or .tar.gz; use `bundle fetch` for a URL", file=sys.stderr)
        return EX_USAGE
    fetched = source.fetch(cfg)
    assert isinstance(fetched, Fetched)
    bundle = parse_bundle(fetched.files, time.time(), cfg)
    print(f"{fetched.source}: ok, bundle {bundle.version}, token expires {_when(bundle.token_expiry)}, "
          f"root certificate expires {_when(bundle.cert_expiry)}")
    for w in bundle.warnings:
        print(f"  warning: {w}")
    return 0


def _install(args: argparse.Namespace, cfg: BundleConfig, full: config_mod.Config | None) -> int:
    from agent.bundle.update import Updated, update

    root = args.root or (full.root if full else "/")
    layout = Layout(Path(root), full.state_dir, full.run_dir) if full else Layout(Path(root))
    user = args.user or (full.sidecar.user if full else "istio-proxy")
    result = update(cfg, layout, user=user)
    if isinstance(result, Updated):
        r = result.result
        print(f"installed bundle {result.bundle.version} from {r.installed.source} under {layout.root}: "
              f"{', '.join(r.changed) or 'no file changed'}")
        if not r.ownership_applied:
            print(f"  note: not running as root, so the files are not owned by {user}")
        for w in result.bundle.warnings:
            print(f"  warning: {w}")
    else:
        print(f"bundle {result.installed.version} is already installed under {layout.root}")
    return 0


def _show_installed(args: argparse.Namespace) -> int:
    layout = Layout(Path(args.root or "/"))
    info = last_good(layout)
    if info is None or info.path is None:
        print(f"no bundle installed under {layout.root}; give a SOURCE", file=sys.stderr)
        return EX_FAIL
    files = {p.name: p.read_bytes() for p in info.path.iterdir() if p.is_file() and p.name != "meta.json"}
    register_secret((files.get("istio-token") or b"").decode("utf-8", "replace"))
    try:
        # Display only: an exec probe was allowed by agent.yaml when this bundle was installed.
        bundle = parse_bundle(files, time.time(), BundleConfig(source=info.source, allow_exec_probe=True))
    except BundleError as exc:
        _fail(exc)
        return EX_FAIL
    out = model.summary(bundle)
    out["installed_at"] = info.installed_at
    out["fetched_at"] = info.fetched_at
    _print(out, info.source, args.json)
    return 0


def _save(out: Path, files: dict[str, bytes]) -> None:
    """Write the files into out through agent.fsutil: a link planted in out is replaced, never written
    through, and every file gets its mode (credentials 0600) whether or not it existed."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        dfd = fsutil.open_dir(out, secure=False)
        try:
            for name, data in files.items():
                mode = 0o600 if name in ("istio-token", "kubeconfig") else 0o644
                fsutil.write_in(dfd, name, data, mode, (os.geteuid(), os.getegid()) if os.geteuid() == 0 else None)
        finally:
            os.close(dfd)
    except OSError as exc:
        raise SaveError(f"{out}: {exc.strerror or exc}") from None


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "never"
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _print(summary: dict[str, Any], where: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"source": where, **summary}, indent=2, sort_keys=True))
        return
    tok = summary["token"]
    print(f"bundle {summary['version']} from {where}")
    print(f"  files:        {', '.join(f'{n} ({s} B)' for n, s in summary['files'].items())}")
    print(f"  token:        {tok['subject']}, expires {_when(tok['expiry'])} ({tok['value']})")
    print(f"  root cert:    expires {_when(summary['cert_expiry'])}")
    print(f"  discovery:    {summary['discovery_address'] or '(default)'}")
    probe = summary["probe"]
    if probe:
        kind = next(k for k in ("http_get", "tcp_socket", "exec", "grpc") if probe[k])
        print(f"  probe:        {kind} {json.dumps(probe[kind], sort_keys=True)} every {probe['period']:g}s")
    else:
        print("  probe:        none in mesh.yaml")
    print(f"  hosts:        {'; '.join(summary['hosts']) or '(none)'}")
    for k in ("workload_group", "kubeconfig"):
        if summary[k]:
            print(f"  {k + ':':<13} {summary[k]}")
    if summary["sidecar"]:
        s = summary["sidecar"]
        print(f"  sidecar:      {s['version']} from {s['url']}")
    print("  cluster.env:")
    for k, v in summary["env"].items():
        print(f"    {k}={clusterenv.quote_value(v)}")
    for k in summary["dropped_keys"]:
        print(f"    (dropped {k})")
    for w in summary["warnings"]:
        print(f"  warning: {w}")
