"""What the daemon calls: turn configuration + cluster.env into a running registry (registrar, API
worker, group follower), all reporting through the daemon's `post`.

    plan = make_plan(cfg.registry, cluster_env, machine_id=..., address=..., bundle_kubeconfig=...)
    registry = RegistryService.start(plan, post)
    # in the loop:  registry.registrar.set_health(Health, reason), .set_maintenance(...), .handle(ev, now),
    #               deadline = registry.registrar.tick(now); registry.report()  (Kubernetes Events)
    # on stop:      registry.registrar.shutdown(now, timeout, withdraw=...); loop until .finished;
    #               registry.stop()
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agent import apps
from agent.kube.auth import Credentials
from agent.kube.client import Kube
from agent.kube.follow import Follower
from agent.registry import entry as E
from agent.registry.group import follow_group
from agent.registry.recorder import Recorder
from agent.registry.registrar import Registrar
from agent.registry.states import Settings
from agent.registry.worker import RegistryWorker


class PlanError(ValueError):
    """The registry cannot be set up from this configuration; the message names the key."""


@dataclass(frozen=True)
class Plan:
    settings: Settings
    credentials: Credentials
    timeout: float
    build: Callable[[dict[str, Any]], dict[str, Any]]
    events: bool = True
    deadline: float = 30.0


def credentials(reg: Any, bundle_kubeconfig: str | None, identity_token: str | None = None) -> Credentials:
    """Where the API and its credential come from: agent.yaml's registry settings, else the bundle's
    kubeconfig. `identity_token`: the file the identity refresher keeps the cloud's token in
    (agent.identity.refresh.token_file), which then is the bearer token. Raises PlanError when there is
    no API server to talk to."""
    token_file = identity_token or reg.token_file
    if reg.kubeconfig or reg.server:
        return Credentials(kubeconfig=reg.kubeconfig, server=reg.server, ca_file=reg.ca_file,
                           token_file=token_file)
    if bundle_kubeconfig:
        return Credentials(kubeconfig=bundle_kubeconfig, token_file=token_file)
    raise PlanError("registry.kubeconfig: no API credentials (set registry.kubeconfig or "
                    "registry.server + token_file, or ship a kubeconfig in the bundle)")


def make_plan(reg: Any, cluster_env: Mapping[str, str], *, machine_id: str, address: str,
              bundle_kubeconfig: str | None = None, identity_token: str | None = None,
              several_apps: bool = False) -> Plan:
    """Pure: `reg` is config.RegistryConfig; `address` from address.detect_address().

    `several_apps`: one of several apps on this VM (agent.yaml's `apps:`). Its group may not be the one
    the bundle was made for: cluster.env's workload labels then are not its own, and its group must run
    as the bundle's service account, the one identity the shared sidecar has."""
    namespace = reg.namespace or cluster_env.get("POD_NAMESPACE") or cluster_env.get("ISTIO_NAMESPACE")
    if not namespace:
        raise PlanError("registry.namespace: not set, and cluster.env has no POD_NAMESPACE")
    bundle_group = apps.bundle_group(cluster_env)
    group = reg.group or bundle_group
    if not group:
        raise PlanError("registry.group: not set, and cluster.env has no ISTIO_META_WORKLOAD_NAME")
    creds = credentials(reg, bundle_kubeconfig, identity_token)
    labels_text = cluster_env.get("ISTIO_METAJSON_LABELS") or "{}"
    if several_apps and group != bundle_group:
        labels_text = "{}"
    try:
        workload_labels = json.loads(labels_text)
        if not isinstance(workload_labels, dict):
            raise ValueError
    except ValueError:
        raise PlanError("cluster.env: ISTIO_METAJSON_LABELS is not a JSON object") from None
    try:
        instance = E.instance_id(machine_id)
    except E.EntryError as exc:
        raise PlanError(str(exc)) from None
    network = reg.network if reg.network is not None else (cluster_env.get("ISTIO_META_NETWORK") or None)
    condition = reg.on_unhealthy == "condition"
    inputs = dict(address=address, instance=instance, namespace=namespace, network=network,
                  locality=reg.locality, weight=reg.weight,
                  service_account=None, workload_labels={str(k): str(v) for k, v in workload_labels.items()},
                  extra_labels=dict(reg.labels), condition_mode=condition,
                  sidecar_service_account=(cluster_env.get("SERVICE_ACCOUNT") or None) if several_apps else None)

    def build(group_obj: dict[str, Any]) -> dict[str, Any]:
        return E.build_entry(E.EntryInputs(group=group_obj, **inputs))

    settings = Settings(namespace=namespace, group=group, instance=instance,
                        lease_duration=float(reg.lease.duration), lease_renew=float(reg.lease.renew),
                        resync=float(reg.resync), condition_mode=condition,
                        backoff_initial=float(reg.backoff.initial), backoff_max=float(reg.backoff.max))
    return Plan(settings, creds, float(reg.timeout), build, bool(reg.events), float(reg.request_deadline))


class RegistryService:
    """The registry's running parts. Only `registrar` is touched from the loop; stop() ends threads."""

    def __init__(self, kube: Kube, registrar: Registrar, worker: RegistryWorker,
                 watcher: Follower, recorder: Recorder | None = None) -> None:
        self.kube, self.registrar, self.worker, self.watcher = kube, registrar, worker, watcher
        self.recorder = recorder

    @classmethod
    def start(cls, plan: Plan, post: Callable[[object], None],
              count: Callable[[str], None] = lambda result: None) -> RegistryService:
        """`count(result)` counts the Events' writes (agent.registry.recorder)."""
        try:
            kube = Kube.from_credentials(plan.credentials, plan.timeout, plan.deadline)
        except Exception as exc:  # the client's loaders raise their own types; all mean the same here
            raise PlanError(f"registry: cannot use the API credentials: {exc}") from exc
        worker = RegistryWorker(kube, post)
        registrar = Registrar(plan.settings, plan.build, worker.submit)
        watcher = follow_group(kube, plan.settings.namespace, plan.settings.group, post).start()
        recorder = Recorder(kube, plan.settings.instance, count) if plan.events else None
        return cls(kube, registrar, worker, watcher, recorder)

    def report(self) -> None:
        """Record the registrar's changes as Kubernetes Events (handed to the writer thread)."""
        changes = self.registrar.take_changes()
        if self.recorder is not None:
            self.recorder.record(changes)

    def stop(self) -> None:
        self.report()
        self.watcher.stop()
        self.worker.stop()
        if self.recorder is not None:
            self.recorder.stop()
        self.kube.close()
