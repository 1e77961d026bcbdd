"""The fleet simulator's model pieces: the API's rate limiting, outages and the run itself."""

from __future__ import annotations

import random

import pytest

from bench import fleet_sim as fs


def api(**kw: object) -> fs.ApiModel:
    return fs.ApiModel(fs.parse_latency("const:0.01"), random.Random(0), **kw)  # type: ignore[arg-type]


def test_seats_then_queues_then_429_with_retry_after() -> None:
    m = api(seats=2, queue_capacity=3, wait_limit=15.0)
    results = [m.request(0.0, "get leases") for _ in range(10)]
    codes = [r[0] for r in results]
    # Two seats at once; then waiting, as long as serving three queued requests takes (15 ms): two more.
    assert codes[:4] == [fs.OK] * 4
    assert codes[4:] == [fs.THROTTLED] * 6   # the queues are full: rejected at once
    assert [r[1] for r in results[:4]] == pytest.approx([0.01, 0.01, 0.02, 0.02])
    assert all(r[1] == pytest.approx(fs.REFUSED_TIME) for r in results[4:])
    assert all(r[2] == 1.0 for r in results[4:])  # Retry-After starts at 1 s
    assert m.codes[429] == 6 and m.per_second[0] == 10
    # Once the seats are free again, requests pass.
    assert m.request(1.0, "get leases")[0] == fs.OK


def test_requests_admitted_out_of_time_order_use_the_seats_left_earlier() -> None:
    m = api(seats=1, queue_capacity=1000)
    assert m.request(5.0, "x")[:2] == (fs.OK, pytest.approx(5.01))
    assert m.request(1.0, "x")[:2] == (fs.OK, pytest.approx(1.01))  # not queued behind the later one


def test_a_request_waiting_past_the_wait_limit_is_rejected_then() -> None:
    m = fs.ApiModel(fs.parse_latency("const:1.0"), random.Random(0), seats=1, queue_capacity=100,
                    wait_limit=2.5)
    assert [m.request(0.0, "x")[0] for _ in range(3)] == [fs.OK, fs.OK, fs.OK]  # starts 0, 1, 2
    result, when, retry_after = m.request(0.0, "x")                           # would start at 3
    assert (result, when, retry_after) == (fs.THROTTLED, pytest.approx(2.5 + fs.REFUSED_TIME), 1.0)


def test_retry_after_grows_under_sustained_drops_and_decays() -> None:
    ra = fs.RetryAfter()
    for sec in range(6):
        for _ in range(50):
            value = ra.dropped(sec + 0.5)
    assert value >= 4                      # doubled more than once, but never at every second
    assert ra.value <= fs.RetryAfter.MAX
    high = ra.value
    for sec in range(100, 140):            # a drop now and then: back down, one second at a time
        ra.dropped(sec)
    assert ra.value < high and ra.value >= 1


def test_outage_refuses_and_drops_requests_in_flight() -> None:
    m = api(seats=0, outages=[(10.0, 20.0)])
    assert m.request(12.0, "x")[0] == fs.DOWN
    assert m.request(9.995, "x")[:2] == (fs.DOWN, 10.0)  # would finish at 10.005: cut
    assert m.request(20.0, "x")[0] == fs.OK
    assert m.refused == 1


def test_latency_kinds_and_bad_spec() -> None:
    rng = random.Random(3)
    assert fs.parse_latency("const:0.2")(rng) == 0.2
    assert 0.1 <= fs.parse_latency("uniform:0.1:0.3")(rng) <= 0.3
    assert fs.parse_latency("lognormal:0.004:0")(rng) == pytest.approx(0.004)
    assert fs.parse_latency("exp:0.01")(rng) >= 0
    for bad in ("gamma:1", "const", "lognormal:1", "const:-1", "const:x"):
        with pytest.raises(ValueError, match="--latency"):
            fs.parse_latency(bad)


def args(*extra: str) -> object:
    return fs.parser().parse_args(["--agents", "40", "--ramp", "2", "--steady", "60", "--outage", "30",
                                   "--tail", "5", *extra])


def test_defaults_are_the_agents_own() -> None:
    d = fs.agent_defaults()
    a = fs.parser().parse_args([])
    assert (a.lease, a.renew, a.resync, a.backoff_max) == (d["lease"], d["renew"], d["resync"],
                                                           d["backoff_max"])
    assert d["renew"] < d["lease"]


def test_small_fleet_registers_backs_off_in_an_outage_and_reconverges() -> None:
    a = args()
    r = fs.simulate(a)  # type: ignore[arg-type]
    assert r.registered_in is not None
    # Steady state: about one lease renewal per renew period per agent, plus resync and watch.
    assert 60 / a.renew * 0.9 < r.steady_rpm < 60 / (0.8 * a.renew) + 2
    # Every agent came back after the outage, within the backoff cap plus a few requests.
    assert r.recovery is not None and r.recovery <= a.backoff_max + 5
    # During the outage nothing reached the server, so nothing was served in those seconds.
    assert all(n == 0 for s, n in r.series if r.outage_at + 0.5 < s < r.outage_at + r.outage - 0.5)


def test_a_run_is_deterministic_given_the_seed() -> None:
    one, two = fs.simulate(args()), fs.simulate(args())  # type: ignore[arg-type]
    assert (one.series, one.recovery, one.steady_rpm) == (two.series, two.recovery, two.steady_rpm)
    other = fs.simulate(args("--seed", "2"))  # type: ignore[arg-type]
    assert other.series != one.series


def test_a_tight_rate_limit_answers_429_and_the_fleet_still_converges() -> None:
    r = fs.simulate(args("--seats", "1", "--latency", "const:0.05", "--hand-size", "1",  # type: ignore[arg-type]
                         "--queue-length", "2"))
    assert r.throttled_total > 0
    assert r.recovery is not None


def test_after_an_outage_each_agent_renews_and_watches_again_without_listing() -> None:
    """As the agent does: the registrar retries its renewal as a renewal (one write), and the group
    watch the outage broke resumes from its resourceVersion (one watch, no list): about two requests
    per agent, where a full convergence and a list + watch took five."""
    r = fs.simulate(args())  # type: ignore[arg-type]
    assert r.recovery is not None
    assert r.agents <= r.recovery_requests < 3 * r.agents  # (a watch may resume after the last renewal)
    series = dict(r.series)
    back = int(r.outage_at + r.outage)
    assert sum(series.get(s, 0) for s in range(back, back + 25)) >= 2 * r.agents


def test_what_if_retry_after_jitter_spreads_above_retry_after() -> None:
    b = fs.RetryAfterJitterBackoff(0.5, 30.0, random.Random(1))
    b.attempts = 10  # the ceiling is the cap
    delays = [b.next_delay(30.0) for _ in range(50)]
    assert all(30.0 <= d <= 60.0 for d in delays) and len(set(delays)) == 50
    today = fs.Backoff(0.5, 30.0, random.Random(1), attempts=10)
    assert {today.next_delay(30.0) for _ in range(50)} == {30.0}  # every agent at the same moment
