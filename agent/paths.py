"""Where things live on the VM, all under one root prefix (`/` in production, a temp dir in tests)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path = Path("/")
    state_dir: str = "/var/lib/mesh-agent"
    run_dir: str = "/run/mesh-agent"

    def under(self, path: str) -> Path:
        """An absolute VM path moved under the root prefix."""
        return self.root / path.lstrip("/")

    # Istio's layout (what the sidecar package and pilot-agent expect).
    @property
    def cluster_env(self) -> Path:
        return self.under("/var/lib/istio/envoy/cluster.env")

    @property
    def sidecar_env(self) -> Path:
        return self.under("/var/lib/istio/envoy/sidecar.env")

    @property
    def mesh_config(self) -> Path:
        return self.under("/etc/istio/config/mesh")

    @property
    def root_cert(self) -> Path:
        return self.under("/etc/certs/root-cert.pem")

    @property
    def certs_dir(self) -> Path:
        return self.under("/etc/certs")

    @property
    def istio_token(self) -> Path:
        return self.under("/var/run/secrets/tokens/istio-token")

    @property
    def etc_hosts(self) -> Path:
        return self.under("/etc/hosts")

    @property
    def istio_log_dir(self) -> Path:
        return self.under("/var/log/istio")

    # The agent's own directories.
    @property
    def state(self) -> Path:
        return self.under(self.state_dir)

    @property
    def run(self) -> Path:
        return self.under(self.run_dir)

    @property
    def status_file(self) -> Path:
        return self.run / "status.json"

    @property
    def last_good_bundle(self) -> Path:
        return self.state / "bundle"

    @property
    def sidecar_pidfile(self) -> Path:
        return self.run / "sidecar.pid"

    @property
    def control_file(self) -> Path:
        """Admin requests (maintenance) that survive restarts: see `mesh-agent deregister`."""
        return self.state / "maintenance"

    def app_control_file(self, app: str | None) -> Path:
        """Maintenance of one app of several (`mesh-agent deregister --app NAME`); None: the whole VM."""
        return self.control_file if app is None else self.state / f"maintenance.{app}"

    @property
    def machine_id(self) -> Path:
        return self.under("/etc/machine-id")

    @classmethod
    def from_config(cls, cfg: object) -> Layout:
        return cls(Path(getattr(cfg, "root", "/")), getattr(cfg, "state_dir", "/var/lib/mesh-agent"),
                   getattr(cfg, "run_dir", "/run/mesh-agent"))
