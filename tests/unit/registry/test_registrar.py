"""The registration state machine, driven by hand: inputs in, submitted operations and states out."""

from __future__ import annotations

import random

from agent.health.state import Health
from agent.kube.errors import Conflict, Unauthorized, Unavailable
from agent.registry import entry as E
from agent.registry.converge import Outcome, Want
from agent.registry.group import GroupGone, GroupSeen
from agent.registry.registrar import Registrar
from agent.registry.states import Settings, State, decide_want
from agent.registry.worker import RegistryResult

GROUP = {"metadata": {"name": "g", "namespace": "ns", "uid": "u"},
         "spec": {"template": {"ports": {"http": 80}}}}
LEASE = E.build_lease("g-10.0.0.1", "ns", "me", 40, E.parse_time("2026-01-01T00:00:00Z"))  # type: ignore[arg-type]


class Rec:
    def __init__(self) -> None:
        self.ops: list[int] = []

    def __call__(self, seq: int, op: object) -> None:
        self.ops.append(seq)


def make(**kw: object) -> tuple[Registrar, Rec]:
    rec = Rec()
    s = Settings(namespace="ns", group="g", instance="me", **kw)  # type: ignore[arg-type]

    def build(group: dict) -> dict:
        return E.build_entry(E.EntryInputs(group=group, address="10.0.0.1", instance="me"))
    return Registrar(s, build, rec, random.Random(1)), rec


def result(r: Registrar, now: float, **kw: object) -> None:
    r.handle(RegistryResult(r._in_flight, Outcome(**kw)), now)  # type: ignore[arg-type]


def test_decide_want_table() -> None:
    H, U, N = Health.HEALTHY, Health.UNHEALTHY, Health.UNKNOWN
    assert decide_want(H, False, True, False, False, False) is Want.REGISTER
    assert decide_want(U, False, True, False, False, False) is Want.WITHDRAW
    assert decide_want(U, False, True, False, True, False) is Want.MARK_UNHEALTHY
    assert decide_want(N, False, True, False, False, False) is Want.HOLD
    assert decide_want(H, False, False, False, False, False) is Want.HOLD
    assert decide_want(H, True, True, False, False, False) is Want.WITHDRAW
    assert decide_want(H, False, True, True, False, False) is Want.WITHDRAW
    assert decide_want(H, False, True, False, False, True) is Want.WITHDRAW
    assert decide_want(H, False, True, False, False, True, withdraw_on_shutdown=False) is Want.HOLD


def test_register_renew_and_resync() -> None:
    r, rec = make(lease_renew=10.0, resync=300.0)
    r.handle(GroupSeen(GROUP), 0)
    r.set_health(Health.HEALTHY)
    r.tick(0)
    assert r._in_flight_want is Want.REGISTER
    assert r.tick(0.1) > 0.1 and len(rec.ops) == 1  # nothing more while one is in flight
    result(r, 1, present=True, lease=LEASE, wrote=("lease", "entry"))
    assert r.state is State.REGISTERED
    nxt = r.tick(1)
    assert 1 + 8 <= nxt <= 1 + 10  # the renewal, jittered
    r.tick(nxt)
    assert r._in_flight_want is None  # a renewal, not a convergence
    result(r, nxt, present=True, lease=LEASE)
    r._next_renew = 1e9
    r.tick(400)  # the resync
    assert r._in_flight_want is Want.REGISTER


def test_outage_never_deletes_and_backs_off() -> None:
    r, rec = make()
    r.handle(GroupSeen(GROUP), 0)
    r.set_health(Health.HEALTHY)
    r.tick(0)
    result(r, 0, error=Unavailable("patch", "x", 503, "down", retry_after=4.0))
    assert r.state is State.RETRYING
    assert r._next_converge >= 4.0
    r.tick(1)
    assert len(rec.ops) == 1
    r.tick(r._next_converge)
    assert r._in_flight_want is Want.REGISTER  # retried as a registration: nothing is deleted


def test_unhealthy_withdraws_or_marks() -> None:
    r, _ = make()
    r.handle(GroupSeen(GROUP), 0)
    r.set_health(Health.UNHEALTHY)
    r.tick(0)
    assert r._in_flight_want is Want.WITHDRAW
    r2, _ = make(condition_mode=True)
    r2.handle(GroupSeen(GROUP), 0)
    r2.set_health(Health.UNHEALTHY)
    r2.tick(0)
    assert r2._in_flight_want is Want.MARK_UNHEALTHY


def test_unknown_health_holds() -> None:
    r, _ = make()
    r.handle(GroupSeen(GROUP), 0)
    r.tick(0)
    assert r._in_flight_want is Want.HOLD
    result(r, 0, present=True, lease=LEASE)
    assert r.state is State.HELD


def test_conflict_hands_off_until_the_other_lease_expires() -> None:
    r, rec = make()
    r.handle(GroupSeen(GROUP), 0)
    r.set_health(Health.HEALTHY)
    r.tick(0)
    result(r, 0, present=False, conflict_holder="other")
    assert r.state is State.CONFLICT and r.conflict_holder == "other"
    r.tick(1)
    assert len(rec.ops) == 1


def test_an_entry_the_api_fences_off_is_retried_with_backoff_and_registered_once_gone() -> None:
    """Another VM's entry at this address (a clone, a reused address): the API server refuses this
    credential (fenced). The registrar says who holds it, looks again with a growing, jittered delay
    (never at once, though the lease expired), and registers once the reaper has removed the entry."""
    import datetime as dt

    r, rec = make(lease_renew=10.0, lease_duration=40.0, backoff_max=30.0)
    r.handle(GroupSeen(GROUP), 0)
    r.set_health(Health.HEALTHY)
    now, delays = 0.0, []
    expired = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=30)
    for _ in range(6):
        r.tick(now)
        ops = len(rec.ops)
        result(r, now, present=False, conflict_holder="mesh-vm:4001", conflict_until=expired,
               fenced="WorkloadEntry g-10.0.0.1 belongs to mesh-vm:4001; this credential is mesh-vm:4002")
        assert r.state is State.CONFLICT and r.conflict_holder == "mesh-vm:4001"
        assert "belongs to mesh-vm:4001 (its lease expired at" in r.message
        assert "waiting for the reaper" in r.message and "this credential is mesh-vm:4002" in r.message
        due = r.tick(now)
        assert due - now >= 5.0 and len(rec.ops) == ops  # nothing more until then
        delays.append(due - now)
        now = due
    assert max(delays) <= 40.0 and max(delays) > 10.0  # the ceiling grew past the first period
    r.tick(now)
    result(r, now, present=True, lease=LEASE, wrote=("lease", "entry"))
    assert r.state is State.REGISTERED and r.conflict_holder is None
    assert r._fence._backoff.attempts == 0


def test_stale_resource_version_reads_again_at_once() -> None:
    r, rec = make()
    r.handle(GroupSeen(GROUP), 0)
    r.set_health(Health.HEALTHY)
    r.tick(0)
    result(r, 0, error=Conflict("patch", "x", 409, "stale"))
    r.tick(0)
    assert len(rec.ops) == 2


def test_refused_is_reported_with_verb_and_resource() -> None:
    r, _ = make()
    r.handle(GroupSeen(GROUP), 0)
    r.set_health(Health.HEALTHY)
    r.tick(0)
    result(r, 0, error=Unauthorized("patch", 'workloadentries.networking.istio.io "g-10.0.0.1"', 403, "no"))
    assert r.state is State.REFUSED
    assert "patch workloadentries" in r.message


def test_group_deleted_withdraws_and_says_why() -> None:
    r, _ = make()
    r.handle(GroupSeen(GROUP), 0)
    r.set_health(Health.HEALTHY)
    r.tick(0)
    result(r, 0, present=True, lease=LEASE)
    r.handle(GroupGone("ns", "g"), 1)
    r.tick(1)
    assert r._in_flight_want is Want.WITHDRAW
    result(r, 1, present=False)
    assert r.state is State.WITHDRAWN and "deleted" in r.message


def test_shutdown_finishes_after_withdraw_or_timeout() -> None:
    r, _ = make()
    r.handle(GroupSeen(GROUP), 0)
    r.set_health(Health.HEALTHY)
    r.tick(0)
    result(r, 0, present=True, lease=LEASE)
    r.shutdown(1, timeout=5)
    r.tick(1)
    assert r._in_flight_want is Want.WITHDRAW
    result(r, 2, present=False)
    assert r.finished
    r2, _ = make()
    r2.handle(GroupSeen(GROUP), 0)
    r2.set_health(Health.HEALTHY)
    r2.tick(0)
    r2.shutdown(0, timeout=5)
    r2.tick(6)  # the registration is still in flight and the API never answers
    assert r2.finished and r2.state is State.STOPPED


def test_bad_entry_inputs_are_refused_not_crashing() -> None:
    rec = Rec()

    def build(group: dict) -> dict:
        raise E.EntryError("bad network name")
    r = Registrar(Settings("ns", "g", "me"), build, rec)
    r.handle(GroupSeen(GROUP), 0)
    r.set_health(Health.HEALTHY)
    r.tick(0)
    assert r.state is State.REFUSED and not rec.ops


def test_without_the_group_it_holds_and_can_still_withdraw() -> None:
    r, _ = make()
    r.set_health(Health.HEALTHY)
    r.tick(0)  # the group could not be read yet
    assert r._in_flight_want is Want.HOLD
    result(r, 0, present=True, lease=LEASE)
    assert r.state is State.HELD and "WorkloadGroup" in r.message
    r.shutdown(1, timeout=5)
    r.tick(1)
    assert r._in_flight_want is Want.WITHDRAW  # named from the group's name and the address
    result(r, 1, present=False)
    assert r.finished


def test_status_tells_what_the_api_last_confirmed_through_an_outage() -> None:
    r, _ = make()
    r.handle(GroupSeen(GROUP), 0)
    r.set_health(Health.HEALTHY)
    r.tick(0)
    assert r.status().known is None and r.status().unknown_since is None  # nothing confirmed yet
    result(r, 1, present=True, lease=LEASE, wrote=("lease", "entry"))
    st = r.status()
    assert (st.known, st.confirmed_at, st.unknown_since) == (State.REGISTERED, 1, None)
    # The API goes away: the renewal fails. The entry is still in the cluster as far as anyone knows.
    r.tick(r._next_renew)  # type: ignore[arg-type]
    result(r, 12, error=Unavailable("patch", "x", 503, "down"))
    r.tick(r._next_converge)
    result(r, 15, error=Unavailable("patch", "x", 503, "down"))
    st = r.status()
    assert st.state is State.RETRYING
    assert (st.known, st.confirmed_at, st.unknown_since) == (State.REGISTERED, 1, 12)  # since the first failure
    # It answers again: confirmed, no longer unknown.
    r.tick(r._next_converge)
    result(r, 30, present=True, lease=LEASE)
    st = r.status()
    assert (st.known, st.confirmed_at, st.unknown_since) == (State.REGISTERED, 30, None)


def test_a_confirmed_withdrawal_and_an_unhealthy_mark_are_known_as_such() -> None:
    r, _ = make()
    r.handle(GroupSeen(GROUP), 0)
    r.set_health(Health.UNHEALTHY)
    r.tick(0)
    result(r, 2, present=False, wrote=("delete",))
    assert (r.status().known, r.status().confirmed_at) == (State.WITHDRAWN, 2)
    r2, _ = make(condition_mode=True)
    r2.handle(GroupSeen(GROUP), 0)
    r2.set_health(Health.UNHEALTHY)
    r2.tick(0)
    result(r2, 3, present=True, healthy=False, lease=LEASE)
    assert r2.status().known is State.UNHEALTHY


def registered(**kw: object) -> tuple[Registrar, Rec]:
    """A registrar that registered at t=1 and is due to renew."""
    r, rec = make(**kw)
    r.handle(GroupSeen(GROUP), 0)
    r.set_health(Health.HEALTHY)
    r.tick(0)
    result(r, 1, present=True, lease=LEASE, wrote=("lease", "entry"))
    assert r.state is State.REGISTERED
    return r, rec


def test_a_renewal_not_answered_is_retried_as_a_renewal() -> None:
    """Unreachable, timed out, 5xx or 429: the lease is renewed again (one write), not converged (three
    requests); the resync keeps its time, and the state is what it was once the renewal succeeds."""
    r, rec = registered()
    resync = r._next_converge
    t = r._next_renew
    assert t is not None
    for i, err in enumerate([Unavailable("patch", "x", None, "connection refused"),
                             Unavailable("patch", "x", 503, "down"),
                             Unavailable("patch", "x", 429, "slow down", retry_after=7.0)]):
        r.tick(t)
        assert r._in_flight_want is None and len(rec.ops) == 2 + i  # a renewal
        result(r, t, error=err)
        assert r.state is State.RETRYING and "nothing is deleted" in r.message
        assert r._lease is LEASE and r._next_converge == resync
        assert r.status().unknown_since is not None
        t = r.tick(t)
        assert t == r._next_renew
    assert t >= 1 + 7.0  # Retry-After is a floor of the wait
    r.tick(t)
    assert r._in_flight_want is None  # still a renewal
    renewed = {**LEASE, "metadata": {**LEASE["metadata"], "resourceVersion": "9"}}
    result(r, t + 0.1, present=True, lease=renewed)
    assert (r.state, r.message) == (State.REGISTERED, "registered")
    assert r._lease is renewed and r.status().unknown_since is None and r._backoff.attempts == 0
    assert r._next_converge == resync
    assert r._next_renew is not None and t + 0.1 + 0.8 * r.s.lease_renew <= r._next_renew


def test_a_renewal_that_finds_the_lease_changed_or_gone_converges() -> None:
    """409 or 404 (renew() says lost_lease): someone else wrote the lease, or the reaper deleted it (it
    deletes the lease before the entry): the next operation is a full convergence, at once."""
    r, _ = registered()
    t = r._next_renew
    assert t is not None
    r.tick(t)
    result(r, t, error=Unavailable("patch", "x", 503, "down"))
    t = r.tick(t)
    r.tick(t)
    assert r._in_flight_want is None
    result(r, t, lost_lease=True)
    assert r._lease is None
    r.tick(t)
    assert r._in_flight_want is Want.REGISTER
    result(r, t + 1, present=True, lease=LEASE, wrote=("lease", "entry"))
    assert r.state is State.REGISTERED


def test_other_renewal_failures_converge_as_before() -> None:
    r, _ = registered()
    t = r._next_renew
    assert t is not None
    r.tick(t)
    result(r, t, error=Unauthorized("patch", "leases", 403, "forbidden"))
    assert r.state is State.REFUSED and r._next_renew is None
    r.tick(r._next_converge)
    assert r._in_flight_want is Want.REGISTER


def test_a_change_while_renewals_are_retried_converges_at_the_next_try() -> None:
    """The app goes down while the API is away: the next try is the withdrawal, not a renewal, and it
    does not wait for the resync."""
    r, _ = registered()
    t = r._next_renew
    assert t is not None
    r.tick(t)
    result(r, t, error=Unavailable("patch", "x", 503, "down"))
    retry_at = r._next_renew
    assert retry_at is not None and retry_at < r._next_converge
    r.set_health(Health.UNHEALTHY, "probe failed")
    assert r.tick(t + 0.01) == retry_at
    r.tick(retry_at)
    assert r._in_flight_want is Want.WITHDRAW
    result(r, retry_at, error=Unavailable("delete", "x", 503, "down"))  # a convergence's failure: as before
    assert r.state is State.RETRYING and r._next_renew is None
    r.tick(r._next_converge)
    assert r._in_flight_want is Want.WITHDRAW
    result(r, r._next_converge, present=False, wrote=("delete entry", "delete lease"))
    assert r.state is State.WITHDRAWN
