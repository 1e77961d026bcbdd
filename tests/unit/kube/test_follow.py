"""The follower's watch loop (agent.kube.follow) over a scripted Target: the timeouts it asks for and
where each watch starts. Against the API emulator: tests/integration/kube/test_follow.py."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from agent.kube.errors import Unavailable
from agent.kube.follow import Follower, Target


class Script:
    """A Target whose watches each see one change (a new resourceVersion) and end; the Nth breaks."""

    def __init__(self, watches: int, breaks: tuple[int, ...] = ()) -> None:
        self.watches, self.breaks = watches, breaks
        self.calls: list[tuple[str | None, int]] = []
        self.reads = 0
        self.follower: Follower | None = None

    def read(self) -> tuple[dict[str, Any] | None, str]:
        self.reads += 1
        return {"metadata": {"resourceVersion": "r0"}}, "r0"

    def watch(self, rv: str | None, timeout: int) -> Iterator[tuple[str, dict[str, Any]]]:
        self.calls.append((rv, timeout))
        n = len(self.calls)
        if n >= self.watches:
            assert self.follower is not None
            self.follower.stop()
        yield "MODIFIED", {"metadata": {"resourceVersion": f"r{n}"}}
        if n in self.breaks:
            raise Unavailable("watch", "x", None, "connection reset")

    def follow(self, **kw: Any) -> Follower:
        from agent.retry import Backoff
        self.follower = Follower(Target("x", self.watch, self.read), seen=lambda o: None, gone=lambda: None,
                                 backoff=Backoff(0.0, 0.0), **kw)
        return self.follower


def test_jittered_timeouts_are_drawn_in_t_to_2t() -> None:
    s = Script(300)
    s.follow(watch_timeout=300, jitter=True, resume=True, rng=random.Random(1)).run()
    timeouts = [t for _, t in s.calls]
    assert all(300 <= t <= 600 for t in timeouts)
    assert min(timeouts) < 330 and max(timeouts) > 570 and len(set(timeouts)) > 150  # spread over the range


def test_without_jitter_every_watch_asks_for_the_same_timeout() -> None:
    s = Script(20)
    s.follow(watch_timeout=300).run()
    assert {t for _, t in s.calls} == {300}


def test_resume_watches_on_from_the_last_version_after_an_end_and_a_break() -> None:
    s = Script(6, breaks=(2, 4))
    s.follow(watch_timeout=300, resume=True, jitter=True, rng=random.Random(2)).run()
    assert s.reads == 1
    assert [rv for rv, _ in s.calls] == ["r0", "r1", "r2", "r3", "r4", "r5"]


def test_without_resume_each_watch_follows_a_read() -> None:
    s = Script(4, breaks=(2,))
    s.follow(watch_timeout=300).run()
    assert s.reads == 4 and [rv for rv, _ in s.calls] == ["r0"] * 4
