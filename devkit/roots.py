"""Install roots for tests and the benchmark: a root prefix with an /etc/hosts of its own, the installed
files, and a hash of a whole tree."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from agent.paths import Layout

ORIGINAL_HOSTS = (b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n"
                  b"# an admin's comment, kept byte for byte \xe9\n10.1.2.3 db.internal   db\n")


def make_root(tmp: Path) -> Layout:
    root = tmp / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/hosts").write_bytes(ORIGINAL_HOSTS)
    return Layout(root=root)


def tree_hash(root: Path) -> str:
    """Names, types, modes, link targets and contents of everything under root."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            h.update(f"{os.path.relpath(p, root)}\0{st.st_mode:o}\0".encode())
            if os.path.islink(p):
                h.update(os.readlink(p).encode())
            else:
                h.update(Path(p).read_bytes())
        for d in dirnames:
            h.update(f"{os.path.relpath(os.path.join(dirpath, d), root)}/\0".encode())
    return h.hexdigest()


def live_files(layout: Layout) -> dict[str, bytes | None]:
    def read(p: Path) -> bytes | None:
        return p.read_bytes() if p.exists() else None

    return {"cluster.env": read(layout.cluster_env), "mesh.yaml": read(layout.mesh_config),
            "root-cert.pem": read(layout.root_cert), "istio-token": read(layout.istio_token),
            "etc/hosts": read(layout.etc_hosts)}
