"""SqlQuarantineStore's connection handling, against fake connections (no server): a kept
connection that broke or became read-only is replaced once within the write; any other
failure, or a new connection's, is a QuarantineError (scand answers 451)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from mailtower.scand.errors import QuarantineError
from mailtower.scand.quarantine import SqlQuarantineStore, row_of

META = {
    "tower": "t",
    "scanner": "s",
    "envelope": {"mail_from": "a@b.example", "rcpt_tos": ["c@d.example"]},
    "verdict": "virus",
    "findings": [],
    "reason": "r",
    "customer": "alpha",
    "quarantine_days": 3,
}


class FakeConn:
    def __init__(self, fail: BaseException | None = None, *, breaks: bool = False) -> None:
        self.fail = fail
        self.breaks = breaks
        self.closed = False
        self.broken = False
        self.statements: list[tuple[str, Any]] = []

    def cursor(self) -> FakeConn:
        return self

    def __enter__(self) -> FakeConn:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def execute(self, query: str, params: Any = None) -> FakeConn:
        if self.fail is not None:
            self.broken = self.breaks
            raise self.fail
        self.statements.append((query, params))
        return self

    def fetchone(self) -> tuple[bool]:
        return (True,)

    def close(self) -> None:
        self.closed = True


def _store(conns: list[FakeConn]) -> SqlQuarantineStore:
    store = SqlQuarantineStore("host=nowhere")
    opened = iter(conns)

    store._connect = lambda: next(opened)  # type: ignore[method-assign]
    return store


def test_a_write_inserts_once_and_keeps_the_connection() -> None:
    conn = FakeConn()
    store = _store([conn])
    first = store.write(b"Subject: x\r\n\r\nbody", META)
    second = store.write(b"raw", META)
    assert first != second
    assert len(conn.statements) == 2 and "INSERT INTO verdict_events" in conn.statements[0][0]
    params = conn.statements[0][1]
    assert params["customer"] == "alpha" and params["subject"] == "x"
    assert params["expires_at"] - params["scanned_at"] == timedelta(days=3)


def test_a_kept_connection_that_broke_is_replaced_once() -> None:
    kept = FakeConn()
    store = _store([kept, FakeConn(), FakeConn()])
    store.write(b"raw", META)
    kept.fail, kept.breaks = psycopg.OperationalError("server closed the connection"), True
    store.write(b"raw", META)  # on the second connection, no error
    assert kept.closed


def test_a_kept_connection_to_a_standby_is_replaced_once() -> None:
    kept, fresh = FakeConn(), FakeConn()
    store = _store([kept, fresh])
    store.write(b"raw", META)
    kept.fail = psycopg.errors.ReadOnlySqlTransaction("read-only")
    store.write(b"raw", META)
    assert len(fresh.statements) == 1


def test_a_statement_timeout_is_not_retried() -> None:
    kept = FakeConn()
    store = _store([kept, FakeConn()])
    store.write(b"raw", META)
    kept.fail = psycopg.errors.QueryCanceled("canceling statement due to statement timeout")
    with pytest.raises(QuarantineError, match="insert failed"):
        store.write(b"raw", META)
    assert kept.closed  # the next write opens a new one


def test_a_new_connection_failing_is_a_quarantine_error_at_once() -> None:
    fresh = FakeConn(psycopg.OperationalError("boom"), breaks=True)
    store = _store([fresh, FakeConn()])
    with pytest.raises(QuarantineError):
        store.write(b"raw", META)
    assert fresh.closed


def test_an_unprocessable_row_is_a_tempfail_with_its_finding() -> None:
    row = row_of(b"raw", {**META, "verdict": "unprocessable", "error": "e"}, "q", datetime.now(UTC))
    assert row.verdict == "tempfail"
    assert row.findings[-1]["name"] == "scand.unprocessable"
    assert row.quarantine_meta == {"reason": "r", "error": "e", "unprocessable": True}


def test_undo_only_what_this_store_wrote() -> None:
    conn = FakeConn()
    store = _store([conn])
    qid = store.write(b"raw", META)
    store.delete(qid)
    assert "mt_quarantine_undo" in conn.statements[-1][0]
    with pytest.raises(QuarantineError):
        store.delete(qid)  # once


def test_the_commands_on_a_host_without_the_scanners_password_say_where_to_run_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from scand_fakes import make_settings

    from mailtower.cli import main

    settings = make_settings(tmp_path / "spool", reinject_port=1, quarantine_store="sql")
    path = tmp_path / "tower.json"
    path.write_text(settings.for_role("monitor").model_dump_json())
    assert main(["quarantine", "list", "--settings", str(path)]) == 1
    assert "on one of the tower's scanners" in capsys.readouterr().err
