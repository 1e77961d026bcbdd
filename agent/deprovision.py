"""`mesh-agent deprovision`: clear this instance's state before an image is captured.

What goes: the last good bundle and every stored copy of a bundle (each holds a copy of the istio
token), the installed istio token and the workload certificate and key issued to this instance, the
cloud identity token it kept, the managed block in /etc/hosts, the status and pid files, and a
pending maintenance request. What stays: the configuration (so clones
start with it) and the mesh-wide files (root certificate, mesh config, cluster.env), which the next
agent re-installs anyway; with --all those go too: every file in the agent's manifest of what it
wrote (agent.manifest), as on `apt purge`, except files changed since the agent wrote them and files
a package owns.
With --machine-id, /etc/machine-id is emptied too, so systemd gives each clone its own id at first
boot (the agent names its instance after it).

Run it with the service stopped: a running agent would put everything back.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from agent import manifest, proc
from agent.bundle import store
from agent.bundle.hosts import DamagedBlock, strip_block
from agent.paths import Layout

EX_FAILED = 1
UNIT = "mesh-agent.service"


@dataclass(frozen=True)
class Step:
    path: Path
    what: str


def instance_files(layout: Layout) -> list[Step]:
    """The per-instance files and directories deprovision removes (the hosts block aside)."""
    return [
        Step(layout.last_good_bundle, "last good bundle"),
        # The link above points into the stored copies, which hold the istio token's persistent copy.
        Step(store.pending_link(layout), "bundle install in progress"),
        Step(store.bundles_dir(layout), "stored bundles"),
        Step(layout.istio_token, "istio token"),
        Step(layout.certs_dir / "key.pem", "workload key"),
        Step(layout.certs_dir / "cert-chain.pem", "workload certificate"),
        Step(layout.status_file, "status"),
        Step(layout.sidecar_pidfile, "sidecar pid file"),
        Step(layout.run / "identity-token", "identity token"),
        Step(layout.control_file, "maintenance request"),
    ]


def deprovision(layout: Layout, *, machine_id: bool = False, everything: bool = False,
                owned: manifest.Owned | None = None) -> list[str]:
    """Remove this instance's state under `layout`; one line per thing removed (or left, and why).

    everything (--all): also every file and directory the agent recorded in its manifest
    (agent.manifest): the mesh-wide files and the directories it created, as `apt purge` does.
    owned(path) says whether a Debian package owns a VM path (default: dpkg-query -S).
    Raises DamagedBlock (before anything is removed) when /etc/hosts has a malformed block.
    """
    hosts = layout.etc_hosts
    # The installer's rule (agent.bundle.hosts.split_block): the lines around the block stay byte for byte.
    stripped, has_block = strip_block(hosts.read_bytes()) if hosts.exists() else (b"", False)

    done: list[str] = []
    written = manifest.load(layout) if everything else None
    if written is not None:
        owned = owned or (lambda vm: manifest.owned_by_package(layout, vm))
        removed, left = manifest.remove_files(layout, written, owned)
        done += removed + left
    for step in instance_files(layout):
        if step.path.is_dir() and not step.path.is_symlink():
            shutil.rmtree(step.path)
        elif os.path.lexists(step.path):
            step.path.unlink()
        else:
            continue
        done.append(f"removed {step.what}: {step.path}")
    if has_block:
        _rewrite_in_place(hosts, stripped.decode("latin-1"))  # latin-1: lossless for any bytes
        done.append(f"removed the managed block from {hosts}")
    if written is not None and owned is not None:
        written.hosts = None
        done += manifest.remove_dirs(layout, written, owned)
        manifest.save(layout, written)  # what was left stays recorded
    if machine_id and layout.machine_id.exists() and layout.machine_id.stat().st_size:
        _rewrite_in_place(layout.machine_id, "")
        done.append(f"emptied {layout.machine_id} (a new id is made at first boot)")
    return done


def _rewrite_in_place(path: Path, text: str) -> None:
    """Rewrite keeping the inode: /etc/hosts may be a bind mount (rename over it fails: EBUSY),
    and its owner and mode stay as they are."""
    with open(path, "r+", encoding="latin-1", newline="") as f:
        f.write(text)
        f.truncate()
        f.flush()
        os.fsync(f.fileno())


def _agent_running() -> bool:
    if shutil.which("systemctl") is None:
        return False
    return proc.run(["systemctl", "is-active", "--quiet", UNIT], timeout=10).ok


def add_arguments(p: argparse.ArgumentParser, _verb: str) -> None:
    p.add_argument("--machine-id", action="store_true",
                   help="also empty /etc/machine-id, so each clone gets its own at first boot")
    p.add_argument("--all", action="store_true", dest="everything",
                   help="also remove every file the agent wrote outside its own directories (root "
                        "certificate, mesh config, cluster.env) and the directories it created, as "
                        "`apt purge` does; files changed since the agent wrote them are left")
    p.add_argument("--root", default="/", help="act on a tree under this directory (an image being "
                   "built, or tests); default: /")
    p.add_argument("--force", action="store_true", help="run even though the service is active")


def main(args: argparse.Namespace) -> int:
    layout = Layout(root=Path(args.root))
    if args.root == "/" and not args.force and _agent_running():
        print(f"mesh-agent deprovision: {UNIT} is running and would restore what this removes; "
              f"run `systemctl stop {UNIT}` first", file=sys.stderr)
        return EX_FAILED
    try:
        done = deprovision(layout, machine_id=args.machine_id, everything=getattr(args, "everything", False))
    except DamagedBlock as exc:
        print(f"mesh-agent deprovision: {layout.etc_hosts}: {exc}; nothing was removed. Fix the "
              f"file by hand and run again.", file=sys.stderr)
        return EX_FAILED
    except OSError as exc:
        print(f"mesh-agent deprovision: {exc}", file=sys.stderr)
        return EX_FAILED
    for line in done:
        print(line)
    print("nothing to remove" if not done else "the configuration is kept")
    return 0
