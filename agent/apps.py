"""The apps this VM runs in the mesh: one (agent.yaml's `app:` and `registry.group`) or several
(`apps:`). Each gets its own health part and registry part; they share the one sidecar.

Pure: what each app's parts are configured with, from the whole configuration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from agent.config import Config, RegistryConfig
from agent.health.config import AppConfig

SINGLE = "app"  # the name of the one app of an `app:` configuration (status, metrics, Events)


@dataclass(frozen=True)
class App:
    name: str
    health: AppConfig
    group: str | None  # None: cluster.env's ISTIO_META_WORKLOAD_NAME (one app only)
    labels: Mapping[str, str]
    several: bool  # one of several apps sharing the VM's sidecar


def apps(cfg: Config) -> tuple[App, ...]:
    if cfg.apps:
        return tuple(App(a.name, a, a.group_name, dict(a.labels), True) for a in cfg.apps)
    return (App(SINGLE, cfg.app, cfg.registry.group, {}, False),)


def find(cfg: Config, name: str) -> App | None:
    return next((a for a in apps(cfg) if a.name == name), None)


def registry_config(cfg: Config, app: App) -> RegistryConfig:
    """The registry settings this app's entry is made with: the VM's, with its group and labels."""
    if not app.several:
        return cfg.registry
    return dataclasses.replace(cfg.registry, group=app.group, labels={**cfg.registry.labels, **app.labels})


def owns_bundle_group(app: App, bundle_group: str | None) -> bool:
    """Whether the bundle was made for this app's WorkloadGroup: then its workloadgroup.yaml, mesh.yaml
    readinessProbe and cluster.env's ISTIO_INBOUND_PORTS describe this app."""
    return not app.several or (bundle_group is not None and app.group == bundle_group)


def bundle_group(cluster_env: Mapping[str, str]) -> str | None:
    """The WorkloadGroup the bundle was made for, as istioctl names it in cluster.env."""
    return cluster_env.get("ISTIO_META_WORKLOAD_NAME") or (cluster_env.get("ISTIO_SERVICE") or "").split(".")[0] \
        or None
