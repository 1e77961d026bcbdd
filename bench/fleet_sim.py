"""A discrete-event simulation of a fleet of registrars against a model of the Kubernetes API server.

    python -m bench.fleet_sim --agents 10000
    python bench/fleet_sim.py --agents 500 --latency lognormal:0.004:0.5 --seats 0 --outage 60
    python -m bench.fleet_sim --agents 500 --renew 10 --resync 300     # try other timings

Each agent is the real registration state machine (agent.registry.registrar.Registrar) with its real
operations (converge, renew) and the real backoff (agent.retry), driven on a simulated clock: the
operation a registrar submits runs at once against an in-memory store through SimKube, whose every
call is one request to the API model and advances the operation's own clock by that request's time;
the outcome reaches the registrar when the last request is answered. The WorkloadGroup watcher (a
thread in the agent, agent.registry.group) is modelled here: list once, then watches, each asking for
a timeout uniform in [`--watch-timeout`, twice that]; when one ends or breaks the next resumes from its
resourceVersion without a list (the model keeps every version, so it never answers 410 Gone); on
failure a wait from the same backoff the agent's watcher uses (0.5 s doubling to 30 s).

The API model:
- every request takes a service time drawn from `--latency` and holds one seat meanwhile;
- API Priority and Fairness for the agents' priority level (service accounts land in `workload-low`):
  `--seats` concurrent requests; beyond that, requests wait in the queues of their flow's hand. All the
  agents of a namespace share one service account, so they are one flow (the service-accounts
  FlowSchema distinguishes by user) and can fill `--hand-size` queues of `--queue-length` each. A request
  that finds them full is rejected at once, one that waits longer than `--wait-limit` is rejected
  then: 429 with Retry-After. Retry-After follows kube-apiserver's dropped-request tracker: it starts
  at 1 s, doubles (up to 32 s) when at least 3 x its value requests were dropped in the last
  Retry-After seconds (at most once per Retry-After seconds), and decreases by 1 s when fewer than its
  value were dropped. The agent caps what it honours at 30 s (agent.kube.errors);
- the client gives up after the agent's request timeout (`registry.timeout`);
- an outage refuses connections and drops open ones (watches included) for `--outage` seconds, as the
  emulator's outage does.

Defaults come from the agent's configuration schema (registry.lease, registry.resync,
registry.backoff, registry.timeout), so the simulation follows the shipped defaults.

What it prints: requests per second over time, registration time, steady-state requests per agent
per minute (by request kind), the spread of requests at steady state (max and mean per 1 s bucket,
against what a Poisson process of the same rate would give), and after the outage: the time until every
agent renewed its lease and is REGISTERED again, the peak rate, 429s, and the requests spent.

Approximations: an operation's requests are admitted when the operation starts (in simulated time
order of the operations, not of each request), which misorders requests within a few latencies; the
seats are therefore a calendar of seat-seconds per 10 ms (fluid within a bin), not a queue of
seats, so that a request admitted late does not push everything after it; the store does not model
other writers (no conflicts between agents, as in the real fleet).
"""

from __future__ import annotations

import argparse
import collections
import heapq
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.config import RegistryConfig
from agent.health.state import Health
from agent.kube.client import Kube, Resource
from agent.kube.errors import RETRY_AFTER_CAP, ApiError, Conflict, Unavailable
from agent.registry import entry as E
from agent.registry.converge import Outcome
from agent.registry.group import BACKOFF, WATCH_TIMEOUT, GroupSeen
from agent.registry.registrar import Registrar
from agent.registry.states import Settings, State
from agent.registry.worker import RegistryResult
from agent.retry import Backoff

NS, GROUP = "fleet", "app"
REFUSED_TIME = 0.001          # a refused connection answers at once
WATCHER_BACKOFF = BACKOFF  # what the agent's group follower uses


def agent_defaults() -> dict[str, float]:
    """The registry timings an agent runs with when agent.yaml says nothing."""
    reg = RegistryConfig()
    return {"lease": float(reg.lease.duration), "renew": float(reg.lease.renew), "resync": float(reg.resync),
            "backoff_initial": float(reg.backoff.initial), "backoff_max": float(reg.backoff.max),
            "timeout": float(reg.timeout), "watch_timeout": float(WATCH_TIMEOUT)}


# --- latency ------------------------------------------------------------------------------------------

def parse_latency(text: str) -> Callable[[random.Random], float]:
    """const:S | uniform:LO:HI | exp:MEAN | lognormal:MEDIAN:SIGMA (seconds)."""
    kind, _, rest = text.partition(":")
    try:
        args = [float(a) for a in rest.split(":")] if rest else []
    except ValueError:
        raise ValueError(f"--latency: {text!r}: numbers expected after the kind") from None
    want = {"const": 1, "uniform": 2, "exp": 1, "lognormal": 2}
    if kind not in want or len(args) != want[kind] or any(a < 0 for a in args):
        raise ValueError(f"--latency: {text!r}: expected const:S, uniform:LO:HI, exp:MEAN or "
                         "lognormal:MEDIAN:SIGMA (seconds, not negative)")
    if kind == "const":
        return lambda rng: args[0]
    if kind == "uniform":
        return lambda rng: rng.uniform(args[0], args[1])
    if kind == "exp":
        return lambda rng: rng.expovariate(1.0 / args[0]) if args[0] > 0 else 0.0
    mu = math.log(max(args[0], 1e-9))
    return lambda rng: rng.lognormvariate(mu, args[1])


# --- the API server model -----------------------------------------------------------------------------

OK, THROTTLED, DOWN, TIMEOUT = range(4)


class RetryAfter:
    """kube-apiserver's Retry-After for a priority level, from the requests it dropped per second."""

    MAX = 32

    def __init__(self) -> None:
        self.value = 1
        self.second: int | None = None
        self.count = 0
        self.history: collections.deque[tuple[int, int]] = collections.deque()
        self.raised_at = -10**9

    def dropped(self, t: float) -> int:
        """Record one dropped request at time t; the Retry-After to answer it with."""
        sec = int(t)
        if sec == self.second:
            self.count += 1
            return self.value
        if self.second is not None:
            self.history.append((self.second, self.count))
        while self.history and sec - self.history[0][0] > self.MAX:
            self.history.popleft()
        self.second, self.count = sec, 1
        # Only on a new second, looking at the last `value` whole seconds before it.
        recent = sum(n for s, n in self.history if sec - s <= self.value and s < sec)
        if sec - self.raised_at >= self.value and recent >= 3 * self.value:
            self.value = min(self.value * 2, self.MAX)
            self.raised_at = sec
        elif recent < self.value and self.value > 1:
            self.value -= 1
        return self.value


@dataclass
class ApiModel:
    latency: Callable[[random.Random], float]
    rng: random.Random
    seats: int = 245
    queue_capacity: int = 300
    wait_limit: float = 15.0
    client_timeout: float = 10.0
    outages: list[tuple[float, float]] = field(default_factory=list)
    per_second: collections.Counter[int] = field(default_factory=collections.Counter)
    kinds: collections.Counter[str] = field(default_factory=collections.Counter)
    codes: collections.Counter[int] = field(default_factory=collections.Counter)
    throttled_per_second: collections.Counter[int] = field(default_factory=collections.Counter)
    refused: int = 0

    BIN = 0.01  # seconds: the granularity of the seats' calendar

    def __post_init__(self) -> None:
        # The seats as a calendar: seat-seconds used in each BIN. A request starts in the first bin
        # at or after its arrival with seat time left and uses its service time from there on. A
        # calendar (rather than a queue of seats) stays right when requests are admitted out of time
        # order, which the operations' later requests are (see the module's docstring).
        self._used: dict[int, float] = {}
        self._bin_capacity = self.seats * self.BIN
        mean = sum(self.latency(random.Random(i)) for i in range(2000)) / 2000
        # The queues hold queue_capacity requests: a wait longer than it takes the seats to serve
        # them means the queues are full.
        self._queue_wait = self.queue_capacity * mean / self.seats if self.seats > 0 else math.inf
        self.retry_after = RetryAfter()

    def _admit(self, t: float, service: float) -> float | None:
        """When a request arriving at t starts, or None when it is to be rejected."""
        used, cap, width = self._used, self._bin_capacity, self.BIN
        i = int(t / width)
        last = int((t + min(self._queue_wait, self.wait_limit)) / width)
        while used.get(i, 0.0) >= cap - 1e-12:
            i += 1
            if i > last:
                return None
        start = max(t, i * width)
        left = service
        while left > 1e-12:  # charge the service time to the bins from the start on
            take = min(left, cap - used.get(i, 0.0))
            if take > 0:
                used[i] = used.get(i, 0.0) + take
                left -= take
            i += 1
        return start

    def down(self, t: float) -> float | None:
        """The end of the outage t falls in, or None."""
        for start, end in self.outages:
            if start <= t < end:
                return end
        return None

    def _next_outage(self, t: float) -> float:
        return min((s for s, _ in self.outages if s > t), default=math.inf)

    def request(self, t: float, kind: str) -> tuple[int, float, float | None]:
        """One request arriving at t: (result, when the client has its answer, Retry-After)."""
        if self.down(t) is not None:
            self.refused += 1
            return DOWN, t + REFUSED_TIME, None
        self.per_second[int(t)] += 1
        self.kinds[kind] += 1
        service = self.latency(self.rng)
        start = t
        if self.seats > 0:
            admitted = self._admit(t, service)
            if admitted is None:
                # Rejected: at once when the queues are full, after the wait limit otherwise.
                when = t if self._queue_wait <= self.wait_limit else t + self.wait_limit
                self.codes[429] += 1
                self.throttled_per_second[int(t)] += 1
                ra = self.retry_after.dropped(when)
                if when - t > self.client_timeout:
                    return TIMEOUT, t + self.client_timeout, None
                return THROTTLED, when + REFUSED_TIME, float(ra)
            start = admitted
        done = start + service
        if self._next_outage(t) < done:  # the connection is dropped by the outage
            self.codes[0] += 1
            return DOWN, self._next_outage(t), None
        if done - t > self.client_timeout:
            self.codes[0] += 1
            return TIMEOUT, t + self.client_timeout, None
        self.codes[200] += 1
        return OK, done, None


# --- the store and the client -------------------------------------------------------------------------

class SimKube(Kube):
    """The calls an operation makes, on the simulated clock: each one is a request to the ApiModel.

    Subclasses Kube only for its type; nothing of the real client is used."""

    def __init__(self, sim: Sim, t: float) -> None:
        self.sim, self.t = sim, t

    def _req(self, verb: str, res: Resource, name: str) -> None:
        result, self.t, ra = self.sim.api.request(self.t, f"{verb} {res[2]}")
        if result == OK:
            return
        what = f"{res[2]} {name!r}"
        if result == THROTTLED:
            raise Unavailable(verb, what, 429, "Too many requests",
                              retry_after=min(ra or 0.0, RETRY_AFTER_CAP))
        raise Unavailable(verb, what, 0, "unreachable: " + ("timed out" if result == TIMEOUT
                                                             else "connection refused"))

    def whoami(self) -> str | None:
        return None  # owners are not simulated (the real client asks once per credential)

    def get(self, res: Resource, namespace: str, name: str) -> dict[str, Any] | None:
        self._req("get", res, name)
        return self.sim.store.get((res[2], namespace, name))

    def _write(self, res: Resource, obj: dict[str, Any], create: bool) -> dict[str, Any]:
        meta = obj["metadata"]
        key = (res[2], meta["namespace"], meta["name"])
        self._req("create" if create else "patch", res, meta["name"])
        old = self.sim.store.get(key)
        if create and old is not None:
            raise Conflict("create", res[2], 409, "already exists")
        want_rv = meta.get("resourceVersion")
        if want_rv and (old is None or old["metadata"]["resourceVersion"] != want_rv):
            raise Conflict("patch", res[2], 409, "the object has been modified")
        self.sim.rv += 1
        uid = old["metadata"]["uid"] if old is not None else f"uid-{self.sim.rv}"
        new = {**obj, "metadata": {**meta, "resourceVersion": str(self.sim.rv), "uid": uid}}
        self.sim.store[key] = new
        return new

    def apply(self, res: Resource, obj: dict[str, Any], force: bool = True,
              subresource: str | None = None, field_manager: str = "mesh-agent") -> dict[str, Any]:
        return self._write(res, obj, create=False)

    def create(self, res: Resource, obj: dict[str, Any]) -> dict[str, Any]:
        return self._write(res, obj, create=True)

    def delete(self, res: Resource, namespace: str, name: str, uid: str | None = None,
               resource_version: str | None = None) -> bool:
        self._req("delete", res, name)
        return self.sim.store.pop((res[2], namespace, name), None) is not None


# --- the agents -----------------------------------------------------------------------------------------

START, WAKE, RESULT, GROUP_SEEN, LIST, WATCH_END = range(6)

GROUP_OBJ = {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadGroup",
             "metadata": {"name": GROUP, "namespace": NS, "uid": "group-uid"},
             "spec": {"metadata": {"labels": {"app": GROUP}},
                      "template": {"serviceAccount": "fleet-vm", "ports": {"http": 8080}}}}


class Agent:
    __slots__ = ("entry", "idx", "recovered", "reg", "sim", "state", "wake_at", "watch_backoff", "watch_gen",
                 "watch_rng", "watch_until")

    def __init__(self, sim: Sim, idx: int, settings: Settings, rng: random.Random) -> None:
        self.sim, self.idx = sim, idx
        n = idx + 1
        address = f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"
        self.entry = E.build_entry(E.EntryInputs(group=GROUP_OBJ, address=address,
                                                 instance=settings.instance))
        self.reg = Registrar(settings, self.build, self.submit, rng)
        if sim.what_if.retry_after_jitter:
            self.reg._backoff = RetryAfterJitterBackoff(settings.backoff_initial, settings.backoff_max, rng)
        self.wake_at = math.inf
        self.watch_backoff = Backoff(*WATCHER_BACKOFF, rng=rng)
        self.watch_rng = random.Random(rng.getrandbits(64))  # the follower's own, as in the agent
        self.watch_gen, self.watch_until = 0, -math.inf  # the open watch (its end, when it has one)
        self.state = self.reg.state
        self.recovered = False

    def build(self, group: dict[str, Any]) -> dict[str, Any]:
        return self.entry  # the group never changes in the simulation: build once

    def submit(self, seq: int, op: Callable[[Kube], Outcome]) -> None:
        kube = SimKube(self.sim, self.sim.now)
        try:
            outcome = op(kube)
        except ApiError as exc:
            outcome = Outcome(error=exc)
        self.sim.push(kube.t, RESULT, self.idx, RegistryResult(seq, outcome))


@dataclass(frozen=True)
class WhatIf:
    """Behaviours the agent does not have, to weigh them; off by default."""

    retry_after_jitter: bool = False  # wait Retry-After plus a jitter of up to as much again


class RetryAfterJitterBackoff(Backoff):
    """What-if: Retry-After is a floor with jitter above it. Today the delay is max(jitter, Retry-After)
    capped at the backoff's max, so every agent told "30" (or more) retries 30 s later to the
    millisecond: a fleet throttled together comes back together."""

    def next_delay(self, retry_after: float | None = None) -> float:
        if retry_after is None:
            return super().next_delay()
        ra = min(retry_after, self.max)
        delay = ra + self.rng.uniform(0, min(self.ceiling(), max(ra, self.initial)))
        self.attempts += 1
        return delay


class Sim:
    def __init__(self, n: int, settings: dict[str, float], api: ApiModel, seed: int, ramp: float,
                 what_if: WhatIf = WhatIf()) -> None:
        self.now = 0.0
        self.what_if = what_if
        self.api = api
        self.store: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.rv = 0
        self.heap: list[tuple[float, int, int, int, Any]] = []
        self._n = 0
        self.watch_timeout = settings["watch_timeout"]
        self.registered = 0
        self.recovered = 0
        self.recovery_from: float | None = None
        self.all_recovered_at: float | None = None
        master = random.Random(seed)
        self.agents: list[Agent] = []
        for i in range(n):
            s = Settings(NS, GROUP, f"vm-{i:06d}", settings["lease"], settings["renew"], settings["resync"],
                         backoff_initial=settings["backoff_initial"], backoff_max=settings["backoff_max"])
            self.agents.append(Agent(self, i, s, random.Random(master.getrandbits(64))))
            self.push(ramp * i / max(1, n), START, i, None)

    def push(self, t: float, kind: int, idx: int, payload: Any) -> None:
        self._n += 1
        heapq.heappush(self.heap, (t, self._n, kind, idx, payload))

    def run(self, until: float, stop: Callable[[], bool] | None = None) -> None:
        heap, agents = self.heap, self.agents
        while heap and heap[0][0] <= until:
            t, _, kind, idx, payload = heapq.heappop(heap)
            self.now = t
            a = agents[idx]
            if kind == WAKE:
                if payload != a.wake_at:
                    continue  # superseded by a later tick
            elif kind == RESULT:
                a.reg.handle(payload, t)
                if payload.outcome.error is None and self.recovery_from is not None and \
                        t >= self.recovery_from and not a.recovered:
                    a.recovered = True
                    self.recovered += 1
            elif kind == GROUP_SEEN:
                a.reg.handle(payload, t)
            elif kind == START:
                a.reg.set_health(Health.HEALTHY)
                self.push(t, LIST, idx, None)
            elif kind == LIST:
                self._list(a, t, bool(payload))
                continue
            elif kind == WATCH_END:
                gen, failed = payload
                if gen == a.watch_gen:
                    self._watch_ended(a, t, failed)
                continue
            self._tick(a, t)
            if stop is not None and stop():
                return
        self.now = until

    def _tick(self, a: Agent, t: float) -> None:
        deadline = a.reg.tick(t)
        if deadline != a.wake_at:
            a.wake_at = deadline
            self.push(deadline, WAKE, a.idx, deadline)
        state = a.reg.state
        if state is not a.state:
            self.registered += (state is State.REGISTERED) - (a.state is State.REGISTERED)
            a.state = state
        if a.recovered and state is State.REGISTERED and self.all_recovered_at is None and \
                self.recovered >= len(self.agents) and self.registered >= len(self.agents):
            self.all_recovered_at = t

    # The group watcher (agent.registry.group): list once (field selector on the name), then watch, each
    # watch asking for a timeout uniform in [T, 2T]; when one ends or breaks, the next resumes from the
    # resourceVersion it had, without a list. (The model keeps every version: no 410 Gone.)
    def _list(self, a: Agent, t: float, resume: bool) -> None:
        done = t
        if not resume:
            result, done, ra = self.api.request(t, "list workloadgroups")
            if result != OK:
                self.push(done + a.watch_backoff.next_delay(ra), LIST, a.idx, None)
                return
            self.push(done, GROUP_SEEN, a.idx, GroupSeen(GROUP_OBJ))
        result, done2, ra = self.api.request(done, "watch workloadgroups")
        if result != OK:
            self.push(done2 + a.watch_backoff.next_delay(ra), LIST, a.idx, True)
            return
        ends = done2 + self.watch_timeout * (1.0 + a.watch_rng.random())
        cut = self.api._next_outage(done2)
        a.watch_gen += 1
        a.watch_until = min(ends, cut)
        self.push(a.watch_until, WATCH_END, a.idx, (a.watch_gen, cut < ends))

    def add_outage(self, start: float, end: float) -> None:
        """The API is down from start to end: open watches break at start."""
        self.api.outages.append((start, end))
        for a in self.agents:
            if a.watch_until > start:
                a.watch_gen += 1
                a.watch_until = start
                self.push(start, WATCH_END, a.idx, (a.watch_gen, True))

    def _watch_ended(self, a: Agent, t: float, failed: bool) -> None:
        a.watch_until = -math.inf
        if failed:  # the stream broke: watch on from where it was, after a backoff
            self.push(t + a.watch_backoff.next_delay(), LIST, a.idx, True)
        else:
            a.watch_backoff.reset()
            self.push(t, LIST, a.idx, True)


# --- the run and its report -------------------------------------------------------------------------------

def poisson_max(mean: float, buckets: int) -> float:
    """The typical largest of `buckets` Poisson(mean) counts (normal approximation), for comparison."""
    if buckets <= 1 or mean <= 0:
        return mean
    z = math.sqrt(2 * math.log(buckets))
    return mean + z * math.sqrt(mean)


@dataclass
class Report:
    agents: int
    registered_in: float | None
    steady_rpm: float
    steady_rps: float
    spread_max: int
    spread_mean: float
    spread_poisson_max: float
    recovery: float | None
    peak_after: int
    throttled: int
    throttled_total: int
    timeouts: int
    recovery_requests: int
    kinds: dict[str, float]
    series: list[tuple[int, int]]
    wall: float
    outage_at: float
    outage: float


def simulate(args: argparse.Namespace) -> Report:
    wall0 = time.monotonic()
    if args.steady is None:
        args.steady = float(math.ceil(max(300.0, args.resync, args.watch_timeout)))
    latency = parse_latency(args.latency)
    api = ApiModel(latency, random.Random(args.seed + 1), seats=args.seats,
                   queue_capacity=args.hand_size * args.queue_length, wait_limit=args.wait_limit,
                   client_timeout=args.timeout)
    timings = {k: getattr(args, k) for k in agent_defaults()}
    what_if = WhatIf(args.retry_after_jitter)
    sim = Sim(args.agents, timings, api, args.seed, args.ramp, what_if)
    n = args.agents
    limit = args.ramp + 120 + n * 0.3
    sim.run(limit, stop=lambda: sim.registered >= n)
    registered_in = sim.now if sim.registered >= n else None

    # Steady state: one renewal period to settle, then the window.
    s0 = math.ceil(sim.now + args.renew)
    s1 = s0 + int(args.steady)
    kinds0 = collections.Counter(api.kinds)
    sim.run(s1)
    kinds = {k: v / n / (args.steady / 60) for k, v in (api.kinds - kinds0).items()}
    window = [api.per_second.get(s, 0) for s in range(s0, s1)]
    total = sum(window)
    mean = total / max(1, len(window))

    # The outage, then recovery.
    t_out = float(s1)
    back = t_out + args.outage
    if args.outage > 0:
        sim.add_outage(t_out, back)
    sim.recovery_from = back
    if args.outage > 0:
        sim.run(back + args.recovery_limit, stop=lambda: sim.all_recovered_at is not None)
    recovery = None if sim.all_recovered_at is None else sim.all_recovered_at - back
    end = math.ceil(sim.now)
    sim.run(end + args.tail)
    after = range(int(back), end + 1)
    peak = max((api.per_second.get(s, 0) for s in after), default=0)
    throttled = sum(api.throttled_per_second.get(s, 0) for s in after)
    spent = sum(api.per_second.get(s, 0) for s in after)
    last = int(sim.now)
    series = [(s, api.per_second.get(s, 0)) for s in range(0, last + 1)]
    return Report(n, registered_in, total / n / (args.steady / 60), mean, max(window, default=0), mean,
                  poisson_max(mean, len(window)), recovery, peak, throttled, api.codes[429], api.codes[0], spent,
                  kinds, series,
                  time.monotonic() - wall0, t_out, args.outage)


def print_report(r: Report, args: argparse.Namespace) -> None:
    la = os.getloadavg()
    print(f"fleet simulation: {r.agents} agents, lease {args.lease:g}s renewed every {args.renew:g}s "
          f"(x0.8-1.0), resync {args.resync:g}s, backoff {args.backoff_initial:g}s..{args.backoff_max:g}s, "
          f"watch {args.watch_timeout:g}s, request timeout {args.timeout:g}s")
    print(f"API model: latency {args.latency}, {args.seats or 'unlimited'} seats, "
          f"{args.hand_size}x{args.queue_length} queued, wait limit {args.wait_limit:g}s; "
          f"outage {args.outage:g}s; seed {args.seed}")
    ifs = [k for k in ("retry_after_jitter",) if getattr(args, k)]
    if ifs:
        print("what-ifs (not the agent's behaviour today): " + ", ".join(k.replace("_", "-") for k in ifs))
    bucket = args.bucket
    print(f"\nrequests per second, {bucket:g} s buckets (mean / max of 1 s):")
    rows = []
    for i in range(0, len(r.series), int(bucket)):
        chunk = [n for _, n in r.series[i:i + int(bucket)]]
        mark = " outage" if r.outage and r.outage_at <= i < r.outage_at + r.outage else ""
        rows.append(f"  t={i:5d}s {sum(chunk) / len(chunk):8.1f} / {max(chunk):6d}{mark}")
    print("\n".join(rows))
    reg = f"{r.registered_in:.1f}s" if r.registered_in is not None else "not all"
    print(f"\nregistered (starts spread over {args.ramp:g}s): {reg}")
    print(f"steady state over {args.steady:g}s: {r.steady_rpm:.2f} requests per agent per minute "
          f"({r.steady_rps:.1f} req/s for the fleet)")
    for kind, v in sorted(r.kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:24s} {v:6.2f} /agent/min")
    print(f"spread at steady state (1 s buckets): max {r.spread_max} / mean {r.spread_mean:.1f} = "
          f"{r.spread_max / max(r.spread_mean, 1e-9):.2f} (independent random arrivals would give max "
          f"~{r.spread_poisson_max:.0f} = {r.spread_poisson_max / max(r.spread_mean, 1e-9):.2f})")
    if r.outage:
        rec = f"{r.recovery:.1f}s" if r.recovery is not None else f"not within {args.recovery_limit:g}s"
        print(f"after a {r.outage:g}s outage: every agent renewed and REGISTERED again in {rec}; "
              f"peak {r.peak_after} req/s; {r.recovery_requests} requests "
              f"({r.recovery_requests / r.agents:.1f} per agent), {r.throttled} answered 429")
    d, rn = args.lease, args.renew
    print(f"dead VM reaped (lease {d:g}s, reaper grace {args.grace:g}s, run every {args.reaper_period:g}s): "
          f"{max(0.0, d - rn) + args.grace:.0f}-{d + args.grace + args.reaper_period:.0f}s after it died")
    print(f"over the whole run: {r.throttled_total} requests answered 429, {r.timeouts} timed out or cut")
    print(f"simulated in {r.wall:.1f}s of wall time; load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}")


def parser() -> argparse.ArgumentParser:
    d = agent_defaults()
    p = argparse.ArgumentParser(prog="python -m bench.fleet_sim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--ramp", type=float, default=20.0, help="spread the agents' starts over this long (s)")
    p.add_argument("--steady", type=float, default=None,
                   help="steady-state window (s); default: the longest of 300 s, --resync and --watch-timeout, "
                        "so that it holds every periodic request")
    p.add_argument("--outage", type=float, default=60.0, help="API outage (s); 0 for none")
    p.add_argument("--recovery-limit", type=float, default=600.0, help="give up waiting for recovery (s)")
    p.add_argument("--tail", type=float, default=20.0, help="simulate this long after recovery (s)")
    p.add_argument("--bucket", type=float, default=10.0, help="bucket of the printed series (s)")
    g = p.add_argument_group("agent timings (default: the agent's configuration defaults)")
    g.add_argument("--lease", type=float, default=d["lease"], help="registry.lease.duration (s)")
    g.add_argument("--renew", type=float, default=d["renew"], help="registry.lease.renew (s)")
    g.add_argument("--resync", type=float, default=d["resync"], help="registry.resync (s)")
    g.add_argument("--backoff-initial", type=float, default=d["backoff_initial"])
    g.add_argument("--backoff-max", type=float, default=d["backoff_max"])
    g.add_argument("--timeout", type=float, default=d["timeout"], help="registry.timeout (s)")
    g.add_argument("--watch-timeout", type=float, default=d["watch_timeout"],
                   help="the group watch's shortest timeoutSeconds (s); each watch's is uniform in [T, 2T]")
    a = p.add_argument_group("API server model")
    a.add_argument("--latency", default="lognormal:0.01:0.5",
                   help="service time: const:S, uniform:LO:HI, exp:MEAN, lognormal:MEDIAN:SIGMA")
    a.add_argument("--seats", type=int, default=245,
                   help="concurrency of the agents' priority level (0: unlimited); workload-low gets "
                        "100 of 245 shares of 600 seats by default")
    a.add_argument("--hand-size", type=int, default=6, help="queues one flow may use")
    a.add_argument("--queue-length", type=int, default=50, help="requests per queue")
    a.add_argument("--wait-limit", type=float, default=15.0, help="longest wait in a queue (s)")
    w = p.add_argument_group("what-ifs: behaviours the agent does not have, to weigh them")
    w.add_argument("--retry-after-jitter", action="store_true",
                   help="wait Retry-After plus up to as much again, instead of exactly Retry-After")
    r = p.add_argument_group("reaping (printed, not simulated)")
    r.add_argument("--grace", type=float, default=60.0, help="mesh-agent reap --grace (s)")
    r.add_argument("--reaper-period", type=float, default=60.0, help="the reaper CronJob's period (s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        parse_latency(args.latency)
    except ValueError as exc:
        print(f"fleet_sim: {exc}", file=sys.stderr)
        return 2
    if args.agents < 1 or args.renew >= args.lease:
        print("fleet_sim: --agents must be >= 1 and --renew shorter than --lease", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.CRITICAL)  # the registrars log every transition
    print_report(simulate(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
