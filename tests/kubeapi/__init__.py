"""A strict Kubernetes API server emulator for tests and the local demo (see docs/kubeapi-emulator.md)."""

from tests.kubeapi.auth import ADMIN, Identity, Rule, rules
from tests.kubeapi.server import KubeAPI, RequestRecord

__all__ = ["ADMIN", "Identity", "KubeAPI", "RequestRecord", "Rule", "rules"]
