"""The relay's orderer against a fake Postfix queue: hold while the customer is down, release
oldest first one at a time when it is back, return mail older than its customer's retention,
give everything back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mailtower.relay.order import Orderer, Queued, RealPostfix, duration_s
from mailtower.relay.retention import Retention
from mailtower.settings import Customer

CUSTOMER = Customer(domain="customer1.example", server="10.0.0.5")
OTHER = Customer(domain="other.example", server="10.0.0.6")
DOWN = "connect to 10.0.0.5[10.0.0.5]:25: Connection refused"
DAY = 86400


class FakePostfix:
    """A queue Postfix would keep; ``deliver`` decides what a released message does."""

    def __init__(self, lifetime_s: int = 3 * 86400) -> None:
        self.entries: dict[str, Queued] = {}
        self.delivered: list[str] = []
        self.customer_up = False
        self.lifetime = lifetime_s
        self.calls: list[tuple[str, str]] = []
        self.returned: list[str] = []  # force-expired and retried: back to the sender

    def add(self, queue_id: str, arrival: int, *rcpts: str, reason: str = DOWN) -> None:
        self.entries[queue_id] = Queued(
            queue_id, "deferred", arrival, tuple((r, reason) for r in rcpts)
        )

    def queue(self) -> list[Queued]:
        return list(self.entries.values())

    def hold(self, queue_id: str) -> None:
        self.calls.append(("hold", queue_id))
        e = self.entries[queue_id]
        self.entries[queue_id] = Queued(e.queue_id, "hold", e.arrival, e.recipients)

    def release(self, queue_id: str, *, retry: bool = True) -> None:
        self.calls.append(("release", queue_id))
        e = self.entries[queue_id]
        if retry and self.customer_up:
            del self.entries[queue_id]
            self.delivered.append(queue_id)
        else:
            self.entries[queue_id] = Queued(e.queue_id, "deferred", e.arrival, e.recipients)

    def expire(self, queue_id: str) -> None:
        """Postfix's queue manager returns a force-expired message at the attempt made now;
        a held one it would not touch."""
        self.calls.append(("expire", queue_id))
        assert self.entries[queue_id].queue == "deferred", "Postfix returns no held mail"
        del self.entries[queue_id]
        self.returned.append(queue_id)

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


def _orderer(
    postfix: FakePostfix, tmp_path: Path, now: float = 1000.0, retention: Retention | None = None
) -> Orderer:
    clock = Clock(now)
    return Orderer(
        [CUSTOMER, OTHER],
        postfix,
        retention=retention,
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


def test_mail_past_the_towers_lifetime_is_released_and_returned(postfix, tmp_path) -> None:
    postfix.lifetime = 20  # maximal_queue_lifetime below every customer's retention
    postfix.add("OLD", 100, "u@customer1.example")
    orderer = _orderer(postfix, tmp_path, now=110)
    orderer.step()
    assert postfix.entries["OLD"].queue == "hold"
    orderer.clock.now = 121.0  # type: ignore[attr-defined]
    orderer.step()
    assert postfix.calls[-2:] == [("release", "OLD"), ("expire", "OLD")]
    assert postfix.returned == ["OLD"]
    assert "OLD" not in orderer.held and orderer.expired_total == 1


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


# -- retention: each customer's store-and-forward time ---------------------------------------


class Sql:
    """The tower's SQL as the orderer reads it: rows of (domain, retention_days), or down."""

    def __init__(self, rows: list[tuple[str, str | None]]) -> None:
        self.rows = rows
        self.up = True
        self.reads = 0

    def __call__(self) -> list[tuple[str, str | None]]:
        self.reads += 1
        if not self.up:
            raise OSError("connection to server at 10.0.0.20, port 5432 failed: refused")
        return self.rows


class Ticks:
    """A monotonic clock for the SQL refresh that moves only when told."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _retention(rows: list[tuple[str, str | None]], tmp_path: Path) -> tuple[Retention, Sql, Ticks]:
    sql, ticks = Sql(rows), Ticks()
    return Retention(sql, cache=tmp_path / "retention.json", clock=ticks), sql, ticks


RETENTION = [
    ("customer1.example", "1"),
    ("other.example", None),  # no policies row: the default, 3 days
    ("weekly.example", "7"),
    ("goc-only.example", "1"),  # a customer the GOC added since the last tower deploy
]
NOW = 100 * DAY


def test_a_one_day_customers_mail_is_returned_after_two_days(postfix, tmp_path) -> None:
    postfix.lifetime = 14 * DAY
    postfix.add("ONE", NOW - 2 * DAY, "u@customer1.example")
    postfix.add("THREE", NOW - 2 * DAY, "u@other.example", reason="")
    retention, _, _ = _retention(RETENTION, tmp_path)
    orderer = _orderer(postfix, tmp_path, now=NOW, retention=retention)
    orderer.step()
    assert postfix.returned == ["ONE"]
    assert ("expire", "THREE") not in postfix.calls and "THREE" in postfix.entries
    assert orderer.expired_total == 1


def test_expiry_force_expires_then_retries_now() -> None:
    """``postsuper -e`` marks the message, ``postqueue -i`` makes the attempt that returns it
    (without it Postfix would wait for the message's next retry)."""
    ran: list[tuple[str, ...]] = []
    real = RealPostfix()
    real._run = lambda *args: ran.append(args) or ""  # type: ignore[method-assign]
    real.expire("4AbC1")
    assert ran == [("postsuper", "-e", "4AbC1"), ("postqueue", "-i", "4AbC1")]
    ran.clear()
    real.release("4AbC1", retry=False)
    real.expire("4AbC1")
    assert ran == [
        ("postsuper", "-H", "4AbC1"),
        ("postsuper", "-e", "4AbC1"),
        ("postqueue", "-i", "4AbC1"),
    ]


def test_the_most_generous_customer_decides_for_a_shared_message(postfix, tmp_path) -> None:
    postfix.lifetime = 14 * DAY
    postfix.add("BOTH", NOW - 2 * DAY, "a@customer1.example", "b@weekly.example", reason="")
    postfix.add("BOTH_OLD", NOW - 7 * DAY, "a@customer1.example", "b@weekly.example", reason="")
    retention, _, _ = _retention(RETENTION, tmp_path)
    orderer = _orderer(postfix, tmp_path, now=NOW, retention=retention)
    orderer.step()
    assert postfix.returned == ["BOTH_OLD"]
    assert retention.lifetime_s(["customer1.example", "weekly.example"], 14 * DAY) == 7 * DAY


def test_the_towers_lifetime_caps_every_retention(tmp_path) -> None:
    retention, _, _ = _retention(RETENTION, tmp_path)
    retention.refresh()
    assert retention.lifetime_s(["weekly.example"], 5 * DAY) == 5 * DAY
    assert retention.lifetime_s(["customer1.example"], 5 * DAY) == 1 * DAY


def test_mail_held_here_is_released_before_it_is_returned(postfix, tmp_path) -> None:
    postfix.lifetime = 14 * DAY
    postfix.add("HELD", NOW - 20 * 3600, "u@customer1.example")  # customer down: held
    retention, _, _ = _retention(RETENTION, tmp_path)
    orderer = _orderer(postfix, tmp_path, now=NOW, retention=retention)
    orderer.step()
    assert postfix.entries["HELD"].queue == "hold" and orderer.held == {"HELD"}
    orderer.clock.now = NOW + 5 * 3600  # type: ignore[attr-defined]
    orderer.step()
    assert postfix.calls == [("hold", "HELD"), ("release", "HELD"), ("expire", "HELD")]
    assert postfix.returned == ["HELD"] and orderer.held == set()
    assert json.loads((tmp_path / "state.json").read_text()) == []


def test_an_operators_hold_and_mail_on_its_way_back_are_left_alone(postfix, tmp_path) -> None:
    postfix.lifetime = 14 * DAY
    old = NOW - 10 * DAY
    postfix.entries["OPS"] = Queued("OPS", "hold", old, (("u@customer1.example", ""),))
    postfix.entries["GOING"] = Queued(
        "GOING", "deferred", old, (("u@customer1.example", ""),), forced_expire=True
    )
    postfix.entries["NOW"] = Queued("NOW", "active", old, (("u@customer1.example", ""),))
    retention, _, _ = _retention(RETENTION, tmp_path)
    _orderer(postfix, tmp_path, now=NOW, retention=retention).step()
    assert postfix.calls == []


def test_a_customer_known_only_to_sql_gets_its_retention(postfix, tmp_path) -> None:
    """The orderer's customers come from the settings; retention from SQL, for any domain."""
    postfix.lifetime = 14 * DAY
    postfix.add("GOC", NOW - 2 * DAY, "u@goc-only.example", reason="")
    postfix.add("STRANGER", NOW - 2 * DAY, "u@unknown.example", reason="")
    postfix.add("STRANGER_OLD", NOW - 3 * DAY, "u@unknown.example", reason="")
    retention, _, _ = _retention(RETENTION, tmp_path)
    _orderer(postfix, tmp_path, now=NOW, retention=retention).step()
    assert sorted(postfix.returned) == ["GOC", "STRANGER_OLD"]  # unknown domain: 3 days


def test_sql_down_keeps_the_last_values_and_says_so_once(postfix, tmp_path, caplog) -> None:
    postfix.lifetime = 14 * DAY
    retention, sql, ticks = _retention(RETENTION, tmp_path)
    orderer = _orderer(postfix, tmp_path, now=NOW, retention=retention)
    orderer.step()
    sql.up = False
    postfix.add("WEEK", NOW - 4 * DAY, "u@weekly.example", reason="")  # the default would expire
    for _ in range(3):
        ticks.now += 31
        orderer.step()
    assert sql.reads == 4
    assert postfix.returned == [] and "WEEK" in postfix.entries
    failed = [r for r in caplog.records if "event=retention_sql_failed" in r.getMessage()]
    assert len(failed) == 1
    # SQL back with a new value: it applies at the next refresh, not before.
    sql.up, sql.rows = True, [("weekly.example", "2")]
    orderer.step()
    assert postfix.returned == []
    ticks.now += 31
    orderer.step()
    assert postfix.returned == ["WEEK"]


def test_the_last_values_survive_a_restart_with_sql_down(tmp_path) -> None:
    first, _, _ = _retention(RETENTION, tmp_path)
    first.refresh()
    again, sql, _ = _retention(RETENTION, tmp_path)
    sql.up = False
    again.refresh()
    assert again.lifetime_s(["weekly.example"], 14 * DAY) == 7 * DAY


def test_before_sql_ever_answers_the_towers_lifetime_applies(tmp_path) -> None:
    retention, sql, _ = _retention(RETENTION, tmp_path)
    sql.up = False
    retention.refresh()
    assert retention.days is None
    # Nothing expired early: the tower's own lifetime until SQL has answered once.
    assert retention.lifetime_s(["customer1.example"], 14 * DAY) == 14 * DAY
    assert retention.lifetime_s(["weekly.example"], 2 * DAY) == 2 * DAY


@pytest.mark.parametrize("value", ["0", "15", "2.5", "three", "", "-1", "true"])
def test_an_invalid_retention_never_expires_early(tmp_path, value) -> None:
    """Unreadable (a newer GOC's 30, a typo): the value read before, else the tower's own
    lifetime — never a default shorter than what the customer asked for."""
    rows = [("bad.example", "9"), ("new.example", value), ("good.example", "14")]
    retention, sql, ticks = _retention(rows, tmp_path)
    retention.refresh()
    assert retention.lifetime_s(["new.example"], 14 * DAY) == 14 * DAY
    assert retention.lifetime_s(["good.example"], 14 * DAY) == 14 * DAY
    sql.rows = [("bad.example", value), ("good.example", "14")]
    ticks.now += 31
    retention.refresh()
    assert retention.days is not None and retention.days["bad.example"] == 9


def test_sql_is_read_every_thirty_seconds_not_every_pass(tmp_path) -> None:
    retention, sql, ticks = _retention(RETENTION, tmp_path)
    for _ in range(10):
        retention.refresh()
        ticks.now += 2
    assert sql.reads == 1
    ticks.now += 11
    retention.refresh()
    assert sql.reads == 2


def test_postqueue_json_forced_expire() -> None:
    entry = {
        "queue_name": "deferred",
        "queue_id": "4AbC1",
        "arrival_time": 1700000000,
        "forced_expire": True,
        "recipients": [{"address": "U@Customer1.Example", "delay_reason": DOWN}],
    }
    queued = Queued.from_json(entry)
    assert queued.forced_expire and queued.domains == ["customer1.example"]
    assert not Queued.from_json({**entry, "forced_expire": False}).forced_expire


def test_a_notice_in_transit_is_left_to_postfixs_bounce_lifetime(postfix, tmp_path) -> None:
    postfix.lifetime = 14 * DAY
    postfix.add("NOTICE", NOW - 2 * DAY, "u@customer1.example")
    e = postfix.entries["NOTICE"]
    postfix.entries["NOTICE"] = Queued(e.queue_id, e.queue, e.arrival, e.recipients, sender="")
    postfix.add("MAIL", NOW - 2 * DAY, "v@customer1.example")
    retention, _, _ = _retention(RETENTION, tmp_path)
    _orderer(postfix, tmp_path, now=NOW, retention=retention).step()
    assert postfix.returned == ["MAIL"]
