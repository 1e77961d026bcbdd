"""A strict Kubernetes API server emulator for tests, benchmarks and the demo (see docs/kubeapi-emulator.md)."""

from devkit.kubeapi.auth import ADMIN, Identity, Rule, rules
from devkit.kubeapi.server import KubeAPI, RequestRecord

__all__ = ["ADMIN", "Identity", "KubeAPI", "RequestRecord", "Rule", "rules"]
