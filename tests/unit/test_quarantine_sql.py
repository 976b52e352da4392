"""scand's SQL quarantine against a real PostgreSQL 15 with the tower's schema and roles: the
row and its bytes are committed before the 250, a failing SQL is a 451 with nothing kept, the
scanner's undo deletes only its own fresh quarantine row, the spooled events add no second
row, the allow-list; and the shared row contract's reads (mailtower.quarantine)."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pgclusters  # tests/ is on sys.path (rootdir conftest)
import psycopg
import pytest
from needs import missing
from scand_fakes import SinkHandler, free_port, make_settings, start_sink

from mailtower import quarantine as rows
from mailtower.customers.policy import parse
from mailtower.customers.snapshot import Snapshot
from mailtower.scand import server as server_mod
from mailtower.scand.errors import QuarantineError, ReinjectDeferred
from mailtower.scand.events import Flusher, PostgresSink
from mailtower.scand.quarantine import SqlQuarantineStore
from mailtower.scand.server import Scanner
from mailtower.scanning import testdata
from mailtower.scanning.engines.testing import PatternEngine
from mailtower.settings import TowerSettings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "templates/sql/etc/mailtower/sql/schema.sql.j2"
SCANNER_PASSWORD = "s" * 16  # make_settings' secrets.sql_scanner
ALICE, BOB = "alice@a.example", "bob@b.example"


@pytest.fixture(scope="module")
def cluster() -> Iterator[pgclusters.Cluster]:
    """The tower's schema on a cluster that also listens on 127.0.0.3, the first SQL host of
    make_settings' tower, where mailtower_scanner logs in with its password."""
    if not Path(pgclusters.PG_BIN / "initdb").exists():
        missing("PostgreSQL 15 (package postgresql-15)", module=True)
    workdir = pgclusters.make_workdir("mailtower-quarantine-")
    made = pgclusters.Cluster.create("q", workdir, listen_addresses="'127.0.0.1,127.0.0.3'")
    try:
        with (made.data / "pg_hba.conf").open("a") as hba:
            hba.write("host all all 127.0.0.3/32 scram-sha-256\n")
        with made.connect() as conn:
            conn.execute("SELECT pg_reload_conf()")
            conn.execute(f"CREATE ROLE mailtower_scanner LOGIN PASSWORD '{SCANNER_PASSWORD}'")
            for role in ("mailtower_relay", "mailtower_monitor"):
                conn.execute(f"CREATE ROLE {role} LOGIN")
            conn.execute(SCHEMA.read_text().encode())
            for name in ("alpha", "beta"):
                conn.execute("INSERT INTO customers (name) VALUES (%s)", (name,))
        yield made
    finally:
        made.destroy()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def db(cluster: pgclusters.Cluster) -> Iterator[psycopg.Connection[Any]]:
    """The superuser's connection, with no verdict event or log row left from another test."""
    with cluster.connect() as conn:
        conn.execute("TRUNCATE verdict_events, quarantine_log")
        yield conn


@dataclass
class Rig:
    scanner: Scanner
    sink: SinkHandler
    spool: Path
    settings: TowerSettings

    def policies(self, alpha: dict[str, object], beta: dict[str, object]) -> None:
        Snapshot(
            domains={"a.example": "alpha", "b.example": "beta"},
            policies={"alpha": parse(alpha), "beta": parse(beta)},
            generation=1,
        ).write(Path(self.settings.policy_snapshot))

    def send(self, raw: bytes, rcpts: list[str], sender: str = "sender@example.org") -> str:
        return self.scanner.process(raw, sender, rcpts, ["BODY=8BITMIME"], relay_queue_id="4XyZ1")

    def spooled(self) -> list[Path]:
        return sorted((self.spool / "events").glob("*.json"))

    def local_copies(self) -> list[Path]:
        return (
            sorted((self.spool / "quarantine").glob("*"))
            if (self.spool / "quarantine").exists()
            else []
        )


def _rig(tmp_path: Path, postgres_port: int) -> Iterator[Rig]:
    controller, sink, port = start_sink()
    settings = make_settings(
        tmp_path / "spool",
        reinject_port=port,
        postgres_port=postgres_port,
        quarantine_store="sql",
    )
    scanner = Scanner(settings, host_address="127.0.0.5", engines=[PatternEngine(timeout_s=1)])
    assert isinstance(scanner.quarantine, SqlQuarantineStore)
    yield Rig(scanner, sink, tmp_path / "spool", settings)
    scanner.executor.shutdown(wait=True)
    scanner.reinjector.close()
    scanner.quarantine.close()
    controller.stop()


@pytest.fixture
def rig(cluster: pgclusters.Cluster, db: psycopg.Connection[Any], tmp_path: Path) -> Iterator[Rig]:
    yield from _rig(tmp_path, cluster.port)


def _mail(subject: str = "figures", body: str = "hi\n", pdf: bool = False) -> bytes:
    msg = EmailMessage()
    msg["From"] = "sender@example.org"
    msg["To"] = "alice@a.example, bob@b.example"
    msg["Subject"] = subject
    msg["Message-ID"] = "<figures@example.org>"
    msg.set_content(body)
    if pdf:
        msg.add_attachment(b"%PDF-1.4", "application", "pdf", filename="report.pdf")
    return msg.as_bytes().replace(b"\n", b"\r\n")


VIRUS = _mail(subject="=?utf-8?q?caf=C3=A9_invoice?=", body=testdata.marker().decode() + "\n")


def _rows(db: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return db.execute(
        "SELECT quarantine_id, verdict, recipients, message IS NOT NULL FROM verdict_events"
        " ORDER BY scanned_at"
    ).fetchall()


def test_a_quarantined_message_is_committed_with_its_bytes_before_the_250(
    rig: Rig, db: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    rig.policies({"quarantine_days": 7}, {})
    store = rig.scanner.quarantine
    real_write = store.write
    seen_before_answer: list[Any] = []

    def write(raw: bytes, meta: dict[str, Any]) -> str:
        qid = real_write(raw, meta)
        # Another session sees it now, before process() has returned its reply.
        seen_before_answer.append(
            db.execute(
                "SELECT message FROM verdict_events WHERE quarantine_id = %s", (qid,)
            ).fetchone()
        )
        return qid

    monkeypatch.setattr(store, "write", write)
    reply = rig.send(VIRUS, [ALICE])
    assert reply.startswith("250 2.7.0 quarantined as "), reply
    assert seen_before_answer == [(VIRUS,)]
    qid = reply.split()[4]
    (row,) = rows.by_quarantine_id(db, qid)
    alpha = db.execute("SELECT id FROM customers WHERE name = 'alpha'").fetchone()
    assert alpha is not None
    assert row.message == VIRUS and row.held and row.size_bytes == len(VIRUS)
    assert (row.verdict, row.sender, row.recipients) == ("virus", "sender@example.org", (ALICE,))
    assert row.customer_id == alpha[0]
    assert row.expires_at == row.scanned_at + timedelta(days=7)
    assert row.subject == "café invoice"
    assert row.tower == "tower-t" and row.scanner == "127.0.0.5"
    assert row.message_id == "<figures@example.org>"
    assert row.quarantine_meta["relay_queue_id"] == "4XyZ1"
    assert row.quarantine_meta["mail_options"] == ["BODY=8BITMIME"]
    assert "reason" in row.quarantine_meta
    assert rig.sink.received == [] and rig.local_copies() == []
    assert rig.spooled() == []  # the row is the verdict event: nothing spooled for it


def test_the_towers_own_policy_has_no_customer_and_the_default_30_days(
    rig: Rig, db: psycopg.Connection[Any]
) -> None:
    rig.policies({}, {})
    assert rig.send(VIRUS, ["carol@elsewhere.example"]).startswith("250 2.7.0 quarantined")
    (row,) = rows.page(db, limit=10)
    assert row.customer_id is None
    assert row.expires_at == row.scanned_at + timedelta(days=30)
    assert row.message is None and row.held  # a page is read without the bytes


def test_sql_unreachable_is_a_451_and_nothing_is_kept(tmp_path: Path) -> None:
    for rig in _rig(tmp_path, free_port()):  # nothing listens there
        rig.policies({}, {})
        assert rig.send(VIRUS, [ALICE]) == server_mod.S451_LOCAL
        assert rig.sink.received == [] and rig.local_copies() == []
        assert rig.spooled() == []


def test_sql_too_slow_is_a_451_and_no_row(
    rig: Rig, cluster: pgclusters.Cluster, db: psycopg.Connection[Any]
) -> None:
    rig.policies({}, {})
    store = rig.scanner.quarantine
    assert isinstance(store, SqlQuarantineStore)
    store.statement_timeout_ms = 200
    with cluster.connect() as locker:
        locker.autocommit = False
        locker.execute("LOCK TABLE verdict_events IN ACCESS EXCLUSIVE MODE")
        assert rig.send(VIRUS, [ALICE]) == server_mod.S451_LOCAL
        locker.rollback()
    assert _rows(db) == [] and rig.local_copies() == [] and rig.sink.received == []
    # SQL back: the relay's retry is quarantined.
    assert rig.send(VIRUS, [ALICE]).startswith("250 2.7.0 quarantined")
    assert len(_rows(db)) == 1


def test_a_kept_connection_that_broke_is_replaced_within_the_write(
    rig: Rig, db: psycopg.Connection[Any]
) -> None:
    """After a failover the kept connection is dead: the next message still gets in."""
    rig.policies({}, {})
    assert rig.send(VIRUS, [ALICE]).startswith("250 2.7.0 quarantined")
    db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = 'mailtower-scand-quarantine'"
    )
    assert rig.send(VIRUS, [ALICE]).startswith("250 2.7.0 quarantined")
    assert len(_rows(db)) == 2


def test_a_split_message_whose_first_reinjection_fails_leaves_no_quarantine_row(
    rig: Rig, db: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    rig.policies({"ban_extensions": ["pdf"]}, {})

    def fails(*args: object, **kw: object) -> str:
        raise ReinjectDeferred("relay unreachable")

    monkeypatch.setattr(rig.scanner, "reinject", fails)
    assert rig.send(_mail(pdf=True), [ALICE, BOB]) == server_mod.S451_REINJECT
    assert _rows(db) == []  # Alice's copy was written, then undone: the retry writes it again
    monkeypatch.undo()
    assert rig.send(_mail(pdf=True), [ALICE, BOB]).startswith("250 ")
    assert [(r[1], r[2]) for r in _rows(db)] == [("banned", [ALICE])]


def test_spooled_events_flushed_add_no_second_row(rig: Rig, db: psycopg.Connection[Any]) -> None:
    rig.policies({"ban_extensions": ["pdf"]}, {})
    assert rig.send(_mail(pdf=True), [ALICE, BOB]).startswith("250 ")
    assert len(rig.spooled()) == 1  # Bob's delivery; Alice's quarantine row is already in SQL
    sink = PostgresSink(rig.settings.sql_dsn("mailtower_scanner", SCANNER_PASSWORD, writable=True))
    try:
        assert Flusher(rig.scanner.events, sink).flush_once() == 1
    finally:
        sink.close()
    got = db.execute(
        "SELECT verdict, recipients, quarantine_id IS NOT NULL FROM verdict_events ORDER BY verdict"
    ).fetchall()
    assert got == [("banned", [ALICE], True), ("clean", [BOB], False)]


def test_the_allow_list_in_sql(rig: Rig, db: psycopg.Connection[Any]) -> None:
    rig.policies(
        {"ban_extensions": ["pdf"], "allow_senders": ["@example.org"]},
        {"ban_extensions": ["pdf"]},
    )
    assert rig.send(_mail(pdf=True), [ALICE, BOB]).startswith("250 ")
    assert [r.rcpt_tos for r in rig.sink.received] == [[ALICE]]  # banned, delivered tagged
    assert b"X-Mailtower-Verdict: banned;" in rig.sink.received[0].content
    assert [(r[1], r[2]) for r in _rows(db)] == [("banned", [BOB])]  # beta: no allow-list
    db.execute("TRUNCATE verdict_events")
    assert rig.send(VIRUS, [ALICE]).startswith("250 2.7.0 quarantined")  # a virus: held
    assert [(r[1], r[2]) for r in _rows(db)] == [("virus", [ALICE])]


# -- the scanner role's undo: mt_quarantine_undo ------------------------------------------------


def _insert(db: psycopg.Connection[Any], *, qid: str | None, age: timedelta) -> uuid.UUID:
    event_id = uuid.uuid4()
    db.execute(
        "INSERT INTO verdict_events (event_id, tower, scanner, scanned_at, verdict, recipients,"
        " quarantine_id, size_bytes, message) VALUES (%s, 't', 's', now() - %s, %s, '{a@b.c}',"
        " %s, 1, %s)",
        (event_id, age, "virus" if qid else "clean", qid, b"x" if qid else None),
    )
    return event_id


def _as_scanner(cluster: pgclusters.Cluster) -> psycopg.Connection[Any]:
    return psycopg.connect(cluster.conninfo("mailtower_scanner", SCANNER_PASSWORD), autocommit=True)


def test_the_undo_deletes_only_a_fresh_quarantine_row(
    cluster: pgclusters.Cluster, db: psycopg.Connection[Any]
) -> None:
    fresh = _insert(db, qid="20261207T080000Z-000000000001", age=timedelta(minutes=1))
    old = _insert(db, qid="20261207T060000Z-000000000002", age=timedelta(hours=2))
    clean = _insert(db, qid=None, age=timedelta(minutes=1))
    with _as_scanner(cluster) as scanner:

        def undo(event_id: uuid.UUID) -> bool:
            return bool(scanner.execute("SELECT mt_quarantine_undo(%s)", (event_id,)).fetchone()[0])  # type: ignore[index]

        assert undo(clean) is False
        assert undo(old) is False
        assert undo(uuid.uuid4()) is False
        assert undo(fresh) is True
        assert undo(fresh) is False  # once
        for statement in (
            "DELETE FROM verdict_events",
            "UPDATE verdict_events SET message = NULL",
            "DELETE FROM quarantine_log",
            "INSERT INTO quarantine_log (event_id, quarantine_id, action, by)"
            " VALUES (gen_random_uuid(), 'x', 'release', 'me')",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                scanner.execute(statement)
    left = {r[0] for r in db.execute("SELECT event_id FROM verdict_events").fetchall()}
    assert left == {old, clean}


def test_the_store_refuses_to_undo_what_it_did_not_write(rig: Rig) -> None:
    with pytest.raises(QuarantineError, match="not written by this scand"):
        rig.scanner.quarantine.delete("20261207T080000Z-000000000001")


# -- the shared reads (mailtower.quarantine) ----------------------------------------------------


def test_pages_are_newest_first_and_keyset_paged(db: psycopg.Connection[Any]) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    made = []
    for i in range(5):
        row = rows.Quarantined(
            event_id=uuid.uuid4(),
            quarantine_id=f"20261207T08000{i}Z-00000000000{i}",
            tower="tower-t",
            scanner="127.0.0.5",
            scanned_at=now - timedelta(minutes=i),
            verdict="virus",
            sender=None,
            recipients=("a@a.example",),
            findings=({"engine": "e", "name": "n", "part": None},),
            size_bytes=3,
            message_id=None,
            customer_id=None,
            subject="s",
            expires_at=now,
            quarantine_meta={"reason": "r"},
            message=b"raw",
        )
        rows.insert(db, row, customer="beta" if i % 2 else None)
        rows.insert(db, row)  # idempotent: the same event id again adds nothing
        made.append(row)
    first = rows.page(db, limit=2)
    assert [r.quarantine_id for r in first] == [m.quarantine_id for m in made[:2]]
    second = rows.page(db, limit=2, before=rows.cursor_of(first[-1]))
    assert [r.quarantine_id for r in second] == [m.quarantine_id for m in made[2:4]]
    beta = db.execute("SELECT id FROM customers WHERE name = 'beta'").fetchone()
    assert beta is not None
    theirs = rows.page(db, customer_id=beta[0])
    assert [r.quarantine_id for r in theirs] == [made[1].quarantine_id, made[3].quarantine_id]
    got = rows.by_event_id(db, made[0].event_id)
    assert got is not None and got.message == b"raw" and got.reason == "r"
    assert got.findings == ({"engine": "e", "name": "n", "part": None},)
    assert rows.by_event_id(db, uuid.uuid4()) is None
    with pytest.raises(ValueError, match="limit"):
        rows.page(db, limit=0)


# -- the operators' commands on the SQL quarantine ----------------------------------------------


def _cli(rig: Rig, tmp_path: Path, *argv: str) -> int:
    from mailtower.cli import main

    path = tmp_path / "tower.json"
    path.write_text(rig.settings.model_dump_json())
    return main(["quarantine", *argv, "--settings", str(path)])


def test_release_and_delete_from_the_sql_quarantine(
    rig: Rig,
    db: psycopg.Connection[Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SUDO_USER", "olga")
    rig.policies({}, {})
    held = _mail(subject="pay \u202eexe.pdf now", body=testdata.marker().decode() + "\n")
    qid = rig.send(held, [ALICE, "al2@a.example"]).split()[4]
    capsys.readouterr()

    assert _cli(rig, tmp_path, "release", qid) == 0
    assert qid in capsys.readouterr().out
    (got,) = rig.sink.received
    assert (got.mail_from, got.rcpt_tos) == ("sender@example.org", [ALICE, "al2@a.example"])
    assert got.content.endswith(held)
    assert b"X-Mailtower-Released: " in got.content and b"by=olga" in got.content
    assert b"X-Mailtower-Verdict: released; was=virus; tower=tower-t; id=" in got.content
    logged = db.execute("SELECT action, by, recipients, answer FROM quarantine_log").fetchall()
    assert logged == [("release", "olga", [ALICE, "al2@a.example"], "2.0.0 Ok: queued as Q00001")]

    assert _cli(rig, tmp_path, "release", qid) == 1  # once, unless asked again
    assert "already released" in capsys.readouterr().err
    assert len(rig.sink.received) == 1

    assert _cli(rig, tmp_path, "list") == 0
    out = capsys.readouterr().out
    assert qid in out and "[released]" in out
    assert "\u202e" not in out and "\\u202e" in out  # the subject cannot reorder the line

    event_id = db.execute("SELECT event_id FROM verdict_events").fetchone()[0]  # type: ignore[index]
    assert _cli(rig, tmp_path, "show", str(event_id)) == 0
    shown_doc = json.loads(capsys.readouterr().out)
    assert shown_doc["quarantine_id"] == qid and shown_doc["log"][0]["by"] == "olga"
    assert shown_doc["quarantine_meta"]["relay_queue_id"] == "4XyZ1"

    assert _cli(rig, tmp_path, "delete", qid) == 0
    assert db.execute("SELECT message FROM verdict_events").fetchall() == [(None,)]
    assert _cli(rig, tmp_path, "delete", qid) == 1
    assert _cli(rig, tmp_path, "release", qid, "--again") == 1  # no bytes left
    assert "deleted or expired" in capsys.readouterr().err
    assert len(rig.sink.received) == 1
    actions = db.execute("SELECT action, by FROM quarantine_log ORDER BY id").fetchall()
    assert actions == [("release", "olga"), ("delete", "olga")]


def test_release_again_and_a_relay_refusal(
    rig: Rig,
    db: psycopg.Connection[Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rig.policies({}, {})
    qid = rig.send(VIRUS, [ALICE]).split()[4]
    rig.sink.refuse = "550 5.7.1 no"
    assert _cli(rig, tmp_path, "release", qid) == 1
    assert "not marked released" in capsys.readouterr().err
    assert db.execute("SELECT count(*) FROM quarantine_log").fetchone() == (0,)
    rig.sink.refuse = None
    assert _cli(rig, tmp_path, "release", qid) == 0
    assert _cli(rig, tmp_path, "release", qid, "--again") == 0
    assert len(rig.sink.received) == 2
    assert db.execute("SELECT count(*) FROM quarantine_log").fetchone() == (2,)


def test_release_after_a_portal_request_by_what_the_monitor_logged(
    rig: Rig,
    db: psycopg.Connection[Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The monitor's claim row of a portal request: a failed one does not count, one in
    progress or one the relay took does (the monitor checks the operator's likewise)."""
    rig.policies({}, {})
    qid = rig.send(VIRUS, [ALICE]).split()[4]
    event_id = db.execute("SELECT event_id FROM verdict_events").fetchone()[0]  # type: ignore[index]

    def portal(answer: str) -> None:
        db.execute(
            "INSERT INTO quarantine_log (event_id, quarantine_id, action, by, answer, request_id)"
            " VALUES (%s, %s, 'release', 'admin:acme-admin', %s, gen_random_uuid())",
            (event_id, qid, answer),
        )

    portal("sending 0123456789abcdef")
    assert _cli(rig, tmp_path, "release", qid) == 1
    assert "a portal release of it is in progress" in capsys.readouterr().err
    db.execute("UPDATE quarantine_log SET answer = 'released: 250 2.0.0 Ok: queued as X'")
    assert _cli(rig, tmp_path, "release", qid) == 1
    assert "already released by admin:acme-admin at" in capsys.readouterr().err
    db.execute("UPDATE quarantine_log SET answer = 'failed: relay: 550 5.1.1 no such user'")
    assert rig.sink.received == []
    assert _cli(rig, tmp_path, "release", qid) == 0
    assert len(rig.sink.received) == 1


def test_release_after_a_users_own_release_goes_to_the_others_only(
    rig: Rig,
    db: psycopg.Connection[Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A user released their own copy from the portal: the operator's release reaches the
    other recipients, never that user twice; --again reaches everyone."""
    rig.policies({}, {})
    qid = rig.send(VIRUS, [ALICE, "al2@a.example"]).split()[4]
    event_id = db.execute("SELECT event_id FROM verdict_events").fetchone()[0]  # type: ignore[index]
    db.execute(
        "INSERT INTO quarantine_log (event_id, quarantine_id, action, by, recipients, answer,"
        " request_id) VALUES (%s, %s, 'release', 'user:alice', %s,"
        " 'released: 250 2.0.0 Ok: queued as X', gen_random_uuid())",
        (event_id, qid, [ALICE.upper()]),
    )
    capsys.readouterr()
    assert _cli(rig, tmp_path, "release", qid) == 0
    assert "left out, already released to them: " + ALICE in capsys.readouterr().out
    assert [m.rcpt_tos for m in rig.sink.received] == [["al2@a.example"]]
    assert _cli(rig, tmp_path, "release", qid) == 1  # every recipient has it now
    assert "already released" in capsys.readouterr().err
    assert _cli(rig, tmp_path, "release", qid, "--again") == 0
    assert [m.rcpt_tos for m in rig.sink.received][-1] == [ALICE, "al2@a.example"]


def test_list_pages_newest_first_and_unknown_ids(
    rig: Rig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rig.policies({}, {})
    qids = [rig.send(VIRUS, [ALICE]).split()[4] for _ in range(3)]
    capsys.readouterr()
    assert _cli(rig, tmp_path, "list", "--limit", "2") == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[:2]] == qids[::-1][:2]
    assert out[2].startswith("next page: --before ")
    cursor = out[2].split()[-1]
    assert _cli(rig, tmp_path, "list", "--limit", "2", "--before", cursor) == 0
    assert capsys.readouterr().out.split()[0] == qids[0]
    assert _cli(rig, tmp_path, "list", "--json") == 0
    assert [d["quarantine_id"] for d in json.loads(capsys.readouterr().out)] == qids[::-1]
    assert _cli(rig, tmp_path, "show", "20261207T080000Z-000000000001") == 1
    assert _cli(rig, tmp_path, "show", "\x1b[2Jx") == 1
    err = capsys.readouterr().err
    assert "no quarantined message" in err and "\x1b" not in err


# -- scand's worker processes, each with its own connection ------------------------------------


def test_every_worker_process_quarantines_in_sql_and_reconnects(
    cluster: pgclusters.Cluster, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    import signal
    import smtplib
    import subprocess
    import sys

    from scand_fakes import scand_argv, wait_until

    controller, sink, sink_port = start_sink()
    settings = make_settings(
        tmp_path / "spool",
        reinject_port=sink_port,
        postgres_port=cluster.port,
        quarantine_store="sql",
    ).model_copy(update={"engines": []})
    path = tmp_path / "tower.json"
    path.write_text(settings.model_dump_json())
    log_path = tmp_path / "scand.log"
    argv = scand_argv([sys.executable, "-m", "mailtower.scand"], path)
    with log_path.open("ab") as log:
        proc = subprocess.Popen([*argv, "--workers", "2"], stdout=log, stderr=log)

    def send(i: int) -> tuple[int, bytes]:
        msg = EmailMessage()
        msg["Subject"] = f"banned {i}"
        msg["Message-ID"] = f"<banned-{i}@test>"
        msg.set_content("see attached\n")
        msg.add_attachment(b"MZ", "application", "octet-stream", filename="run.exe")
        with smtplib.SMTP("127.0.0.1", settings.ports.filter, timeout=30) as smtp:
            smtp.ehlo("relay.test")
            smtp.mail("sender@example.org")
            smtp.rcpt("to@example.com")
            return smtp.data(msg.as_bytes().replace(b"\n", b"\r\n"))

    def ready() -> bool:
        try:
            return send(-1)[0] == 250
        except OSError:
            return False

    try:
        wait_until(ready, 60, f"scand's workers ({log_path})")
        replies = [send(i) for i in range(6)]
        db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'mailtower-scand-quarantine'"
        )
        replies += [send(i) for i in range(6, 12)]
        assert all(code == 250 and b"quarantined as" in text for code, text in replies), replies
        got = db.execute(
            "SELECT count(*), count(DISTINCT event_id), count(message) FROM verdict_events"
            " WHERE quarantine_id IS NOT NULL AND message_id LIKE '<banned-%%'"
        ).fetchone()
        assert got == (13, 13, 13)  # the readiness probe's included
        assert sink.received == []
        assert not (tmp_path / "spool" / "quarantine").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        controller.stop()


def test_a_message_set_aside_goes_to_the_same_sql_store(
    rig: Rig, db: psycopg.Connection[Any]
) -> None:
    from email.utils import format_datetime

    rig.policies({}, {})
    rig.sink.refuse = "550 5.1.1 <alice@a.example>: Recipient address rejected"
    arrived = datetime.now(UTC) - timedelta(hours=2)
    raw = (
        "Received: from sender.example (sender.example [192.0.2.25])\r\n"
        "\tby mx.tower-t.test (Postfix) with ESMTPS id 4XyZ1\r\n"
        f"\tfor <alice@a.example>; {format_datetime(arrived)}\r\n"
    ).encode() + _mail(subject="poison")
    reply = rig.send(raw, [ALICE])
    assert reply.startswith("250 2.7.0 set aside as "), reply
    (row,) = rows.page(db, with_message=True)
    assert row.verdict == "tempfail" and row.message == raw and row.customer_id is None
    assert server_mod.UNPROCESSABLE_FINDING in [dict(f) for f in row.findings]
    meta = row.quarantine_meta
    assert meta["unprocessable"] is True and "550" in meta["reason"]
    assert meta["relay_queue_id"] == "4XyZ1" and meta["relay_arrival"]
    assert rig.spooled() == [] and rig.local_copies() == []
