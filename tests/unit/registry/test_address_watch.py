"""The address watcher's decisions, one look at a time: a new address counts when two looks in a row
see it; no address at all changes nothing."""

from __future__ import annotations

import pytest

from agent.registry.address import AddressError
from agent.registry.address_part import AddressChanged, AddressWatcher


class Seen:
    """What the system shows at each look (an address, or an AddressError for none)."""

    def __init__(self, *answers: str | AddressError) -> None:
        self.answers = list(answers)
        self.keeps: list[str | None] = []

    def __call__(self, keep: str | None) -> str:
        self.keeps.append(keep)
        answer = self.answers.pop(0)
        if isinstance(answer, AddressError):
            raise answer
        return answer


def test_a_new_address_is_confirmed_by_the_next_look() -> None:
    posted: list[object] = []
    seen = Seen("10.0.0.1", "10.0.0.2", "10.0.0.2", "10.0.0.2")
    w = AddressWatcher(seen, "10.0.0.1", 5.0, posted.append)
    assert w.look() is None and w.look() is None  # unchanged; then seen once
    change = w.look()
    assert change == AddressChanged("10.0.0.1", "10.0.0.2") and posted == [change]
    assert w.look() is None and w.current == "10.0.0.2"
    assert seen.keeps == ["10.0.0.1", "10.0.0.1", "10.0.0.1", "10.0.0.2"]  # the address in use is kept


def test_a_flicker_or_no_address_changes_nothing() -> None:
    posted: list[object] = []
    none = AddressError("no default route with a usable IP address")
    seen = Seen("10.0.0.9", "10.0.0.1", none, none, "10.0.0.9", none, "10.0.0.9", "10.0.0.9")
    w = AddressWatcher(seen, "10.0.0.1", 5.0, posted.append)
    for _ in range(6):
        assert w.look() is None
    assert posted == [] and w.current == "10.0.0.1"
    assert w.look() is None  # seen once more: a candidate again
    assert w.look() == AddressChanged("10.0.0.1", "10.0.0.9")


def test_the_thread_posts_and_stops() -> None:
    import queue

    q: queue.SimpleQueue[object] = queue.SimpleQueue()
    seen = Seen(*(["10.0.0.2"] * 1000))
    w = AddressWatcher(seen, "10.0.0.1", 0.01, q.put).start()
    try:
        assert q.get(timeout=10) == AddressChanged("10.0.0.1", "10.0.0.2")
    finally:
        w.stop()
    assert not w._thread.is_alive()


def test_after_a_reload_the_first_answer_counts_at_once() -> None:
    posted: list[object] = []
    seen = Seen("203.0.113.7", "203.0.113.8", "203.0.113.8")
    w = AddressWatcher(seen, "10.0.0.1", 60.0, posted.append, trust_first=True)
    assert w.look() == AddressChanged("10.0.0.1", "203.0.113.7")
    assert w.look() is None  # later changes need their second look again
    assert w.look() == AddressChanged("203.0.113.7", "203.0.113.8")


def test_without_an_address_the_first_one_found_counts_at_once() -> None:
    posted: list[object] = []
    none = AddressError("no default route with a usable IP address")
    seen = Seen(none, none, "10.0.0.7", "10.0.0.7", "10.0.0.8")
    w = AddressWatcher(seen, None, 5.0, posted.append)
    assert w.look() is None and w.look() is None and posted == []
    assert w.look() == AddressChanged(None, "10.0.0.7")  # no second look: nothing to flicker away from
    assert w.look() is None and w.current == "10.0.0.7"
    assert w.look() is None  # from here on, a new address needs two looks again
    assert seen.keeps == [None, None, None, "10.0.0.7", "10.0.0.7"]


def test_a_watch_that_only_waits_ends_with_the_first_address(monkeypatch: pytest.MonkeyPatch) -> None:
    import queue

    from agent.registry import address_part

    q: queue.SimpleQueue[object] = queue.SimpleQueue()
    none = AddressError("no default route with a usable IP address")
    seen = Seen(none, "10.0.0.3", *(["10.0.0.4"] * 100))
    monkeypatch.setattr(address_part, "WAITING_EVERY", 0.01)
    # interval 1000 s: a watch that went on after the first address would still be waiting
    w = AddressWatcher(seen, None, 1000.0, q.put, until_found=True).start()
    try:
        assert q.get(timeout=10) == AddressChanged(None, "10.0.0.3")
        w._thread.join(10)
        assert not w._thread.is_alive() and len(seen.answers) == 100
    finally:
        w.stop()
