"""The tower side of the quarantine (docs/quarantine.md), run by the monitor.

- **Actions**: every ``quarantine.poll_interval_s`` the GOC's pending ``quarantine_actions``
  of this tower (as ``mt_status_<tower>``, which row-level security confines to them) are
  carried out: a release re-injects the stored message to the relay's re-injection listener
  with its original sender and the requested recipients, a delete NULLs ``message``; the
  result goes back to the GOC (``done_at``, ``result``, ``answer``).
- **Expiry**: ``message`` of rows past ``expires_at`` is NULLed in batches, each logged
  ``expire``.
- **Space**: ``mailtower_quarantine_messages{customer}`` and ``..._bytes{customer}``.
- **Notices**: plain-text mail to the recipients and/or the customer's admin address, per the
  customer's policy, submitted to the relay on port 25 (``quarantine_notice``).

**A release is delivered at most once, and once unless the manager dies at one instant.**
Each request has one row in the tower's ``quarantine_log`` (``request_id`` UNIQUE), inserted
by the first manager to see it; its ``answer`` is the request's state, and every change of
state is a compare-and-set (``UPDATE … WHERE answer = <the state read>``), so of two managers
(or a restarted one and a stale one) exactly one wins each step:

``claimed <token>`` — an attempt owns it; nothing was sent. A claim older than
``STALE_CLAIM_S`` is taken over with a new token (its owner died, or will find its token gone
at its next step and drop its SMTP transaction without ending DATA: the relay keeps nothing).
``sending <token>`` — set just before the message's final ``.``: the only state in which the
relay may hold the message. It is left only by the owner with the relay's answer:
``released: …`` (250), ``deferred: …`` (4xx: taken again after ``RETRY_S``, by a new claim),
``failed: …`` (5xx), or ``failed: in doubt …`` when the connection broke before the answer.
A ``sending`` row whose owner died (a crash, a power cut between the final dot and the
answer's record) is never sent again on its own: after ``IN_DOUBT_S`` it is answered
``failed`` with an "in doubt" answer (check the relay's log; a new request sends it again).
``released``, ``deleted``, ``failed``, ``gone`` — final; the result is (re)written to the GOC
until the GOC has it, so a restart between the tower's record and the GOC's changes nothing.
When recording an answer the relay gave fails (tower SQL down), the manager keeps it and
writes it first on its next pass.

A delete NULLs ``message`` and inserts its log row in one transaction: exactly once.

Every blocking call runs in one thread of its own (one pass at a time, never piling up); an
outage of the GOC or the tower's SQL is logged (host, fix) and retried on the next pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import smtplib
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from mailtower import quarantine as rows
from mailtower.customers.policy import CustomerPolicy, PolicyError, parse
from mailtower.goc.eye.status import status_role
from mailtower.monitor import quarantine_notice as notice
from mailtower.monitor.errors import (
    QuarantineGocDown,
    QuarantineManagerError,
    ReleaseDeferred,
    ReleaseInDoubt,
    ReleaseRefused,
)
from mailtower.monitor.goc_status import GOC_CONNECT
from mailtower.monitor.metrics import MonitorMetrics
from mailtower.settings import TowerSettings

log = logging.getLogger("mailtower.monitor.quarantine")

STALE_CLAIM_S = 300.0  # a claim not moved on for this long lost its owner (SMTP timeouts < it)
RETRY_S = 60.0  # a release the relay deferred is tried again after this
IN_DOUBT_S = 900.0  # a "sending" row this old lost its owner between the final dot and the answer
GIVE_UP_AFTER = timedelta(days=3)  # a release deferred this long (since requested) fails
EXPIRE_BATCH = 500  # rows per expiry transaction…
EXPIRE_BATCHES = 20  # …and transactions per pass (the rest next pass)
NOTICE_INTERVAL_S = 60.0  # one notice pass a minute: at most one notice per address each
NOTICE_WINDOW = timedelta(days=2)  # quarantines older than this get no notice any more
NOTICE_CANDIDATES = 5000  # rows one notice pass reads at most
NOTICE_LOCK = 0x6D74_716E  # pg advisory lock: one manager's notice pass at a time per tower
SMTP_TIMEOUT_S = 30.0  # postscreen makes a new client wait its greet_wait (6 s) once a day
# Pending requests read per pass, oldest first (ones waiting for a retry cost one query each).
REQUESTS_PER_PASS = 500
NO_CUSTOMER = "-"  # the metrics' customer label of quarantines under the tower's own policy

TOWER_CONNECT: dict[str, Any] = GOC_CONNECT | {
    "options": "-c statement_timeout=30000"  # a message of 50 MB is read well within it
}

# -- the tower's SQL ----------------------------------------------------------------------

CLAIM = """
INSERT INTO quarantine_log (event_id, quarantine_id, action, by, recipients, answer, request_id)
VALUES (%(event_id)s, %(quarantine_id)s, %(action)s, %(by)s, %(recipients)s, %(answer)s,
        %(request_id)s)
ON CONFLICT (request_id) DO NOTHING
RETURNING id
"""
STATE = """
SELECT answer, extract(epoch FROM now() - at) AS age_s FROM quarantine_log
WHERE request_id = %s
"""
MOVE = """
UPDATE quarantine_log SET answer = %(new)s, at = now()
WHERE request_id = %(request_id)s AND answer = %(old)s
RETURNING id
"""
MESSAGE = """
SELECT sender, recipients, message, verdict, quarantine_id,
       expires_at IS NOT NULL AND expires_at < now() AS expired,
       customer_id IS NULL OR quarantine_meta ? 'unprocessable' AS operators_only
FROM verdict_events WHERE event_id = %s
"""
DELETE = """
UPDATE verdict_events SET message = NULL WHERE event_id = %s AND message IS NOT NULL
"""
EXPIRE = """
WITH batch AS (
    SELECT event_id FROM verdict_events
    WHERE message IS NOT NULL AND expires_at < now()
    ORDER BY expires_at LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
), expired AS (
    UPDATE verdict_events v SET message = NULL FROM batch
    WHERE v.event_id = batch.event_id AND v.message IS NOT NULL
    RETURNING v.event_id, v.quarantine_id
)
INSERT INTO quarantine_log (event_id, quarantine_id, action, by)
SELECT event_id, coalesce(quarantine_id, ''), 'expire', %(by)s FROM expired
"""
SPACE = """
SELECT coalesce(c.name, %s) AS customer, count(*) AS messages,
       coalesce(sum(octet_length(v.message)), 0) AS bytes
FROM verdict_events v LEFT JOIN customers c ON c.id = v.customer_id
WHERE v.message IS NOT NULL
GROUP BY 1
"""
NOTICE_CANDIDATES_SQL = """
SELECT v.event_id, v.quarantine_id, v.customer_id, v.scanned_at, v.sender, v.recipients,
       v.subject, v.verdict, v.findings, p.policy
FROM verdict_events v JOIN policies p ON p.customer_id = v.customer_id
WHERE v.quarantine_id IS NOT NULL AND v.message IS NOT NULL
  AND v.scanned_at > %(since)s
  AND coalesce(p.policy ->> 'notify', 'none') <> 'none'
  AND NOT EXISTS (SELECT 1 FROM quarantine_log l WHERE l.event_id = v.event_id
                  AND l.action = 'notice' AND l.recipients = '{}')
ORDER BY v.scanned_at
LIMIT %(limit)s
"""
NOTICED = """
SELECT event_id, lower(unnest(recipients)) FROM quarantine_log
WHERE action = 'notice' AND event_id = ANY(%s)
"""
RECENTLY_NOTICED = """
SELECT DISTINCT lower(unnest(recipients)) FROM quarantine_log
WHERE action = 'notice' AND at > %s
"""
# An event all of whose notices went out: a notice row without recipients, so the candidates
# query passes over it (a flood's first NOTICE_CANDIDATES rows never hide the rest).
MARK_NOTICED = """
INSERT INTO quarantine_log (event_id, quarantine_id, action, at, by, answer)
SELECT e, q, 'notice', %(at)s, %(by)s, 'every notice sent'
FROM unnest(%(events)s::uuid[], %(qids)s::text[]) AS t(e, q)
"""
RECORD_NOTICE = """
INSERT INTO quarantine_log (event_id, quarantine_id, action, at, by, recipients, answer)
SELECT e, q, 'notice', %(at)s, %(by)s, ARRAY[%(to)s]::text[], %(answer)s
FROM unnest(%(events)s::uuid[], %(qids)s::text[]) AS t(e, q)
"""

# -- the GOC ------------------------------------------------------------------------------

PENDING = """
SELECT request_id, event_id, quarantine_id, action, recipients, requested_by, requested_at,
       answer
FROM quarantine_actions
WHERE tower = %s AND done_at IS NULL
ORDER BY requested_at
LIMIT %s
"""
DONE = """
UPDATE quarantine_actions SET done_at = now(), result = %s, answer = %s
WHERE request_id = %s AND done_at IS NULL
"""
PROGRESS = """
UPDATE quarantine_actions SET answer = %s
WHERE request_id = %s AND done_at IS NULL AND answer IS DISTINCT FROM %s
"""

FINAL = ("released", "deleted", "failed", "gone")


@dataclass(frozen=True)
class Request:
    request_id: uuid.UUID
    event_id: uuid.UUID
    quarantine_id: str
    action: str
    recipients: tuple[str, ...]
    requested_by: str
    requested_at: datetime
    answer: str | None = None


@dataclass
class Outcome:
    """Where a request stands after a pass: final (``result``) or not yet (None)."""

    result: str | None
    answer: str


def state_of(answer: str | None) -> str:
    """The state word of a claim row's ``answer`` ("claimed", "sending", "deferred", …)."""
    return (answer or "").split(" ", 1)[0].rstrip(":")


def outcome_of(answer: str) -> Outcome:
    """A final claim row's answer as the GOC's result and answer."""
    word, _, text = answer.partition(": ")
    return Outcome(word if word in FINAL else "failed", text or answer)


def _text(exc: BaseException) -> str:
    return " ".join((str(exc) or type(exc).__name__).split())[:500]


class _Streak:
    """A lasting failure is logged once, then once a minute; its end once."""

    def __init__(self) -> None:
        self.failures = 0
        self._next = 0.0

    def failed(self) -> bool:
        self.failures += 1
        now = time.monotonic()
        if self.failures == 1 or now >= self._next:
            self._next = now + 60.0
            return True
        return False

    def recovered(self) -> int:
        failures, self.failures = self.failures, 0
        return failures


@dataclass
class _Unrecorded:
    """An answer the relay gave that the tower's SQL has not recorded yet."""

    request_id: uuid.UUID
    old: str
    new: str


@dataclass
class _UnrecordedNotice:
    to: str
    items: list[notice.Item]
    at: datetime
    answer: str


class _ClaimLost(ReleaseDeferred):
    """Another manager took the request over before the last dot: this one sent nothing."""


class Relay:
    """SMTP to the tower's relay: releases to its re-injection listener, notices to port 25."""

    def __init__(self, settings: TowerSettings) -> None:
        self.host = str(settings.hosts.relay)
        self.reinject_port = settings.ports.reinject
        self.smtp_port = settings.ports.smtp
        self.timeout_s = settings.limits.reinject_timeout_s
        self._helo: str | None = None

    @property
    def helo(self) -> str:
        """This host's name for EHLO, looked up on first use (in the manager's thread: a slow
        resolver must not stall the monitor's event loop)."""
        if self._helo is None:
            self._helo = socket.getfqdn()
        return self._helo

    def release(
        self,
        data: bytes,
        mail_from: str,
        rcpt_tos: Sequence[str],
        before_last_dot: Callable[[], bool],
    ) -> str:
        """Send ``data`` with this envelope; ``before_last_dot`` is called once the relay
        accepted DATA: False drops the transaction (nothing taken). Return the relay's 250
        answer; raise ReleaseDeferred (4xx, unreachable, dropped), ReleaseRefused (5xx),
        ReleaseInDoubt (no answer after the last dot)."""
        where = f"relay {self.host}:{self.reinject_port}"
        try:
            smtp = smtplib.SMTP(
                self.host, self.reinject_port, local_hostname=self.helo, timeout=self.timeout_s
            )
        except (OSError, smtplib.SMTPException) as exc:
            raise ReleaseDeferred(f"{where}: {_text(exc)}") from exc
        try:
            try:
                smtp.ehlo()
                sender = _smtp_address(mail_from)
                recipients = [_smtp_address(r) for r in rcpt_tos]
                options = b""
                if any(b > 0x7F for b in data) and smtp.has_extn("8bitmime"):
                    options += b" BODY=8BITMIME"
                if not all(a.isascii() for a in (sender, *recipients)):
                    if not smtp.has_extn("smtputf8"):
                        raise ReleaseRefused(f"{where}: a non-ASCII address and no SMTPUTF8")
                    options += b" SMTPUTF8"
                _expect(smtp, b"MAIL FROM:" + sender + options, (250,), where)
                for rcpt in recipients:
                    _expect(smtp, b"RCPT TO:" + rcpt, (250, 251), where)
                _expect(smtp, b"DATA", (354,), where)
            except (OSError, smtplib.SMTPException) as exc:
                raise ReleaseDeferred(f"{where}: {_text(exc)}") from exc
            if not before_last_dot():
                raise _ClaimLost(f"{where}: dropped before the last dot (claim lost)")
            try:
                smtp.send(_dot_stuffed(data))
                code, text = smtp.getreply()
            except (OSError, smtplib.SMTPException) as exc:
                raise ReleaseInDoubt(f"{where}: no answer to the message's end: {exc}") from exc
            answer = f"{code} {text.decode('utf-8', 'replace')}"
            if code == 250:
                with contextlib.suppress(OSError, smtplib.SMTPException):
                    smtp.quit()
                return answer
            if 500 <= code <= 599:
                raise ReleaseRefused(f"{where}: {answer}")
            if 400 <= code <= 499:
                raise ReleaseDeferred(f"{where}: {answer}")
            # no SMTP reply at all: whether the relay took the message is not known
            raise ReleaseInDoubt(f"{where}: no SMTP reply to the message's end: {answer}")
        finally:
            smtp.close()

    def submit(self, to: str, message: bytes) -> str:
        """Submit a notice to the relay's port 25 (null envelope sender: no bounce comes back).
        Raise ReleaseDeferred (try again) or ReleaseRefused (never)."""
        where = f"relay {self.host}:{self.smtp_port}"
        try:
            with smtplib.SMTP(
                self.host, self.smtp_port, local_hostname=self.helo, timeout=SMTP_TIMEOUT_S
            ) as smtp:
                smtp.sendmail("", [to], message)
                return f"250 to {to}"
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = next(iter(exc.recipients.values()))
            cls = ReleaseRefused if 500 <= code <= 599 else ReleaseDeferred
            raise cls(f"{where}: RCPT TO:<{to}> {code} {text!r}") from exc
        except smtplib.SMTPResponseException as exc:
            cls = ReleaseRefused if 500 <= exc.smtp_code <= 599 else ReleaseDeferred
            raise cls(f"{where}: {exc.smtp_code} {exc.smtp_error!r}") from exc
        except (OSError, smtplib.SMTPException) as exc:
            raise ReleaseDeferred(f"{where}: {_text(exc)}") from exc


def _smtp_address(addr: str) -> bytes:
    if addr in ("", "<>"):
        return b"<>"
    if any(c in addr for c in "\r\n\0<>"):
        raise ReleaseRefused(f"address {addr!r} cannot be sent")
    try:
        return b"<" + addr.encode("utf-8") + b">"
    except UnicodeEncodeError:
        raise ReleaseRefused(f"address {addr!r} is not valid UTF-8") from None


def _expect(smtp: smtplib.SMTP, line: bytes, codes: tuple[int, ...], where: str) -> None:
    smtp.send(line + b"\r\n")
    code, text = smtp.getreply()
    if code not in codes:
        what = line.split(b":", 1)[0].decode("ascii", "replace")
        answer = f"{where}: {what} answered {code} {text.decode('utf-8', 'replace')}"
        raise (ReleaseRefused if 500 <= code <= 599 else ReleaseDeferred)(answer)


def _dot_stuffed(data: bytes) -> bytes:
    stuffed = data.replace(b"\n.", b"\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


def _header(value: str) -> str:
    return notice.clean(value, 200).replace(";", ",")


@dataclass
class QuarantineManager:
    """The blocking side: one pass of each job at a time (the async loop runs them in a
    thread of their own). ``now`` is the notices' clock (tests pass a fake one)."""

    settings: TowerSettings
    metrics: MonitorMetrics | None = None
    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    tower_dsn: str = ""
    goc_dsn: str | None = None
    relay: Relay | None = None
    by: str = "monitor"
    stale_claim_s: float = STALE_CLAIM_S
    retry_s: float = RETRY_S
    in_doubt_s: float = IN_DOUBT_S

    def __post_init__(self) -> None:
        s = self.settings
        if not self.tower_dsn:
            self.tower_dsn = s.sql_dsn("mailtower_monitor", s.secret("sql_monitor"), writable=True)
        if self.goc_dsn is None and s.goc is not None:
            self.goc_dsn = s.goc_conninfo(status_role(s.name), s.secret("goc_status"))
        self.relay = self.relay or Relay(s)
        self._tower: psycopg.Connection[Any] | None = None
        self._goc: psycopg.Connection[Any] | None = None
        self._unrecorded: list[_Unrecorded] = []
        self._unrecorded_notices: list[_UnrecordedNotice] = []
        self._customers: set[str] = set()
        self._crashed: set[uuid.UUID] = set()  # requests a bug failed on (logged once each)
        self.notices_off_logged = False

    # -- connections ----------------------------------------------------------------------

    def tower(self) -> psycopg.Connection[Any]:
        if self._tower is None or self._tower.closed:
            self._tower = psycopg.connect(self.tower_dsn, autocommit=True, **TOWER_CONNECT)
        return self._tower

    def goc(self) -> psycopg.Connection[Any]:
        assert self.goc_dsn is not None
        if self._goc is None or self._goc.closed:
            self._goc = psycopg.connect(self.goc_dsn, autocommit=True, **GOC_CONNECT)
        return self._goc

    def goc_execute(self, query: str, params: Sequence[Any]) -> list[Any]:
        """Run ``query`` at the GOC; its rows (none for an UPDATE). QuarantineGocDown when the
        GOC does not answer or refuses (the connection is dropped: the next call reconnects)."""
        try:
            cur = self.goc().execute(query, params)
            return cur.fetchall() if cur.description is not None else []
        except psycopg.Error as exc:
            self.drop("goc")
            raise QuarantineGocDown(_text(exc)) from exc

    def drop(self, which: str) -> None:
        conn = self._tower if which == "tower" else self._goc
        if which == "tower":
            self._tower = None
        else:
            self._goc = None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def close(self) -> None:
        self.drop("tower")
        self.drop("goc")

    # -- actions --------------------------------------------------------------------------

    def actions_pass(self) -> int:
        """Carry out this tower's pending requests; return how many were finished."""
        self._record_unrecorded()
        if self.goc_dsn is None:
            return 0
        rows = self.goc_execute(PENDING, (self.settings.name, REQUESTS_PER_PASS))
        if self.metrics is not None:
            self.metrics.quarantine_pending.set(len(rows))
        finished = 0
        for row in rows:
            request = Request(*row)
            try:
                outcome = self.handle(request)
            except (psycopg.Error, QuarantineGocDown):
                raise  # an outage: the whole pass fails, and runs again
            except Exception:
                # A bug on this one request must not hold up the others behind it.
                if request.request_id not in self._crashed:
                    self._crashed.add(request.request_id)
                    log.exception("event=quarantine_request_crashed request=%s", request.request_id)
                continue
            if outcome is None:
                continue
            if outcome.result is None:
                if outcome.answer != request.answer:
                    self.goc_execute(PROGRESS, (outcome.answer, request.request_id, outcome.answer))
                continue
            self.goc_execute(DONE, (outcome.result, outcome.answer, request.request_id))
            finished += 1
            if self.metrics is not None:
                self.metrics.quarantine_actions.labels(request.action, outcome.result).inc()
            log.info(
                "event=quarantine_action request=%s action=%s quarantine_id=%s result=%s answer=%r",
                request.request_id,
                request.action,
                notice.clean(request.quarantine_id, 100),
                outcome.result,
                outcome.answer,
            )
        return finished

    def handle(self, request: Request) -> Outcome | None:
        """One request, as far as it goes now; None: another manager has it in hand."""
        if request.action == "delete":
            return self._delete(request)
        if request.action != "release":
            return Outcome("failed", f"unknown action {notice.clean(request.action, 40)!r}")
        token = secrets.token_hex(8)
        claimed = f"claimed {token}"
        conn = self.tower()
        inserted = conn.execute(
            CLAIM,
            {
                "event_id": request.event_id,
                "quarantine_id": request.quarantine_id,
                "action": "release",
                "by": _header(request.requested_by),
                "recipients": list(request.recipients),
                "answer": claimed,
                "request_id": request.request_id,
            },
        ).fetchone()
        if inserted is None:
            row = conn.execute(STATE, (request.request_id,)).fetchone()
            if row is None:  # deleted by hand meanwhile: nothing to go on, next pass
                return None
            answer, age_s = row[0], float(row[1] or 0.0)
            state = state_of(answer)
            if state in FINAL:
                return outcome_of(answer)
            if state == "sending":
                if age_s < self.in_doubt_s:
                    return None  # its owner waits for the relay's answer
                doubt = (
                    "failed: in doubt: the manager stopped between the message's end and the "
                    "relay's answer; the relay may have delivered it (search its log for "
                    f"X-Mailtower-Released id={request.request_id}); ask again to send it again"
                )
                if self._move(request.request_id, answer, doubt):
                    return outcome_of(doubt)
                return None
            stale = state == "claimed" and age_s >= self.stale_claim_s
            retry = state == "deferred" and age_s >= self.retry_s
            if not (stale or retry):
                return Outcome(None, answer.partition(": ")[2]) if state == "deferred" else None
            if not self._move(request.request_id, answer, claimed):
                return None  # another manager took it first
        return self._release(request, token)

    def _move(self, request_id: uuid.UUID, old: str, new: str) -> bool:
        row = self.tower().execute(MOVE, {"request_id": request_id, "old": old, "new": new})
        return row.fetchone() is not None

    def _release(self, request: Request, token: str) -> Outcome | None:
        claimed, sending = f"claimed {token}", f"sending {token}"
        rid = request.request_id

        def finish(state: str, text: str, *, old: str = claimed) -> Outcome | None:
            new = f"{state}: {text}"
            try:
                moved = self._move(rid, old, new)
            except Exception:
                if old == sending:  # the relay answered: keep its answer, record it later
                    self._unrecorded.append(_Unrecorded(rid, old, new))
                raise
            if not moved:
                log.error("event=quarantine_claim_lost request=%s state=%s", rid, state)
                return None
            return Outcome(None, text) if state == "deferred" else outcome_of(new)

        row = self.tower().execute(MESSAGE, (request.event_id,)).fetchone()
        if row is None:
            return finish("gone", f"no event {request.event_id} on tower {self.settings.name}")
        sender, recipients, message, verdict, _qid, expired, operators_only = row
        if message is None or expired:
            return finish("gone", "the message expired or was deleted")
        # The portal shows these to no customer; refused here too, whatever asked (defence in
        # depth): a message set aside unscanned, or held under no customer's policy, is
        # released by an operator only; a virus is never released on a user's word.
        who = request.requested_by
        if operators_only and not who.startswith("operator:"):
            return finish("failed", "refused: set aside or held by the tower: operators only")
        if verdict == "virus" and who.startswith("user:"):
            return finish("failed", "refused: a virus is released by the customer's admin only")
        chosen, refused = _recipients(request.recipients, recipients)
        if refused:
            shown = ", ".join(notice.clean(r, 100) for r in refused[:5])
            return finish("failed", f"refused: not recipients of the message: {shown}")
        # Never twice to one recipient: what an operator (`mailtower quarantine release`) or
        # another request already released is left out, under the lock both take.
        conn = self.tower()
        with conn.transaction():
            conn.execute(rows.ACTION_LOCK, (request.event_id,))
            covered = self._covered(request, recipients)
            if all(r.lower() in covered for r in chosen):
                return finish("released", _already(chosen, covered))
        if datetime.now(UTC) - request.requested_at > GIVE_UP_AFTER:
            return finish("failed", f"deferred since {request.requested_at:%Y-%m-%d %H:%M} UTC")
        skipped = [r for r in chosen if r.lower() in covered]
        chosen = [r for r in chosen if r.lower() not in covered]
        header = (
            f"X-Mailtower-Released: {datetime.now(UTC).isoformat(timespec='seconds')}; "
            f"by={_header(request.requested_by)}; id={rid}\r\n"
            f"X-Mailtower-Verdict: released; was={_header(verdict)}; "
            f"tower={self.settings.name}; id={_header(request.quarantine_id)}\r\n"
        ).encode()

        sent_state = [claimed]  # the claim row's state once the relay had the DATA

        def before_last_dot() -> bool:
            # The check again and the move to "sending" in one transaction under ACTION_LOCK:
            # an operator's release holds it from its own check to its log row, so of the two
            # one sees the other (its log row, or this "sending").
            with conn.transaction():
                conn.execute(rows.ACTION_LOCK, (request.event_id,))
                now_covered = self._covered(request, recipients)
                if any(r.lower() in now_covered for r in chosen):
                    # released meanwhile: nothing is sent now; the next attempt leaves out
                    # whom it covers (or answers released, when it covers them all)
                    done = [r for r in chosen if r.lower() in now_covered]
                    self._move(rid, claimed, f"deferred: meanwhile {_already(done, now_covered)}")
                    return False
                if self._move(rid, claimed, sending):
                    sent_state[0] = sending
                    return True
            return False

        assert self.relay is not None
        try:
            answer = self.relay.release(
                header + bytes(message), sender or "", chosen, before_last_dot
            )
        except ReleaseInDoubt as exc:
            return finish(
                "failed",
                f"in doubt: {exc}; the relay may have delivered it (search its log for "
                f"X-Mailtower-Released id={rid}); ask again to send it again",
                old=sending,
            )
        except ReleaseRefused as exc:
            return finish("failed", str(exc), old=sent_state[0])
        except _ClaimLost:
            return None  # another manager took the request over
        except ReleaseDeferred as exc:
            return finish("deferred", str(exc), old=sent_state[0])
        if skipped:
            answer += f"; {_already(skipped, covered, to=True)}"
        return finish("released", answer, old=sending)

    def _covered(self, request: Request, recipients: Sequence[str]) -> dict[str, rows.Release]:
        """The message's recipients (lower case) an earlier release the relay took covered."""
        done = rows.releases(self.tower(), request.event_id, besides=request.request_id)
        return rows.released_to(done, recipients)

    def _state(self, request_id: uuid.UUID) -> str | None:
        row = self.tower().execute(STATE, (request_id,)).fetchone()
        return None if row is None else str(row[0])

    def _delete(self, request: Request) -> Outcome | None:
        conn = self.tower()
        with conn.transaction():
            deleted = conn.execute(DELETE, (request.event_id,)).rowcount
            answer = (
                f"deleted: by {_header(request.requested_by)}"
                if deleted
                else "gone: the message had expired or was deleted already"
            )
            inserted = conn.execute(
                CLAIM,
                {
                    "event_id": request.event_id,
                    "quarantine_id": request.quarantine_id,
                    "action": "delete",
                    "by": _header(request.requested_by),
                    "recipients": [],
                    "answer": answer,
                    "request_id": request.request_id,
                },
            ).fetchone()
            if inserted is not None:
                return outcome_of(answer)
            raise psycopg.Rollback()  # done before: report what was done then
        state = self._state(request.request_id)
        return outcome_of(state) if state and state_of(state) in FINAL else None

    def _record_unrecorded(self) -> None:
        while self._unrecorded:
            item = self._unrecorded[0]
            self._move(item.request_id, item.old, item.new)  # raises while SQL is down
            self._unrecorded.pop(0)

    # -- expiry and space -----------------------------------------------------------------

    def expire_pass(self) -> int:
        """NULL the messages past their expiry, in batches; return how many."""
        conn, total = self.tower(), 0
        for _ in range(EXPIRE_BATCHES):
            with conn.transaction():
                done = conn.execute(EXPIRE, {"batch": EXPIRE_BATCH, "by": self.by}).rowcount
            total += done
            if done < EXPIRE_BATCH:
                break
        if total:
            log.info("event=quarantine_expired messages=%d", total)
            if self.metrics is not None:
                self.metrics.quarantine_expired.inc(total)
        return total

    def space_pass(self) -> dict[str, tuple[int, int]]:
        """Held messages and bytes per customer, into the metrics; returned for tests."""
        rows = self.tower().execute(SPACE, (NO_CUSTOMER,)).fetchall()
        space = {str(c): (int(n), int(b)) for c, n, b in rows}
        if self.metrics is not None:
            m = self.metrics
            for customer, (messages, size) in space.items():
                m.quarantine_messages.labels(customer).set(messages)
                m.quarantine_bytes.labels(customer).set(size)
            for gone in self._customers - set(space):
                with contextlib.suppress(KeyError):
                    m.quarantine_messages.remove(gone)
                    m.quarantine_bytes.remove(gone)
        self._customers = set(space)
        return space

    # -- notices --------------------------------------------------------------------------

    def notices_pass(self) -> int:
        """Send the notices due now (at most ``notices_per_minute``, one per address);
        return how many were sent."""
        q = self.settings.quarantine
        if q.notice_from is None:
            return 0
        self._record_unrecorded_notices()
        conn = self.tower()
        locked = conn.execute("SELECT pg_try_advisory_lock(%s)", (NOTICE_LOCK,)).fetchone()
        if not (locked and locked[0]):
            return 0  # another manager of this tower is at it
        try:
            return self._notices(conn, q.notice_from, q.notices_per_minute)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (NOTICE_LOCK,))

    def _notices(self, conn: psycopg.Connection[Any], sender: str, budget: int) -> int:
        now = self.now()
        rows = conn.execute(
            NOTICE_CANDIDATES_SQL,
            {"since": now - NOTICE_WINDOW, "limit": NOTICE_CANDIDATES},
            prepare=False,
        ).fetchall()
        if not rows:
            return 0
        noticed = {
            (str(e), a) for e, a in conn.execute(NOTICED, ([r[0] for r in rows],)).fetchall()
        }
        recent = {
            a
            for (a,) in conn.execute(
                RECENTLY_NOTICED, (now - timedelta(seconds=NOTICE_INTERVAL_S),)
            ).fetchall()
        }
        policies: dict[int, CustomerPolicy | None] = {}
        due: dict[str, list[notice.Item]] = {}
        digest: dict[str, bool] = {}
        wanted: dict[str, tuple[str, set[str]]] = {}  # due event -> (its id, addresses to tell)
        for (
            event_id,
            qid,
            customer_id,
            scanned_at,
            sender_addr,
            rcpts,
            subject,
            verdict,
            findings,
            raw,
        ) in rows:
            if customer_id not in policies:
                try:
                    policies[customer_id] = parse(raw or {})
                except PolicyError:
                    log.error("event=quarantine_notice_bad_policy customer_id=%s", customer_id)
                    policies[customer_id] = None
            policy = policies[customer_id]
            if policy is None or notice.due_at(scanned_at, policy.digest_hour) > now:
                continue
            item = notice.Item(
                str(event_id),
                qid,
                scanned_at,
                sender_addr,
                subject,
                verdict,
                tuple(str(f.get("name", "")) for f in (findings or []) if isinstance(f, dict)),
            )
            keys: set[str] = set()
            wanted[item.event_id] = (qid, keys)
            for to in notice.targets(policy, sender_addr, rcpts):
                if not notice.notifiable(to):
                    log.warning(
                        "event=quarantine_notice_skipped quarantine_id=%s to=%r "
                        "reason='not a plain ASCII address'",
                        notice.clean(qid, 100),
                        notice.clean(to),
                    )
                    continue
                key = to.lower()
                keys.add(key)
                if (item.event_id, key) in noticed or key in recent:
                    continue
                due.setdefault(to, []).append(item)
                digest[to] = digest.get(to, False) or policy.digest_hour is not None
        sent = 0
        for attempts, (to, items) in enumerate(due.items()):
            if attempts >= budget:
                log.info("event=quarantine_notices_later addresses=%d", len(due) - attempts)
                break
            msg = notice.build(
                to=to,
                items=items,
                sender=sender,
                tower=self.settings.name,
                hostname=self.settings.hostname,
                portal_url=self.settings.quarantine.portal_url,
                now=now,
                digest=digest[to],
            )
            assert self.relay is not None
            try:
                answer = self.relay.submit(to, msg.as_bytes())
            except ReleaseDeferred as exc:
                # The relay is down or busy: the rest waits for the next pass too.
                log.warning("event=quarantine_notice_deferred to=%s error=%r", to, str(exc))
                if self.metrics is not None:
                    self.metrics.quarantine_notices.labels("deferred").inc()
                break
            except ReleaseRefused as exc:
                # recorded as done: the relay will never take it (an address it does not relay)
                log.error("event=quarantine_notice_refused to=%s error=%r", to, str(exc))
                answer = f"refused: {exc}"
                if self.metrics is not None:
                    self.metrics.quarantine_notices.labels("refused").inc()
            else:
                sent += 1
                if self.metrics is not None:
                    self.metrics.quarantine_notices.labels("sent").inc()
            record = _UnrecordedNotice(to, items, now, answer)
            try:
                self._record_notice(record)
            except Exception:
                self._unrecorded_notices.append(record)  # written first next pass
                raise
            noticed.update((i.event_id, to.lower()) for i in items)
        complete = [
            (event, qid)
            for event, (qid, keys) in wanted.items()
            if all((event, k) in noticed for k in keys)
        ]
        if complete:
            conn.execute(
                MARK_NOTICED,
                {
                    "at": now,
                    "by": self.by,
                    "events": [e for e, _ in complete],
                    "qids": [q for _, q in complete],
                },
            )
        return sent

    def _record_notice(self, record: _UnrecordedNotice) -> None:
        self.tower().execute(
            RECORD_NOTICE,
            {
                "at": record.at,
                "by": self.by,
                "to": record.to,
                "answer": record.answer[:500],
                "events": [i.event_id for i in record.items],
                "qids": [i.quarantine_id for i in record.items],
            },
        )

    def _record_unrecorded_notices(self) -> None:
        while self._unrecorded_notices:
            self._record_notice(self._unrecorded_notices[0])
            self._unrecorded_notices.pop(0)


def _already(
    addresses: Sequence[str], covered: dict[str, rows.Release], *, to: bool = False
) -> str:
    """``already released [to a, b] by <who> at <when>[, and by …]`` for an answer."""
    found = list(dict.fromkeys(covered[a.lower()] for a in addresses))
    whom = f"to {', '.join(addresses)} " if to else ""
    text = f"already released {whom}" + ", and ".join(r.describe() for r in found)
    return notice.clean(text, 500)


def _recipients(requested: Sequence[str], held: Sequence[str]) -> tuple[list[str], list[str]]:
    """The message's own spelling of each requested recipient (compared without case; none
    requested: all of them), and the requested addresses that are not among them."""
    if not requested:
        return list(held), []
    by_key = {r.lower(): r for r in held}
    chosen, refused = [], []
    for r in requested:
        if r.lower() in by_key:
            if by_key[r.lower()] not in chosen:
                chosen.append(by_key[r.lower()])
        else:
            refused.append(r)
    return chosen, refused


# -- the loop in the monitor -------------------------------------------------------------


class QuarantineLoop:
    """Runs the manager's passes on their intervals in one thread of their own; a failure
    is logged with its host and fix, counted, and the pass runs again next time."""

    def __init__(self, manager: QuarantineManager) -> None:
        self.manager = manager
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quarantine")
        self._streaks: dict[str, _Streak] = {}

    async def run(self, stop: asyncio.Event) -> None:
        q = self.manager.settings.quarantine
        jobs: list[tuple[str, Callable[[], int | dict[str, tuple[int, int]]], float]] = [
            ("expiry", self.manager.expire_pass, q.housekeeping_interval_s),
            ("space", self.manager.space_pass, q.housekeeping_interval_s),
            ("notices", self.manager.notices_pass, NOTICE_INTERVAL_S),
        ]
        if self.manager.goc_dsn is not None:
            jobs.insert(0, ("actions", self.manager.actions_pass, q.poll_interval_s))
        if q.notice_from is None:
            log.info("event=quarantine_notices_off hint='set quarantine.notice_from to send them'")
        due = dict.fromkeys((name for name, _, _ in jobs), 0.0)
        loop = asyncio.get_running_loop()
        try:
            while not stop.is_set():
                for name, job, interval in jobs:
                    if time.monotonic() < due[name] or stop.is_set():
                        continue
                    # the next run a whole interval after this one's start (fixed rate)
                    due[name] = time.monotonic() + interval
                    await self._once(loop, name, job)
                wait = max(0.0, min(due.values()) - time.monotonic())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
        finally:
            self.executor.submit(self.manager.close)
            self.executor.shutdown(wait=False)

    async def _once(
        self, loop: asyncio.AbstractEventLoop, name: str, job: Callable[[], Any]
    ) -> None:
        streak = self._streaks.setdefault(name, _Streak())
        try:
            await loop.run_in_executor(self.executor, job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failed(name, exc, streak)
            return
        if failures := streak.recovered():
            log.info("event=quarantine_%s_ok after_failures=%d", name, failures)

    def failed(self, name: str, exc: Exception, streak: _Streak) -> None:
        m, s = self.manager, self.manager.settings
        if m.metrics is not None:
            m.metrics.quarantine_failures.labels(name).inc()
        if isinstance(exc, QuarantineGocDown):
            host = f"GOC {s.goc.address}:{s.goc.port}" if s.goc is not None else "GOC"
            fix = (
                "check the GOC's PostgreSQL is up and deployed (mailtower sync goc: table "
                f"quarantine_actions, role {status_role(s.name)}); requests wait there"
            )
        elif isinstance(exc, psycopg.Error):
            m.drop("tower")
            host = f"tower SQL {','.join(str(h) for h in s.hosts.sql)}:{s.ports.postgres}"
            fix = (
                "check the tower's SQL primary is up and its schema deployed (the monitor's "
                "grants in schema.sql); nothing is lost, the pass runs again"
            )
        elif isinstance(exc, QuarantineManagerError):
            host, fix = f"relay {s.hosts.relay}", "check the relay's Postfix and its log"
        else:
            host, fix = "-", "a bug: report it with this line"
        if streak.failed():
            log.error(
                "event=quarantine_%s_failed host=%r failures=%d error=%r hint=%r",
                name,
                host,
                streak.failures,
                _text(exc),
                fix,
                exc_info=not isinstance(exc, psycopg.Error | QuarantineManagerError),
            )
