"""The relay's orderer against a fake Postfix queue: hold while the customer is down, release
oldest first one at a time when it is back, release expired mail, give everything back."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailtower.relay.order import Orderer, Queued, duration_s
from mailtower.settings import Customer

CUSTOMER = Customer(domain="customer1.example", server="10.0.0.5")
OTHER = Customer(domain="other.example", server="10.0.0.6")
DOWN = "connect to 10.0.0.5[10.0.0.5]:25: Connection refused"


class FakePostfix:
    """A queue Postfix would keep; ``deliver`` decides what a released message does."""

    def __init__(self, lifetime_s: int = 3 * 86400) -> None:
        self.entries: dict[str, Queued] = {}
        self.delivered: list[str] = []
        self.customer_up = False
        self.lifetime = lifetime_s
        self.calls: list[tuple[str, str]] = []

    def add(self, queue_id: str, arrival: int, rcpt: str, reason: str = DOWN) -> None:
        self.entries[queue_id] = Queued(queue_id, "deferred", arrival, ((rcpt, reason),))

    def queue(self) -> list[Queued]:
        return list(self.entries.values())

    def hold(self, queue_id: str) -> None:
        self.calls.append(("hold", queue_id))
        e = self.entries[queue_id]
        self.entries[queue_id] = Queued(e.queue_id, "hold", e.arrival, e.recipients)

    def release(self, queue_id: str) -> None:
        self.calls.append(("release", queue_id))
        e = self.entries[queue_id]
        if self.customer_up:
            del self.entries[queue_id]
            self.delivered.append(queue_id)
        else:
            self.entries[queue_id] = Queued(e.queue_id, "deferred", e.arrival, e.recipients)

    def lifetime_s(self) -> int:
        return self.lifetime

    def where(self, queue_id: str) -> str | None:
        entry = self.entries.get(queue_id)
        return entry.queue if entry else None


@pytest.fixture
def postfix() -> FakePostfix:
    return FakePostfix()


class Clock:
    """Time that passes only when the orderer sleeps."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _orderer(postfix: FakePostfix, tmp_path: Path, now: float = 1000.0) -> Orderer:
    clock = Clock(now)
    return Orderer(
        [CUSTOMER, OTHER],
        postfix,
        probe=lambda c: postfix.customer_up if c is CUSTOMER else True,
        state=tmp_path / "state.json",
        step_timeout_s=5.0,
        clock=clock,
        sleep=clock.sleep,
    )


def test_deferred_mail_is_held_while_the_customer_is_down(postfix, tmp_path) -> None:
    for i, qid in enumerate(["C", "A", "B"]):
        postfix.add(qid, 100 + i, "u@customer1.example")
    orderer = _orderer(postfix, tmp_path)
    orderer.step()
    assert {e.queue for e in postfix.queue()} == {"hold"}
    assert orderer.held == {"A", "B", "C"}


def test_back_up_releases_oldest_first_one_at_a_time(postfix, tmp_path) -> None:
    arrivals = {"Q9": 103, "Q1": 101, "Q5": 102, "Q0": 104}
    for qid, t in arrivals.items():
        postfix.add(qid, t, "u@customer1.example")
    orderer = _orderer(postfix, tmp_path)
    orderer.step()
    postfix.customer_up = True
    orderer.step()
    assert postfix.delivered == sorted(arrivals, key=arrivals.get)
    assert orderer.held == set() and postfix.entries == {}


def test_down_again_keeps_the_rest_held_in_order(postfix, tmp_path) -> None:
    for i in range(3):
        postfix.add(f"M{i}", 100 + i, "u@customer1.example")
    orderer = _orderer(postfix, tmp_path)
    orderer.step()
    # The probe says up, but the first delivery fails: it is deferred again.
    orderer.probe = lambda c: True
    orderer.step()
    assert postfix.delivered == []
    assert orderer.held == {"M0", "M1", "M2"}  # M0 held again, M1 and M2 never released
    assert [c for c in postfix.calls if c[0] == "release"] == [("release", "M0")]


def test_other_deferrals_are_left_to_postfix(postfix, tmp_path) -> None:
    postfix.add("S", 100, "u@customer1.example", reason="lost connection with 127.0.0.1[127.0.0.1]")
    postfix.add("O", 100, "u@other.example", reason="connect to 10.0.0.6[10.0.0.6]:25: refused")
    orderer = _orderer(postfix, tmp_path)
    orderer.step()
    assert postfix.calls == []  # a scanner tempfail, and a customer that answers


def test_expired_mail_is_released_for_postfix_to_return(postfix, tmp_path) -> None:
    postfix.lifetime = 20
    postfix.add("OLD", 100, "u@customer1.example")
    orderer = _orderer(postfix, tmp_path, now=110)
    orderer.step()
    assert postfix.entries["OLD"].queue == "hold"
    orderer.clock.now = 121.0  # type: ignore[attr-defined]
    orderer.step()
    assert ("release", "OLD") in postfix.calls
    assert "OLD" not in orderer.held


def test_state_survives_a_restart_and_release_all_gives_back_only_its_own(
    postfix, tmp_path
) -> None:
    postfix.add("MINE", 100, "u@customer1.example")
    _orderer(postfix, tmp_path).step()
    postfix.entries["OPS"] = Queued("OPS", "hold", 50, (("x@other.example", ""),))  # an operator's
    again = _orderer(postfix, tmp_path)
    assert again.held == {"MINE"}
    assert again.release_all() == 1
    assert postfix.entries["OPS"].queue == "hold"
    assert postfix.entries["MINE"].queue == "deferred"
    assert _orderer(postfix, tmp_path).held == set()


@pytest.mark.parametrize(("value", "seconds"), [("3d", 259200), ("20s", 20), ("5", 432000)])
def test_postfix_durations(value: str, seconds: int) -> None:
    assert duration_s(value) == seconds


def test_bad_duration() -> None:
    with pytest.raises(ValueError):
        duration_s("soon")
