"""The agent's Kubernetes API layer, driven over stdin/stdout from a test, under another Python.

Run as `python -m tests.clientchild` (PYTHONPATH: the repository) with the interpreter whose
`kubernetes` client generation is under test. Each line in is a JSON request {"op": ..., ...}; each
line out is {"ok": result} or {"error": {"type", "status", "message"}}. Only the standard library,
the agent and the client are imported here, so Debian's own python3 with its python3-kubernetes
can run it.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import traceback
from typing import Any

import kubernetes

from agent.kube import apply as KP
from agent.kube import auth as KA
from agent.kube import client as KC
from agent.registry import entry as E
from agent.registry.converge import Spec, Want, converge, renew

RESOURCES = {"ENTRIES": KC.ENTRIES, "GROUPS": KC.GROUPS, "LEASES": KC.LEASES, "EVENTS": KC.EVENTS}


class Child:
    def __init__(self) -> None:
        self.kube: KC.Kube | None = None
        self.events: Any = None

    def op_open(self, creds: dict[str, Any] | None = None, in_cluster: dict[str, Any] | None = None,
                timeout: float = 5.0, deadline: float = KC.DEADLINE) -> dict[str, Any]:
        """A Kube from Credentials fields, or from the in-cluster environment under a given root."""
        if self.kube is not None:
            self.kube.close()
        if in_cluster is not None:
            c = KA.in_cluster_credentials(env=in_cluster["env"], sa_dir=in_cluster["sa_dir"])
            if c is None:
                raise RuntimeError("no in-cluster credentials found")
        else:
            c = KA.Credentials(**(creds or {}))
        self.kube = KC.Kube.from_credentials(c, timeout=timeout, deadline=deadline)
        return {"version": kubernetes.__version__, "apply_style": KP.apply_style()}

    def op_kube(self, method: str, args: list[Any], kwargs: dict[str, Any] | None = None) -> Any:
        """One Kube method; a resource is named ENTRIES, GROUPS or LEASES."""
        assert self.kube is not None
        args = [RESOURCES.get(a, a) if isinstance(a, str) else a for a in args]
        out = getattr(self.kube, method)(*args, **(kwargs or {}))
        if method == "watch":
            return [[kind, obj] for kind, obj in out]
        return out

    def _spec(self, namespace: str, group: str, instance: str, address: str,
              condition_mode: bool) -> Spec:
        assert self.kube is not None
        group_obj = self.kube.get(KC.GROUPS, namespace, group)
        entry = E.build_entry(E.EntryInputs(group=group_obj, address=address, instance=instance,
                                            condition_mode=condition_mode))
        return Spec(entry=entry, instance=instance, lease_duration=30, condition_mode=condition_mode)

    def op_converge(self, want: str, namespace: str, group: str, instance: str, address: str,
                    condition_mode: bool = False) -> dict[str, Any]:
        """The registrar's converge step, as its worker runs it."""
        assert self.kube is not None
        out = converge(self.kube, Want[want], self._spec(namespace, group, instance, address, condition_mode))
        return {"present": out.present, "healthy": out.healthy, "wrote": list(out.wrote),
                "conflict_holder": out.conflict_holder, "lease": out.lease}

    def op_renew(self, namespace: str, group: str, instance: str, address: str) -> dict[str, Any]:
        """The registrar's lease renewal, with the lease as the server has it now."""
        assert self.kube is not None
        spec = self._spec(namespace, group, instance, address, False)
        lease = self.kube.get(KC.LEASES, namespace, spec.entry["metadata"]["name"])
        out = renew(self.kube, lease, spec)
        return {"lost_lease": out.lost_lease, "wrote": list(out.wrote), "lease": out.lease}

    def op_renew_lease_from(self, lease: dict[str, Any], namespace: str, group: str, instance: str,
                            address: str) -> dict[str, Any]:
        """A renewal from a lease the caller kept (possibly stale)."""
        assert self.kube is not None
        out = renew(self.kube, lease, self._spec(namespace, group, instance, address, False))
        return {"lost_lease": out.lost_lease, "wrote": list(out.wrote), "lease": out.lease}

    def op_event(self, regarding: dict[str, str], reason: str, note: str, at: str, instance: str = "vm-1",
                 action: str = "Withdraw", type: str = "Warning") -> dict[str, Any]:
        """One notice through the registry's aggregator and the writer's send (create or series patch)."""
        from agent.registry import events as EV
        from agent.registry.recorder import send

        assert self.kube is not None
        if self.events is None:
            self.events = EV.Aggregator(instance)
        ref = EV.Ref(regarding["kind"], regarding["namespace"], regarding["name"], regarding.get("uid"))
        write = self.events.record(EV.Notice(ref, reason, action, note, type), E.parse_time(at))
        if write is None:
            return {"result": "filtered"}
        return {"result": send(self.kube, write), "name": write.name, "op": write.op}

    def op_renew_own_token(self, token_file: str) -> float:
        from agent.registry.credentials import renew_own_token

        assert self.kube is not None
        return renew_own_token(self.kube, token_file).expiry

    def op_core(self, method: str, args: list[Any]) -> Any:
        """A call of the cluster bundle source's core/v1 layer (watch_configmap: its events)."""
        from agent.kube.core import CoreCalls

        assert self.kube is not None
        out = getattr(CoreCalls(self.kube), method)(*args)
        if method == "watch_configmap":
            return [[kind, obj] for kind, obj in out]
        return out

    def op_access_checks(self, settings: dict[str, Any], service_account: str) -> list[list[Any]]:
        """The cluster source's SelfSubjectAccessReviews."""
        from agent.bundle.cluster_inputs import Settings
        from agent.bundle.cluster_source import access_checks

        assert self.kube is not None
        return [[c.what, c.allowed] for c in access_checks(self.kube, Settings(**settings), service_account)]

    def op_doctor(self, namespace: str) -> list[list[str]]:
        """`mesh-agent doctor`'s RBAC check (SelfSubjectAccessReview for every rule)."""
        from agent.doctor.check import Context
        from agent.doctor.remote import check_rbac

        assert self.kube is not None
        ctx = Context(path="-", kube=self.kube, namespace=namespace)
        return [[c.result, c.message] for c in check_rbac(ctx, 5.0)]

    def op_fetch(self, settings: dict[str, Any]) -> dict[str, Any]:
        """The `kubernetes` bundle source's fetch: the bundle's files built from the cluster."""
        from agent.bundle.cluster_inputs import Settings
        from agent.bundle.cluster_source import ClusterSource

        assert self.kube is not None
        got = ClusterSource(self.kube, Settings(**settings)).fetch()
        return {"files": {k: v.decode() for k, v in got.files.items()}, "token_expiry": got.token_expiry,
                "root_cert_version": got.root_cert_version}

    def op_reap(self, namespace: str, grace: float) -> dict[str, Any]:
        """`mesh-agent reap`'s pass over a namespace."""
        from agent.registry.reaper import reap

        assert self.kube is not None
        said: list[str] = []
        deleted, skipped = reap(self.kube, namespace, grace, say=said.append)
        return {"deleted": deleted, "skipped": skipped, "said": said}

    def op_close(self) -> None:
        if self.kube is not None:
            self.kube.close()
            self.kube = None


def _default(o: Any) -> Any:
    if isinstance(o, (dt.datetime, dt.date)):
        return o.isoformat()
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def main() -> None:
    child = Child()
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        op = req.pop("op")
        try:
            answer: dict[str, Any] = {"ok": getattr(child, f"op_{op}")(**req)}
        except Exception as exc:  # reported to the test, which decides what was expected
            answer = {"error": {"type": type(exc).__name__, "status": getattr(exc, "status", None),
                                "message": str(exc), "trace": traceback.format_exc(limit=8)}}
        sys.stdout.write(json.dumps(answer, default=_default) + "\n")
        sys.stdout.flush()
    child.op_close()


if __name__ == "__main__":
    main()
