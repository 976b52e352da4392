"""The monitor's quarantine manager against real PostgreSQL 15: one cluster as the tower (the
tower's schema.sql.j2, the manager logged in as mailtower_monitor with only its grants), one
as the GOC (quarantine_actions as the GOC deploy makes it, the manager as mt_status_unit), and
a fake relay (aiosmtpd) for re-injection and notices. No timed assertions: the clocks the
manager compares are passed in, and the tests wait only for what they started to finish."""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import shutil
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import pgclusters  # tests/ is on sys.path (rootdir conftest)
import psycopg
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from monitor_fakes import free_port, tower
from needs import missing
from psycopg.types.json import Jsonb

from mailtower.goc.eye.status import status_role
from mailtower.goc.sync import quarantine_actions
from mailtower.goc.sync.changes import Changes
from mailtower.monitor import quarantine as qm
from mailtower.monitor.errors import QuarantineGocDown
from mailtower.monitor.metrics import MonitorMetrics
from mailtower.monitor.pool import Pool
from mailtower.settings import TowerSettings, from_data

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "templates/sql/etc/mailtower/sql/schema.sql.j2"
PASSWORD = "monitor-password-0123456789"
MESSAGE = b"From: a@evil.example\r\nSubject: invoice\r\n\r\nbody\r\n.dotted line\r\n"


# -- the fake relay ---------------------------------------------------------------------


@dataclass
class Delivered:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes


@dataclass
class RelayHandler:
    """Answers DATA with ``answers`` in turn (then 250); ``gate`` holds DATA until set."""

    answers: list[str] = field(default_factory=list)
    delivered: list[Delivered] = field(default_factory=list)
    gate: threading.Event | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.gate is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.gate.wait, 30)
        with self.lock:
            if self.answers:
                return self.answers.pop(0)
            self.delivered.append(
                Delivered(
                    envelope.mail_from or "",
                    list(envelope.rcpt_tos),
                    envelope.original_content or b"",
                )
            )
            return f"250 2.0.0 Ok: queued as Q{len(self.delivered):05d}"


@pytest.fixture
def relay() -> Iterator[tuple[RelayHandler, int]]:
    handler = RelayHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


# -- the tower and the GOC ----------------------------------------------------------------


@pytest.fixture(scope="module")
def clusters() -> Iterator[tuple[pgclusters.Cluster, pgclusters.Cluster]]:
    if not Path(pgclusters.PG_BIN / "initdb").exists():
        missing("PostgreSQL 15 (package postgresql-15)", module=True)
    workdir = pgclusters.make_workdir("mailtower-qmgr-")
    tower_sql = pgclusters.Cluster.create("tower", workdir)
    goc = pgclusters.Cluster.create("goc", workdir)
    try:
        with tower_sql.connect() as conn:
            for role in ("mailtower_relay", "mailtower_scanner"):
                conn.execute(f"CREATE ROLE {role}")
            conn.execute(f"CREATE ROLE mailtower_monitor LOGIN PASSWORD '{PASSWORD}'")
            conn.execute(SCHEMA.read_text().encode())
        with goc.connect() as conn:
            conn.execute(f"CREATE ROLE {status_role('unit')} LOGIN PASSWORD '{PASSWORD}'")
            conn.execute(f"CREATE ROLE {status_role('other')} LOGIN PASSWORD '{PASSWORD}'")
            quarantine_actions.ensure(conn, ["unit", "other"], Changes("goc"))
        yield tower_sql, goc
    finally:
        tower_sql.destroy()
        goc.destroy()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def sql(clusters: tuple[pgclusters.Cluster, pgclusters.Cluster]) -> Any:
    tower_sql, goc = clusters
    with tower_sql.connect() as conn:
        conn.execute("TRUNCATE quarantine_log, verdict_events, policies, customers CASCADE")
    with goc.connect() as conn:
        conn.execute("TRUNCATE quarantine_actions")
    return clusters


def settings(**quarantine: Any) -> TowerSettings:
    data = tower(free_port(), free_port()).model_dump(mode="json")
    data["quarantine"] = quarantine
    return from_data(data)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.at = now

    def __call__(self) -> datetime:
        return self.at


def manager(
    sql: Any, port: int, *, clock: Clock | None = None, **overrides: Any
) -> qm.QuarantineManager:
    tower_sql, goc = sql
    s = settings(**overrides.pop("quarantine", {}))
    metrics = MonitorMetrics(Pool([], fail_after=2, recover_after=2, now=0.0))
    relay = qm.Relay(s)
    relay.host, relay.reinject_port, relay.smtp_port = "127.0.0.1", port, port
    made = qm.QuarantineManager(
        s,
        metrics,
        now=clock or Clock(datetime.now(UTC)),
        tower_dsn=tower_sql.conninfo("mailtower_monitor", PASSWORD),
        goc_dsn=goc.conninfo(status_role("unit"), PASSWORD),
        relay=relay,
        **overrides,
    )
    return made


def customer(sql: Any, name: str, policy: dict[str, Any]) -> int:
    with sql[0].connect() as conn:
        (cid,) = conn.execute(
            "INSERT INTO customers (name) VALUES (%s) RETURNING id", (name,)
        ).fetchone()
        conn.execute(
            "INSERT INTO policies (customer_id, policy) VALUES (%s, %s)", (cid, Jsonb(policy))
        )
    return int(cid)


def quarantined(
    sql: Any,
    *,
    sender: str = "a@evil.example",
    recipients: tuple[str, ...] = ("bob@cust.example", "carol@cust.example"),
    message: bytes | None = MESSAGE,
    expires_in: timedelta = timedelta(days=30),
    customer_id: int | None = None,
    subject: str = "invoice",
    scanned_at: datetime | None = None,
) -> uuid.UUID:
    event_id = uuid.uuid4()
    at = scanned_at or datetime.now(UTC)
    with sql[0].connect() as conn:
        conn.execute(
            "INSERT INTO verdict_events (event_id, tower, scanner, scanned_at, verdict, sender,"
            " recipients, findings, quarantine_id, size_bytes, customer_id, subject, expires_at,"
            " message) VALUES (%s, 'unit', 's01', %s, 'virus', %s, %s, %s, %s, %s, %s, %s, %s,"
            " %s)",
            (
                event_id,
                at,
                sender,
                list(recipients),
                Jsonb([{"name": "Eicar-Test-Signature", "engine": "clamd"}]),
                f"q-{event_id.hex[:8]}",
                len(message or b""),
                customer_id,
                subject,
                at + expires_in,
                message,
            ),
        )
    return event_id


def request(
    sql: Any,
    event_id: uuid.UUID,
    action: str = "release",
    recipients: tuple[str, ...] = (),
    by: str = "operator:portal",
) -> uuid.UUID:
    request_id = uuid.uuid4()
    with sql[1].connect() as conn:
        conn.execute(
            "INSERT INTO quarantine_actions (request_id, event_id, tower, quarantine_id, action,"
            " recipients, requested_by) VALUES (%s, %s, 'unit', %s, %s, %s, %s)",
            (request_id, event_id, f"q-{event_id.hex[:8]}", action, list(recipients), by),
        )
    return request_id


@pytest.mark.parametrize(
    ("customer_id", "by", "delivered"),
    [
        (None, "admin:acme", False),  # held under no customer's policy: operators only
        (None, "operator:op", True),
        (7, "user:bob@cust.example", False),  # a virus, on a user's word
        (7, "admin:acme", True),
    ],
)
def test_who_may_release_what_is_checked_again_at_the_tower(
    sql: Any, relay: Any, customer_id: int | None, by: str, delivered: bool
) -> None:
    handler, port = relay
    event = quarantined(sql, customer_id=customer_id)
    rid = request(
        sql, event, recipients=("bob@cust.example",) if by.startswith("user:") else (), by=by
    )
    m = manager(sql, port)
    assert m.actions_pass() == 1
    assert bool(handler.delivered) == delivered
    result, answer, done = goc_row(sql, rid)
    assert done and (result == "released") == delivered, (result, answer)
    if not delivered:
        assert result == "failed" and answer.startswith("refused:")


def goc_row(sql: Any, request_id: uuid.UUID) -> tuple[Any, ...]:
    with sql[1].connect() as conn:
        row = conn.execute(
            "SELECT result, answer, done_at IS NOT NULL FROM quarantine_actions"
            " WHERE request_id = %s",
            (request_id,),
        ).fetchone()
    assert row is not None
    return tuple(row)


def held(sql: Any, event_id: uuid.UUID) -> bool:
    return bool(
        sql[0].scalar(
            "SELECT message IS NOT NULL FROM verdict_events WHERE event_id = %s", event_id
        )
    )


def log_rows(sql: Any, action: str) -> list[tuple[Any, ...]]:
    """The tower's log of ``action`` (for notices: those sent to someone, not the marks)."""
    with sql[0].connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                "SELECT event_id, recipients, answer FROM quarantine_log WHERE action = %s"
                " AND (action <> 'notice' OR recipients <> '{}') ORDER BY id",
                (action,),
            )
        ]


# -- releases ------------------------------------------------------------------------------


def test_a_release_is_delivered_with_the_original_sender_and_recorded(sql, relay) -> None:
    handler, port = relay
    event = quarantined(sql)
    rid = request(sql, event)
    m = manager(sql, port)
    assert m.actions_pass() == 1
    assert len(handler.delivered) == 1
    got = handler.delivered[0]
    assert got.mail_from == "a@evil.example"
    assert got.rcpt_tos == ["bob@cust.example", "carol@cust.example"]
    assert got.data.endswith(MESSAGE)  # dot-stuffing undone by the relay: the same bytes
    assert f"id={rid}".encode() in got.data.split(b"\r\n\r\n")[0]
    result, answer, done = goc_row(sql, rid)
    assert (result, done) == ("released", True) and "queued as" in answer
    assert m.actions_pass() == 0  # nothing pending any more
    assert len(handler.delivered) == 1


def test_a_release_to_a_subset_goes_to_the_messages_own_spelling(sql, relay) -> None:
    handler, port = relay
    rid = request(sql, quarantined(sql), recipients=("CAROL@cust.example",))
    manager(sql, port).actions_pass()
    assert handler.delivered[0].rcpt_tos == ["carol@cust.example"]
    assert goc_row(sql, rid)[0] == "released"


def test_a_recipient_outside_the_message_is_refused(sql, relay) -> None:
    handler, port = relay
    event = quarantined(sql)
    rid = request(sql, event, recipients=("bob@cust.example", "mallory@elsewhere.example"))
    manager(sql, port).actions_pass()
    assert handler.delivered == []
    result, answer, done = goc_row(sql, rid)
    assert result == "failed" and "mallory@elsewhere.example" in answer and done
    assert held(sql, event)


def operator_released(
    conn: psycopg.Connection[Any], event: uuid.UUID, recipients: tuple[str, ...]
) -> None:
    """What `mailtower quarantine release` logs after the relay's 250 (scand/cli.py)."""
    conn.execute(
        "SELECT mt_quarantine_released(%s, 'alice', %s, '250 2.0.0 Ok: queued as OP1')",
        (event, list(recipients)),
    )


@pytest.mark.parametrize("requested", [(), ("BOB@cust.example",)])
def test_what_an_operator_released_is_not_sent_again(sql, relay, requested) -> None:
    handler, port = relay
    event = quarantined(sql)
    with sql[0].connect() as conn:
        operator_released(conn, event, ("bob@cust.example", "carol@cust.example"))
    rid = request(sql, event, recipients=requested)
    assert manager(sql, port).actions_pass() == 1
    assert handler.delivered == []
    result, answer, done = goc_row(sql, rid)
    assert (result, done) == ("released", True)
    assert answer.startswith("already released by alice at ") and answer.endswith(" UTC")


def test_a_release_leaves_out_whom_an_earlier_one_covered(sql, relay) -> None:
    handler, port = relay
    event = quarantined(sql)
    with sql[0].connect() as conn:
        operator_released(conn, event, ("Bob@Cust.example",))  # compared without case
    rid = request(sql, event)  # empty: all of its recipients
    manager(sql, port).actions_pass()
    assert [d.rcpt_tos for d in handler.delivered] == [["carol@cust.example"]]
    result, answer, _ = goc_row(sql, rid)
    assert result == "released" and "queued as" in answer
    assert "already released to bob@cust.example by alice at" in answer
    # A later request for everyone: each was released to once, nothing is sent.
    again = request(sql, event)
    manager(sql, port).actions_pass()
    assert len(handler.delivered) == 1
    result, answer, _ = goc_row(sql, again)
    assert result == "released" and "by alice at" in answer and "by operator:portal at" in answer


def waiting_for_action_lock(sql: Any) -> bool:
    return bool(
        sql[0].scalar("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
    )


@pytest.mark.parametrize("when", ["before its check", "before its last dot"])
def test_an_operator_release_during_a_portal_release_is_not_doubled(sql, relay, when) -> None:
    """The operator's command holds ACTION_LOCK from its check to its log row; the manager
    takes it for its check and again for its move to "sending" (after the relay's 354):
    either way it waits, sees the operator's release, and never sends the message's end."""
    handler, port = relay
    event = quarantined(sql)
    rid = request(sql, event)
    m = manager(sql, port, retry_s=0.0)
    errors: list[BaseException] = []
    checked, go = threading.Event(), threading.Event()
    assert m.relay is not None
    real = m.relay.release

    def release(*args: Any, **kwargs: Any) -> str:
        checked.set()  # past its first check: the operator comes now
        go.wait(30)
        return real(*args, **kwargs)

    thread = threading.Thread(target=_run, args=(m, errors))
    with sql[0].connect() as operator, mock.patch.object(m.relay, "release", release):
        if when == "before its last dot":
            thread.start()
            assert checked.wait(30)
        with operator.transaction():
            operator.execute(qm.rows.ACTION_LOCK, (event,))
            if when == "before its check":
                thread.start()
            go.set()
            pgclusters.wait_until(
                lambda: waiting_for_action_lock(sql), 30, "the manager waiting for ACTION_LOCK"
            )
            operator_released(operator, event, ("bob@cust.example", "carol@cust.example"))
        thread.join(60)
    assert not errors
    assert handler.delivered == []  # at most RCPT and DATA, never the message's end
    # before its check: answered at once; before its last dot: deferred, "meanwhile …"
    assert goc_row(sql, rid)[2] is (when == "before its check")
    m.actions_pass()  # a deferred one ("released meanwhile") is answered on the next pass
    assert handler.delivered == []
    result, answer, done = goc_row(sql, rid)
    assert (result, done) == ("released", True) and "by alice at" in answer


def _run(m: qm.QuarantineManager, errors: list[BaseException]) -> None:
    try:
        m.actions_pass()
    except BaseException as exc:  # pragma: no cover - reported by the test
        errors.append(exc)


def test_two_managers_at_once_deliver_each_release_exactly_once(sql, relay) -> None:
    handler, port = relay
    handler.gate = threading.Event()  # both managers are inside their passes together
    rids = [request(sql, quarantined(sql)) for _ in range(4)]
    managers = [manager(sql, port), manager(sql, port)]
    errors: list[BaseException] = []

    def run(m: qm.QuarantineManager) -> None:
        try:
            m.actions_pass()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(m,)) for m in managers]
    for t in threads:
        t.start()
    handler.gate.set()
    for t in threads:
        t.join(60)
    assert not errors
    for m in managers:  # a pass after: whatever the other one had in hand is finished
        m.actions_pass()
    assert len(handler.delivered) == 4
    assert {goc_row(sql, r)[0] for r in rids} == {"released"}


class Crash(BaseException):
    """The manager's process dies here (nothing after it runs)."""


def test_a_manager_restarted_after_its_claim_delivers_once(sql, relay) -> None:
    handler, port = relay
    rid = request(sql, quarantined(sql))
    first = manager(sql, port)
    assert first.relay is not None

    def dies(*args: Any, **kwargs: Any) -> str:
        raise Crash()

    first.relay.release = dies  # type: ignore[method-assign]
    with pytest.raises(Crash):
        first.actions_pass()
    assert [a.split()[0] for _, _, a in log_rows(sql, "release")] == ["claimed"]
    # Its successor waits for the claim to be stale (its owner might still be at work)…
    assert manager(sql, port).actions_pass() == 0
    assert handler.delivered == []
    # …then takes it over and delivers it, once.
    assert manager(sql, port, stale_claim_s=0).actions_pass() == 1
    assert len(handler.delivered) == 1
    assert goc_row(sql, rid)[0] == "released"


def test_a_manager_dying_after_the_relay_took_it_never_sends_it_again(sql, relay) -> None:
    handler, port = relay
    rid = request(sql, quarantined(sql))
    first = manager(sql, port)
    assert first.relay is not None
    real = first.relay.release

    def delivers_then_dies(*args: Any, **kwargs: Any) -> str:
        real(*args, **kwargs)
        raise Crash()

    first.relay.release = delivers_then_dies  # type: ignore[method-assign]
    with pytest.raises(Crash):
        first.actions_pass()
    assert len(handler.delivered) == 1
    assert manager(sql, port, stale_claim_s=0, retry_s=0).actions_pass() == 0
    # Once its owner cannot be waiting for the relay any more: failed, in doubt, not resent.
    assert manager(sql, port, stale_claim_s=0, in_doubt_s=0).actions_pass() == 1
    result, answer, _ = goc_row(sql, rid)
    assert result == "failed" and "in doubt" in answer and str(rid) in answer
    assert len(handler.delivered) == 1


def test_a_restart_between_the_towers_record_and_the_gocs_reports_it_once(sql, relay) -> None:
    handler, port = relay
    rid = request(sql, quarantined(sql))
    m = manager(sql, port)
    real = m.goc_execute

    def goc_fails_on_done(query: str, params: Any) -> list[Any]:
        if query is qm.DONE:
            raise QuarantineGocDown("the GOC went away")
        return real(query, params)

    m.goc_execute = goc_fails_on_done  # type: ignore[method-assign]
    with pytest.raises(QuarantineGocDown):
        m.actions_pass()
    assert goc_row(sql, rid)[2] is False
    assert manager(sql, port).actions_pass() == 1
    assert goc_row(sql, rid)[0] == "released"
    assert len(handler.delivered) == 1


def test_a_relay_4xx_is_tried_again_and_a_5xx_fails(sql, relay) -> None:
    handler, port = relay
    handler.answers = ["451 4.3.0 queue file write error"]
    rid = request(sql, quarantined(sql))
    m = manager(sql, port)
    assert m.actions_pass() == 0
    result, answer, done = goc_row(sql, rid)
    assert (result, done) == (None, False) and "451" in answer  # pending, last answer shown
    assert m.actions_pass() == 0  # not before RETRY_S
    assert handler.delivered == []
    assert manager(sql, port, retry_s=0).actions_pass() == 1
    assert goc_row(sql, rid)[0] == "released"
    assert len(handler.delivered) == 1

    handler.answers = ["554 5.7.1 no thanks"]
    rid = request(sql, quarantined(sql))
    assert manager(sql, port).actions_pass() == 1
    result, answer, done = goc_row(sql, rid)
    assert result == "failed" and "554" in answer and done
    assert len(handler.delivered) == 1


def test_an_unreachable_relay_is_tried_again(sql) -> None:
    rid = request(sql, quarantined(sql))
    assert manager(sql, free_port()).actions_pass() == 0
    assert goc_row(sql, rid)[:1] == (None,)
    assert "deferred" in log_rows(sql, "release")[0][2]


def test_an_expired_or_deleted_message_is_gone(sql, relay) -> None:
    handler, port = relay
    rid1 = request(sql, quarantined(sql, message=None))
    rid2 = request(sql, quarantined(sql, expires_in=timedelta(days=-1)))
    manager(sql, port).actions_pass()
    assert goc_row(sql, rid1)[0] == "gone" and goc_row(sql, rid2)[0] == "gone"
    assert handler.delivered == []


# -- deletes and expiry --------------------------------------------------------------------


def test_delete_nulls_the_message_once(sql, relay) -> None:
    _, port = relay
    event, other = quarantined(sql), quarantined(sql)
    rid = request(sql, event, "delete")
    m = manager(sql, port)
    assert m.actions_pass() == 1
    assert goc_row(sql, rid)[0] == "deleted"
    assert not held(sql, event) and held(sql, other)
    rid2 = request(sql, event, "delete")
    m.actions_pass()
    assert goc_row(sql, rid2)[0] == "gone"
    assert len(log_rows(sql, "delete")) == 2


def test_expiry_nulls_what_is_past_its_date_and_logs_it(sql, relay) -> None:
    _, port = relay
    old = [quarantined(sql, expires_in=timedelta(seconds=-1)) for _ in range(3)]
    young = quarantined(sql)
    m = manager(sql, port)
    assert m.expire_pass() == 3
    assert not any(held(sql, e) for e in old) and held(sql, young)
    assert sorted(str(r[0]) for r in log_rows(sql, "expire")) == sorted(str(e) for e in old)
    assert m.expire_pass() == 0


def test_space_metrics_count_held_messages_per_customer(sql, relay) -> None:
    _, port = relay
    acme = customer(sql, "acme", {})
    quarantined(sql, customer_id=acme)
    quarantined(sql, customer_id=acme)
    quarantined(sql, customer_id=acme, message=None)  # deleted: not held
    quarantined(sql)
    m = manager(sql, port)
    assert m.space_pass() == {
        "acme": (2, 2 * len(MESSAGE)),
        qm.NO_CUSTOMER: (1, len(MESSAGE)),
    }
    assert m.metrics is not None
    sample = m.metrics.registry.get_sample_value
    assert sample("mailtower_quarantine_messages", {"customer": "acme"}) == 2
    assert sample("mailtower_quarantine_bytes", {"customer": "acme"}) == 2 * len(MESSAGE)
    with sql[0].connect() as conn:
        conn.execute("UPDATE verdict_events SET message = NULL WHERE customer_id = %s", (acme,))
    m.space_pass()
    assert sample("mailtower_quarantine_messages", {"customer": "acme"}) is None


# -- notices --------------------------------------------------------------------------------

NOTICES = {"notice_from": "quarantine@mx.unit.test", "portal_url": "https://portal.unit.test"}


def notices(handler: RelayHandler) -> dict[str, list[email.message.EmailMessage]]:
    out: dict[str, list[email.message.EmailMessage]] = {}
    for d in handler.delivered:
        msg = email.message_from_bytes(d.data, policy=email.policy.default)
        assert d.mail_from in ("", "<>")  # null sender: no bounce comes back
        for to in d.rcpt_tos:
            out.setdefault(to, []).append(msg)  # type: ignore[arg-type]
    return out


def test_notices_go_to_recipients_and_admin_never_the_sender(sql, relay) -> None:
    handler, port = relay
    both = customer(sql, "both", {"notify": "both", "admin_address": "admin@cust.example"})
    quiet = customer(sql, "quiet", {})
    event_id = quarantined(
        sql,
        customer_id=both,
        sender="carol@cust.example",  # forged as one of the recipients: she is not told
        recipients=("bob@cust.example", "carol@cust.example"),
    )
    quarantined(sql, customer_id=quiet)
    m = manager(sql, port, quarantine=NOTICES)
    assert m.notices_pass() == 2
    got = notices(handler)
    assert sorted(got) == ["admin@cust.example", "bob@cust.example"]
    body = got["bob@cust.example"][0].get_content()
    assert "invoice" in body and "Eicar-Test-Signature" in body
    # the portal's page of that message (goc/portal/app.py: /message/<event_id>)
    assert f"https://portal.unit.test/message/{event_id}" in body
    assert got["bob@cust.example"][0].get_content_type() == "text/plain"
    # Recorded: the next pass (a minute later) sends nothing again.
    assert m.notices_pass() == 0
    assert len(log_rows(sql, "notice")) == 2


def test_a_flood_is_batched_one_notice_per_address_a_minute(sql, relay) -> None:
    handler, port = relay
    cid = customer(sql, "flood", {"notify": "recipient"})
    now = datetime.now(UTC) + timedelta(seconds=1)  # after every row below was quarantined
    clock = Clock(now)
    for _ in range(30):
        quarantined(sql, customer_id=cid, recipients=("bob@cust.example",))
    m = manager(sql, port, clock=clock, quarantine=NOTICES)
    assert m.notices_pass() == 1
    assert "30 messages" in notices(handler)["bob@cust.example"][0]["Subject"]
    quarantined(sql, customer_id=cid, recipients=("bob@cust.example",))
    clock.at = now + timedelta(seconds=30)
    assert m.notices_pass() == 0  # bob had one less than a minute ago
    clock.at = now + timedelta(seconds=60)
    assert m.notices_pass() == 1


def test_a_flood_past_the_candidates_limit_is_noticed_in_turn(sql, relay, monkeypatch) -> None:
    handler, port = relay
    monkeypatch.setattr(qm, "NOTICE_CANDIDATES", 3)
    cid = customer(sql, "wave", {"notify": "recipient"})
    now = datetime.now(UTC)
    for i in range(7):
        quarantined(
            sql,
            customer_id=cid,
            recipients=(f"u{i}@cust.example",),
            scanned_at=now - timedelta(minutes=10 - i),
        )
    m = manager(sql, port, quarantine=NOTICES)
    assert [m.notices_pass() for _ in range(4)] == [3, 3, 1, 0]
    assert sorted(notices(handler)) == sorted(f"u{i}@cust.example" for i in range(7))


def test_the_budget_bounds_a_pass(sql, relay) -> None:
    handler, port = relay
    cid = customer(sql, "many", {"notify": "recipient"})
    for i in range(5):
        quarantined(sql, customer_id=cid, recipients=(f"u{i}@cust.example",))
    m = manager(sql, port, quarantine=NOTICES | {"notices_per_minute": 2})
    assert m.notices_pass() == 2
    assert m.notices_pass() == 2
    assert m.notices_pass() == 1


def test_digests_go_at_the_hour(sql, relay) -> None:
    handler, port = relay
    cid = customer(
        sql, "digest", {"notify": "admin", "admin_address": "admin@cust.example", "digest_hour": 9}
    )
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    for hour in (1, 5, 8):
        quarantined(sql, customer_id=cid, scanned_at=day + timedelta(hours=hour))
    late = quarantined(sql, customer_id=cid, scanned_at=day + timedelta(hours=9, minutes=30))
    clock = Clock(day + timedelta(hours=8, minutes=59))
    m = manager(sql, port, clock=clock, quarantine=NOTICES)
    assert m.notices_pass() == 0
    clock.at = day + timedelta(hours=9)
    assert m.notices_pass() == 1
    msg = notices(handler)["admin@cust.example"][0]
    assert "3 messages" in msg["Subject"] and "digest" in msg["Subject"]
    clock.at = day + timedelta(hours=23)
    assert m.notices_pass() == 0  # the 09:30 one waits for tomorrow's digest
    clock.at = day + timedelta(days=1, hours=9)
    assert m.notices_pass() == 1
    assert [str(late)] == [str(e) for e, _, _ in log_rows(sql, "notice")[3:]]


def test_a_hostile_subject_makes_a_well_formed_notice(sql, relay) -> None:
    handler, port = relay
    cid = customer(sql, "hostile", {"notify": "recipient"})
    quarantined(
        sql,
        customer_id=cid,
        recipients=("bob@cust.example",),
        subject="hi\r\nBcc: victim@else.example\r\n\r\n<html>\x07\x1b[31m",
        sender="x@evil.example\r\nX-Injected: yes",
    )
    quarantined(sql, customer_id=cid, recipients=("bob@cust.example",), subject="A" * 10_000)
    manager(sql, port, quarantine=NOTICES).notices_pass()
    (raw,) = [d.data for d in handler.delivered]
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["Bcc"] is None and msg["X-Injected"] is None
    assert not msg.defects
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    body = msg.get_content()
    assert "\x07" not in body and "\x1b" not in body
    assert "Bcc: victim@else.example" in body  # shown, on one line, as text
    assert max(len(line) for line in body.splitlines()) < 300
    assert msg.get_content_type() == "text/plain"


def test_a_failed_submit_is_tried_again(sql, relay) -> None:
    handler, port = relay
    cid = customer(sql, "retry", {"notify": "recipient"})
    quarantined(sql, customer_id=cid, recipients=("bob@cust.example",))
    handler.answers = ["451 4.3.0 try later"]
    now = datetime.now(UTC) + timedelta(seconds=1)
    clock = Clock(now)
    m = manager(sql, port, clock=clock, quarantine=NOTICES)
    assert m.notices_pass() == 0
    assert log_rows(sql, "notice") == []
    clock.at = now + timedelta(minutes=1)
    assert m.notices_pass() == 1
    assert len(handler.delivered) == 1


# -- outages ----------------------------------------------------------------------------------


def test_an_outage_of_the_goc_or_the_tower_sql_is_survived(sql, relay, caplog) -> None:
    caplog.set_level(logging.INFO, logger="mailtower.monitor.quarantine")
    handler, port = relay
    tower_sql, goc = sql
    m = manager(sql, port)
    loop = qm.QuarantineLoop(m)
    rid = request(sql, quarantined(sql, expires_in=timedelta(days=-1)))
    rid2 = request(sql, quarantined(sql))

    def once(name: str, job: Any) -> None:
        async def run() -> None:
            await loop._once(asyncio.get_running_loop(), name, job)

        asyncio.run(run())  # logged, never raised

    m.space_pass()  # both connections open before the outages
    goc.stop()
    try:
        once("actions", m.actions_pass)
    finally:
        goc.start()
    assert "event=quarantine_actions_failed host='GOC'" in caplog.text
    tower_sql.stop()
    try:
        once("expiry", m.expire_pass)
        once("actions", m.actions_pass)
    finally:
        tower_sql.start()
    assert "event=quarantine_expiry_failed host='tower SQL" in caplog.text
    assert goc_row(sql, rid2)[2] is False
    once("actions", m.actions_pass)
    once("expiry", m.expire_pass)
    assert "event=quarantine_actions_ok" in caplog.text
    assert "event=quarantine_expiry_ok" in caplog.text
    assert goc_row(sql, rid)[0] == "gone" and goc_row(sql, rid2)[0] == "released"
    assert len(handler.delivered) == 1
    loop.executor.shutdown()


def test_an_answer_the_tower_could_not_record_is_written_first_next_pass(sql, relay) -> None:
    """The relay said 250, then the tower's SQL failed: the answer is kept, never resent."""
    handler, port = relay
    rid = request(sql, quarantined(sql))
    m = manager(sql, port)
    real = m._move

    def fails_after_the_relay(request_id: uuid.UUID, old: str, new: str) -> bool:
        if new.startswith("released"):
            raise psycopg.OperationalError("the tower's SQL went away")
        return real(request_id, old, new)

    m._move = fails_after_the_relay  # type: ignore[method-assign]
    with pytest.raises(psycopg.OperationalError):
        m.actions_pass()
    m._move = real  # type: ignore[method-assign]
    assert m.actions_pass() == 1
    assert goc_row(sql, rid)[0] == "released"
    assert len(handler.delivered) == 1


def test_a_bug_on_one_request_does_not_hold_up_the_next(sql, relay, caplog) -> None:
    handler, port = relay
    first, second = request(sql, quarantined(sql)), request(sql, quarantined(sql))
    m = manager(sql, port)
    real = m.handle

    def buggy(req: qm.Request) -> qm.Outcome | None:
        if req.request_id == first:
            raise ValueError("a bug")
        return real(req)

    m.handle = buggy  # type: ignore[method-assign]
    assert m.actions_pass() == 1
    assert m.actions_pass() == 0
    assert caplog.text.count("event=quarantine_request_crashed") == 1
    assert goc_row(sql, second)[0] == "released" and goc_row(sql, first)[2] is False
    assert len(handler.delivered) == 1


def test_the_loop_runs_the_passes_until_stopped(sql, relay) -> None:
    """As the monitor runs it: the passes in their thread until ``stop`` is set."""
    handler, port = relay
    rid = request(sql, quarantined(sql))
    expired = quarantined(sql, expires_in=timedelta(days=-1))
    m = manager(sql, port, quarantine={"poll_interval_s": 0.05})
    loop = qm.QuarantineLoop(m)

    async def run() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(loop.run(stop))
        for _ in range(600):  # until the request is done (a busy machine may take a while)
            if await asyncio.to_thread(goc_row, sql, rid) == ("released", mock.ANY, True):
                break
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, 30)

    asyncio.run(run())
    assert goc_row(sql, rid)[0] == "released"
    assert not held(sql, expired)  # the expiry ran too, at the start
    assert len(handler.delivered) == 1
