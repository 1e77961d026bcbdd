"""Object storage with a monotonic resourceVersion and a bounded event history for watches."""

from __future__ import annotations

import copy
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

TypeKey = tuple[str, str]  # (group, plural)
ObjKey = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped


@dataclass(frozen=True)
class Event:
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    key: TypeKey
    obj: dict[str, Any]
    old: dict[str, Any] | None
    # Encoded watch lines by (version, table, event type): every watcher of a write sends the same
    # bytes, so they are made once.
    encoded: dict[tuple[str, bool, str], bytes] = field(default_factory=dict, compare=False)


class Store:
    """Everything under one lock. Watchers wait on `changed_for(type)`, notified on every write of
    that type (so a write wakes only the watchers that may care), and on compaction."""

    def __init__(self, history: int = 1000) -> None:
        self.lock = threading.RLock()
        self._changed: dict[TypeKey, threading.Condition] = {}
        self.rv = 0
        self.objects: dict[TypeKey, dict[ObjKey, dict[str, Any]]] = {}
        # History is kept per resource type, as the real server's watch caches are: writes of one
        # type do not push the watchers of another out of their window.
        self.history = history
        self.events: dict[TypeKey, deque[Event]] = {}
        # Per type, the oldest resourceVersion a watch may start from; older ones get 410 Gone.
        self.window_start: dict[TypeKey, int] = {}
        self.compacted_at = 0

    def changed_for(self, key: TypeKey) -> threading.Condition:
        with self.lock:
            if key not in self._changed:
                self._changed[key] = threading.Condition(self.lock)
            return self._changed[key]

    def wake_all(self) -> None:
        with self.lock:
            for cond in self._changed.values():
                cond.notify_all()

    def next_rv(self) -> int:
        self.rv += 1
        return self.rv

    def get(self, key: TypeKey, ns: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            obj = self.objects.get(key, {}).get((ns, name))
            return copy.deepcopy(obj) if obj is not None else None

    def items(self, key: TypeKey, ns: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            objs = self.objects.get(key, {})
            return [copy.deepcopy(o) for (n, _), o in sorted(objs.items()) if ns is None or n == ns]

    def all_items(self) -> list[tuple[TypeKey, dict[str, Any]]]:
        with self.lock:
            return [(k, copy.deepcopy(o)) for k, objs in self.objects.items() for o in objs.values()]

    def put(self, key: TypeKey, obj: dict[str, Any], event: str) -> dict[str, Any]:
        """Store obj with a fresh resourceVersion and record the event; returns a copy."""
        with self.lock:
            meta = obj["metadata"]
            okey = (meta.get("namespace", ""), meta["name"])
            old = self.objects.get(key, {}).get(okey)
            meta["resourceVersion"] = str(self.next_rv())
            self.objects.setdefault(key, {})[okey] = copy.deepcopy(obj)
            self._record(Event(self.rv, event, key, copy.deepcopy(obj), copy.deepcopy(old)))
            return copy.deepcopy(obj)

    def remove(self, key: TypeKey, ns: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            old = self.objects.get(key, {}).pop((ns, name), None)
            if old is None:
                return None
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = str(self.next_rv())
            self._record(Event(self.rv, "DELETED", key, copy.deepcopy(gone), old))
            return gone

    def _record(self, event: Event) -> None:
        kept = self.events.setdefault(event.key, deque(maxlen=self.history))
        if len(kept) == kept.maxlen:
            self.window_start[event.key] = kept[0].rv
        kept.append(event)
        if event.key in self._changed:
            self._changed[event.key].notify_all()

    def compact(self) -> None:
        """Forget all history, as etcd compaction does: watches from older versions get 410."""
        with self.lock:
            self.events.clear()
            self.window_start.clear()
            self.compacted_at = self.rv
            self.wake_all()

    def since(self, rv: int, key: TypeKey) -> list[Event]:
        # Newest events are at the right: walk back only as far as needed (many watchers call this
        # on every write, so a full scan of the history would dominate).
        with self.lock:
            out: list[Event] = []
            for event in reversed(self.events.get(key, ())):
                if event.rv <= rv:
                    break
                out.append(event)
            out.reverse()
            return out

    def too_old(self, rv: int, key: TypeKey) -> bool:
        with self.lock:
            return rv < max(self.window_start.get(key, 0), self.compacted_at)
