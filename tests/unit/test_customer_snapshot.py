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
