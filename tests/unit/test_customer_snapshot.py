"""The customers' policy snapshot: from SQL, to the file, and as scand reads it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from scand_fakes import make_settings

from mailtower.customers import snapshot as snapshot_mod
from mailtower.customers.policy import DEFAULT, parse
from mailtower.customers.snapshot import Snapshot, SnapshotError
from mailtower.scand.policies import Poller, PollerCollector, SnapshotFile


class FakeSQL:
    """Stands in for a psycopg connection to the tower's SQL: the change check's answer and
    the rows of the load query; ``down`` makes every query fail."""

    def __init__(self, rows: list[tuple[str, str, Any]], check: str = "c1") -> None:
        self.rows, self.check, self.down = rows, check, False
        self.loads = 0

    def cursor(self) -> FakeSQL:
        return self

    def __enter__(self) -> FakeSQL:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def execute(self, query: str, params: object = None) -> None:
        if self.down:
            raise OSError("connection refused")
        self._last = query

    def fetchone(self) -> tuple[str]:
        return (self.check,)

    def fetchall(self) -> list[tuple[str, str, Any]]:
        assert self._last == snapshot_mod.LOAD_QUERY
        self.loads += 1
        return list(self.rows)

    def close(self) -> None:
        pass


ROWS = [
    ("a.example", "alpha", {"ban_extensions": ["pdf"]}),
    ("a2.example", "alpha", {"ban_extensions": ["pdf"]}),
    ("b.example", "beta", None),
]


def test_lookup_by_recipient_domain_any_case() -> None:
    snap = snapshot_mod.load(FakeSQL(ROWS), None)
    assert snap.lookup("Bob@A2.Example") == ("alpha", parse({"ban_extensions": ["pdf"]}))
    assert snap.lookup("carol@b.example") == ("beta", DEFAULT)
    assert snap.lookup("dave@elsewhere.example") == (None, DEFAULT)
    assert snap.generation == 1 and snap.invalid == ()


def test_the_file_round_trips_and_validates_again(tmp_path: Path) -> None:
    snap = snapshot_mod.load(FakeSQL(ROWS), None, check="c1", now=1000.0)
    path = tmp_path / "policies.json"
    snap.write(path)
    assert snapshot_mod.read(path) == snap
    doc = json.loads(path.read_bytes())
    doc["policies"]["alpha"] = {"ban_extensions": ["not an extension!"]}
    path.write_text(json.dumps(doc))
    with pytest.raises(SnapshotError, match="alpha"):
        snapshot_mod.read(path)
    path.write_text('{"format": 99}')
    with pytest.raises(SnapshotError, match="format"):
        snapshot_mod.read(path)


def test_an_invalid_policy_keeps_the_customers_previous_one() -> None:
    sql = FakeSQL(ROWS)
    first = snapshot_mod.load(sql, None)
    sql.rows = [
        ("a.example", "alpha", {"suspicious": "sometimes"}),
        ("b.example", "beta", {"ban_extensions": ["doc"]}),
        ("c.example", "gamma", {"no_such_field": 1}),
    ]
    second = snapshot_mod.load(sql, first)
    assert second.policies["alpha"] == first.policies["alpha"]  # kept
    assert second.policies["beta"] == parse({"ban_extensions": ["doc"]})  # changed
    assert "gamma" not in second.policies  # never had a valid one: none, not the default
    assert second.lookup("x@c.example") == ("gamma", None)
    assert second.lookup("x@b.example")[1] == parse({"ban_extensions": ["doc"]})
    assert set(second.invalid) == {"alpha", "gamma"}
    assert snapshot_mod.Snapshot.from_json(second.to_json()).lookup("x@c.example")[1] is None
    assert second.generation == 2


def _settings(tmp_path: Path, *, snapshot: bool = False) -> Any:
    return make_settings(tmp_path / "spool", reinject_port=1, policy_snapshot=snapshot)


def test_the_poller_writes_on_change_only(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    sql = FakeSQL(ROWS)
    poller = Poller(settings, connect=lambda dsn: sql)
    path = Path(settings.policy_snapshot)
    assert poller.poll_once()
    inode = os.stat(path).st_ino
    assert snapshot_mod.read(path).domains["a.example"] == "alpha"
    assert poller.poll_once() and sql.loads == 1 and os.stat(path).st_ino == inode
    sql.check, sql.rows = "c2", [("b.example", "beta", None)]
    assert poller.poll_once() and sql.loads == 2
    assert snapshot_mod.read(path).domains == {"b.example": "beta"}
    assert snapshot_mod.read(path).generation == 2


def test_a_removed_or_broken_file_is_written_again(tmp_path: Path) -> None:
    """A restarted worker must find it: the poller does not wait for SQL to change."""
    settings = _settings(tmp_path)
    poller = Poller(settings, connect=lambda dsn: FakeSQL(ROWS))
    path = Path(settings.policy_snapshot)
    assert poller.poll_once()
    path.unlink()
    assert poller.poll_once()
    assert snapshot_mod.read(path).domains["a.example"] == "alpha"
    path.write_text("{broken")
    assert poller.poll_once()
    assert snapshot_mod.read(path).domains["a.example"] == "alpha"


def test_sql_down_keeps_the_file_and_a_restart_keeps_previous_policies(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    sql = FakeSQL(ROWS)
    assert Poller(settings, connect=lambda dsn: sql).poll_once()
    sql.down = True
    restarted = Poller(settings, connect=lambda dsn: sql)  # reads the file it left
    assert not restarted.poll_once() and restarted.errors == 1
    assert snapshot_mod.read(Path(settings.policy_snapshot)).generation == 1
    sql.down, sql.check = False, "c2"
    sql.rows = [("a.example", "alpha", {"max_message_bytes": 5})]  # invalid
    assert restarted.poll_once()
    snap = snapshot_mod.read(Path(settings.policy_snapshot))
    assert snap.policies["alpha"] == parse({"ban_extensions": ["pdf"]})
    assert snap.invalid == ("alpha",) and restarted.invalid_found == 1
    metrics = {m.name: m.samples[0].value for m in PollerCollector(restarted).collect()}
    assert metrics["mailtower_policy_snapshot_generation"] == 2
    assert metrics["mailtower_policy_customers"] == 1
    assert metrics["mailtower_policy_invalid_customers"] == 1
    assert metrics["mailtower_policy_poll_errors"] == 1
    assert 0 <= metrics["mailtower_policy_snapshot_age_seconds"] < 60


def test_no_customers_in_sql_is_an_empty_snapshot(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    assert Poller(settings, connect=lambda dsn: FakeSQL([])).poll_once()
    assert SnapshotFile(Path(settings.policy_snapshot)).current() == Snapshot(
        generation=1,
        written_at=snapshot_mod.read(Path(settings.policy_snapshot)).written_at,
        check="c1",
    )


def test_the_file_is_reread_when_replaced_and_a_broken_one_keeps_the_last(
    tmp_path: Path,
) -> None:
    path = tmp_path / "policies.json"
    reader = SnapshotFile(path)
    assert reader.current() is None
    Snapshot(domains={"a.example": "alpha"}, policies={"alpha": DEFAULT}, generation=1).write(path)
    assert reader.current() is not None and reader.current().generation == 1  # type: ignore[union-attr]
    Snapshot(generation=2).write(path)
    assert reader.current().generation == 2  # type: ignore[union-attr]
    path.write_text("{broken")
    assert reader.current().generation == 2  # type: ignore[union-attr]
    path.unlink()
    assert reader.current().generation == 2  # type: ignore[union-attr]


@pytest.mark.parametrize("path", ["policies.json", "/var/lib/mailtower/", "/"])
def test_the_snapshot_path_is_an_absolute_file(tmp_path: Path, path: str) -> None:
    from pydantic import ValidationError

    settings = _settings(tmp_path)
    with pytest.raises(ValidationError, match="policy_snapshot"):
        type(settings).model_validate({**settings.model_dump(mode="json"), "policy_snapshot": path})


def test_a_change_to_one_customer_parses_one_policy_again(monkeypatch) -> None:
    """The poller and every worker re-read all customers on any change; a policy text seen
    before is not validated again (10,000 customers on 46 lab scanners: docs/benchmarks.md)."""
    import json as json_mod

    from mailtower.customers import snapshot as snapshot_mod

    calls: list[str] = []
    real = snapshot_mod.parse
    monkeypatch.setattr(snapshot_mod, "parse", lambda text: calls.append(text) or real(text))
    # Texts other tests parsed (the SQL tests' too, when they run first) are not counted here.
    monkeypatch.setattr(snapshot_mod, "_PARSED", {})
    monkeypatch.setattr(snapshot_mod, "_TEXT", {})

    class Conn:
        def __init__(self, rows):
            self.rows = rows

        def cursor(self):
            conn = self

            class Cur:
                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    return None

                def execute(self, query):
                    return None

                def fetchall(self):
                    return conn.rows

            return Cur()

    rows = [
        (f"c{i}.example", f"c{i}", json_mod.dumps({"max_message_bytes": 7_000_000 + i}))
        for i in range(50)
    ]
    first = snapshot_mod.load(Conn(rows), None)
    seen = len(calls)
    rows[7] = ("c7.example", "c7", json_mod.dumps({"ban_extensions": ["rar"]}))
    second = snapshot_mod.load(Conn(rows), first)
    assert len(calls) - seen == 1  # only the changed one
    assert second.policies["c7"].ban_extensions == ("rar",)
    assert Snapshot.from_json(second.to_json()) == second
    assert len(calls) - seen == 1  # the file's texts were all seen already


def _check(n: int, removals: int = 0, nodes: str = "1/2/3", start: str = "100.5") -> str:
    return f"{n}/{removals}/{nodes}/{start}"


@pytest.mark.parametrize(
    ("previous", "now", "full", "mode"),
    [
        (None, _check(5), False, "full"),  # no snapshot yet
        (_check(5), _check(5), False, "none"),
        (_check(5), _check(5), True, "full"),  # the periodic reload, the file to rewrite
        (_check(5), _check(9), False, "delta"),  # rows written: the customers they touch
        (_check(5), _check(9), True, "full"),
        (_check(5), _check(5 + snapshot_mod.DELTA_MAX_WRITES), False, "delta"),
        (_check(5), _check(6 + snapshot_mod.DELTA_MAX_WRITES), False, "full"),  # a bulk change
        (_check(5), _check(9, removals=1), False, "full"),  # a delete, a rename
        (_check(5), _check(9, nodes="1/7/3"), False, "full"),  # a TRUNCATE
        (_check(5), _check(9, start="200.5"), False, "full"),  # another server, a restart
        (_check(9), _check(5), False, "full"),  # the generation went back
        ("5/1/2/3", _check(9), False, "full"),  # an older scanner's file
        (_check(5), "c2", False, "full"),
    ],
)
def test_plan_reads_everything_when_a_delta_cannot_tell(
    previous: str | None, now: str, full: bool, mode: str
) -> None:
    snap = None if previous is None else Snapshot(check=previous)
    assert snapshot_mod.plan(snap, now, full=full) == mode


class DeltaSQL(FakeSQL):
    """FakeSQL that also answers the delta query (``delta`` rows: domain, active, customer,
    policy) and records which loads ran."""

    def __init__(self, rows: list[tuple[str, str, Any]], check: str) -> None:
        super().__init__(rows, check)
        self.delta: list[tuple[str, bool, str, Any]] = []
        self.asked: list[tuple[str, object]] = []

    def execute(self, query: str, params: object = None) -> None:
        super().execute(query, params)
        if query != snapshot_mod.CHANGE_QUERY:
            self.asked.append(("full" if query == snapshot_mod.LOAD_QUERY else "delta", params))

    def fetchall(self) -> list[Any]:
        if self._last == snapshot_mod.DELTA_QUERY:
            return list(self.delta)
        return super().fetchall()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_poller_reads_a_change_as_a_delta_and_everything_now_and_then(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(tmp_path)
    sql, clock = DeltaSQL(ROWS, _check(5)), Clock()
    poller = Poller(settings, connect=lambda dsn: sql, clock=clock)
    path = Path(settings.policy_snapshot)
    caplog.set_level("INFO", logger="mailtower.scand")
    assert poller.poll_once() and sql.asked == [("full", None)]
    assert "mode=full" in caplog.text and "took_ms=" in caplog.text
    inode = os.stat(path).st_ino
    # beta's policy changed: only beta is read, and the file rewritten.
    sql.check = _check(7)
    sql.delta = [("b.example", True, "beta", '{"ban_extensions": ["rar"]}')]
    clock.now += 1
    assert poller.poll_once() and sql.asked[-1] == ("delta", {"since": 5})
    snap = snapshot_mod.read(path)
    assert snap.policies["beta"].ban_extensions == ("rar",) and snap.generation == 2
    assert snap.check == _check(7) and "mode=delta" in caplog.text
    assert snap.lookup("x@a2.example")[1] == parse({"ban_extensions": ["pdf"]})  # kept
    # A write that changes nothing scanned (a customer's created_at): no new file.
    inode = os.stat(path).st_ino
    sql.check = _check(8)
    assert poller.poll_once() and sql.asked[-1] == ("delta", {"since": 7})
    assert os.stat(path).st_ino == inode and poller.snapshot is not None
    assert poller.snapshot.check == _check(8) and poller.snapshot.generation == 2
    assert poller.poll_once() and sql.asked[-1] == ("delta", {"since": 7})  # nothing new
    # The periodic full reload: everything read, the file left alone when it agrees…
    sql.rows = [ROWS[0], ROWS[1], ("b.example", "beta", {"ban_extensions": ["rar"]})]
    clock.now += settings.policy_full_reload_s * 1.5  # the longest spread
    assert poller.poll_once() and sql.asked[-1] == ("full", None)
    assert os.stat(path).st_ino == inode and snapshot_mod.read(path).generation == 2
    # …and rewritten when it finds what a delta missed (a row written around the trigger).
    sql.rows = [ROWS[0], ("b.example", "beta", {"ban_extensions": ["rar"]})]
    clock.now += settings.policy_full_reload_s * 1.5  # the longest spread
    assert poller.poll_once() and sql.asked[-1] == ("full", None)
    assert "a2.example" not in snapshot_mod.read(path).domains
    assert snapshot_mod.read(path).generation == 3
    # A delete: the check's removals changed, everything read.
    sql.check, sql.rows = _check(9, removals=1), [ROWS[0]]
    clock.now += 1
    assert poller.poll_once() and sql.asked[-1] == ("full", None)
    assert snapshot_mod.read(path).domains == {"a.example": "alpha"}


def test_a_restarted_poller_keeps_a_file_that_agrees_with_sql(tmp_path: Path) -> None:
    """46 scanners restarted by a deploy do not make every worker re-read its file."""
    settings = _settings(tmp_path)
    sql = DeltaSQL(ROWS, _check(5))
    assert Poller(settings, connect=lambda dsn: sql).poll_once()
    path = Path(settings.policy_snapshot)
    inode = os.stat(path).st_ino
    restarted = Poller(settings, connect=lambda dsn: sql)
    assert restarted.poll_once() and sql.asked[-1] == ("full", None)  # a restart reads all
    assert os.stat(path).st_ino == inode and snapshot_mod.read(path).generation == 1
    sql.rows = ROWS[:1]
    again = Poller(settings, connect=lambda dsn: sql)
    assert again.poll_once() and snapshot_mod.read(path).domains == {"a.example": "alpha"}


def test_a_delta_merges_as_a_full_load_would() -> None:
    """Moves, deactivations, a customer left without domains, an invalid policy kept and one
    that becomes valid again (the SQL tests compare the two on a real database at length)."""
    sql = DeltaSQL(ROWS + [("g.example", "gamma", {"suspicious": "sometimes"})], _check(1))
    first = snapshot_mod.load(sql, None, check=_check(1))
    assert first.invalid == ("gamma",) and "gamma" not in first.policies
    sql.delta = [
        ("a.example", True, "beta", None),  # alpha's domain moved to beta…
        ("b.example", False, "beta", None),  # …beta's own deactivated
        ("g.example", True, "gamma", {"ban_extensions": ["zip"]}),  # valid now
    ]
    second = snapshot_mod.load_delta(sql, first, 1, check=_check(4))
    assert second.domains == {"a.example": "beta", "a2.example": "alpha", "g.example": "gamma"}
    assert second.invalid == () and second.policies["gamma"].ban_extensions == ("zip",)
    sql.delta = [("a2.example", True, "beta", None), ("a.example", True, "beta", None)]
    third = snapshot_mod.load_delta(sql, second, 4, check=_check(5))
    assert "alpha" not in third.policies  # no domain of its left
    sql.delta = [("g.example", True, "gamma", {"no_such_field": 1})]
    fourth = snapshot_mod.load_delta(sql, third, 5)
    assert fourth.invalid == ("gamma",) and fourth.policies["gamma"] == third.policies["gamma"]
    sql.rows = [
        ("a.example", "beta", None),
        ("a2.example", "beta", None),
        ("g.example", "gamma", {"no_such_field": 1}),
    ]
    assert fourth.same_content(snapshot_mod.load(sql, third))


def test_the_full_reads_of_a_towers_scanners_fall_out_of_step(tmp_path: Path) -> None:
    # Each poller's next full read is policy_full_reload_s times its own random factor: after
    # a removal made every scanner read everything at once, they do not do so together again.
    settings = _settings(tmp_path)
    factors = iter([0.5, 1.0, 1.49])  # the first full, the retry time set before a reread, …
    sql, clock = DeltaSQL(ROWS, _check(5)), Clock()
    poller = Poller(settings, connect=lambda dsn: sql, clock=clock, spread=lambda: next(factors))
    assert poller.poll_once() and sql.asked[-1] == ("full", None)
    started = clock.now
    assert poller.next_full == started + settings.policy_full_reload_s * 0.5
    clock.now = poller.next_full - 0.1
    fulls = sql.asked.count(("full", None))
    assert poller.poll_once() and sql.asked.count(("full", None)) == fulls
    clock.now = poller.next_full
    assert poller.poll_once() and sql.asked[-1] == ("full", None)
    assert poller.next_full == clock.now + settings.policy_full_reload_s * 1.49
    spreads = [Poller(settings, connect=lambda dsn: sql).spread() for _ in range(200)]
    assert min(spreads) >= 0.5 and max(spreads) < 1.5 and max(spreads) - min(spreads) > 0.5


def test_a_failed_periodic_reread_does_not_starve_the_deltas(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    sql, clock = DeltaSQL(ROWS, _check(5)), Clock()
    poller = Poller(settings, connect=lambda dsn: sql, clock=clock, spread=lambda: 1.0)
    assert poller.poll_once()
    clock.now = poller.next_full  # the periodic reread is due, and it fails
    real_fetchall = sql.fetchall

    def timed_out() -> list[Any]:
        if sql._last == snapshot_mod.LOAD_QUERY:
            raise OSError("canceling statement due to statement timeout")
        return real_fetchall()

    sql.fetchall = timed_out  # type: ignore[method-assign]
    assert not poller.poll_once()
    assert poller.next_full == clock.now + min(60.0, settings.policy_full_reload_s)
    # The next second a change arrives: read as a delta, not another full reread.
    clock.now += 1
    sql.check = _check(6)
    sql.delta = [("b.example", True, "beta", {"ban_extensions": ["exe"]})]
    asked = len(sql.asked)
    assert poller.poll_once()
    assert [kind for kind, _ in sql.asked[asked:]] == ["delta"]
    assert poller.snapshot is not None
    assert poller.snapshot.lookup("x@b.example")[1] == parse({"ban_extensions": ["exe"]})
