"""One quarantined message as a row of ``verdict_events``: the dataclass, its INSERT and reads.

A row is a quarantine row when ``quarantine_id`` is set; ``message`` holds the raw bytes as the
relay sent them until the message expires or is deleted (NULL then: the verdict event stays).
Every function takes an open psycopg connection (any cursor factory: rows are read as tuples)
and runs one statement; the caller chooses the role, the transaction and the timeouts.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

# The columns a quarantined message's row fills, in this order (``Quarantined``'s fields).
COLUMNS = (
    "event_id",
    "quarantine_id",
    "tower",
    "scanner",
    "scanned_at",
    "verdict",
    "sender",
    "recipients",
    "findings",
    "size_bytes",
    "message_id",
    "customer_id",
    "subject",
    "expires_at",
    "quarantine_meta",
    "message",
)
PAGE_MAX = 1000  # rows one ``page`` call returns at most

# Idempotent (a retry after a lost commit acknowledgement inserts nothing twice; the event id
# is a fresh uuid, so a conflict can only be the same row). ``customer_id``: the given id, else
# the customer of that name in the tower's own ``customers`` (scand knows its customers by
# name, from its policy snapshot); NULL for the tower's own policy.
INSERT = """
INSERT INTO verdict_events (event_id, quarantine_id, tower, scanner, scanned_at, verdict,
                            sender, recipients, findings, size_bytes, message_id, customer_id,
                            subject, expires_at, quarantine_meta, message)
VALUES (%(event_id)s, %(quarantine_id)s, %(tower)s, %(scanner)s, %(scanned_at)s, %(verdict)s,
        %(sender)s, %(recipients)s, %(findings)s, %(size_bytes)s, %(message_id)s,
        COALESCE(%(customer_id)s::bigint,
                 (SELECT id FROM customers WHERE name = %(customer)s::text)),
        %(subject)s, %(expires_at)s, %(quarantine_meta)s, %(message)s)
ON CONFLICT (event_id) DO NOTHING
"""

# Taken first in the transaction of any action on a quarantined message (a release, a delete:
# the operators' `mailtower quarantine`, the monitor's quarantine manager), with the event id:
# two actors on one message take turns, so a message is released once unless asked again.
ACTION_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended(%s::text, 18))"

# The releases of a message that reached the relay, as the tower's quarantine_log records them
# (read under ACTION_LOCK by whoever releases next): one the operators' command logged (it logs
# only the relay's 250, without a request_id) and a portal request the relay took (the
# monitor's claim row, ``released: …``). Claims not yet sent, deferred, failed (even "in
# doubt": a new request sends it again, by design) are not releases.
RELEASES = """
SELECT by, at, recipients, request_id FROM quarantine_log
WHERE event_id = %s AND action = 'release'
  AND (request_id IS NULL OR answer LIKE 'released:%%')
ORDER BY at, id
"""

# What the reads select: every column, ``message`` only when asked (a page of rows without
# their bytes), and whether the bytes are still held.
_SELECT = (
    "SELECT event_id, quarantine_id, tower, scanner, scanned_at, verdict, sender, recipients,"
    " findings, size_bytes, message_id, customer_id, subject, expires_at, quarantine_meta,"
    " {message}, message IS NOT NULL FROM verdict_events"
)


@dataclass(frozen=True)
class Quarantined:
    """A quarantined message's row. ``message``: the raw bytes (None once expired or deleted,
    or when read without them: ``held`` says whether the row still has them)."""

    event_id: uuid.UUID
    quarantine_id: str
    tower: str
    scanner: str
    scanned_at: datetime
    verdict: str  # a verdict_events verdict (an unprocessable message's is "tempfail")
    sender: str | None
    recipients: tuple[str, ...]
    findings: tuple[Mapping[str, Any], ...]
    size_bytes: int
    message_id: str | None
    customer_id: int | None  # None: the tower's own policy decided
    subject: str | None
    expires_at: datetime | None
    quarantine_meta: Mapping[str, Any] = field(default_factory=dict)
    message: bytes | None = field(default=None, repr=False)
    held: bool = True

    @property
    def reason(self) -> str:
        """Why it was quarantined (``quarantine_meta.reason``), or ``""``."""
        return str(self.quarantine_meta.get("reason") or "")

    def params(self, *, customer: str | None = None) -> dict[str, Any]:
        """The parameters of ``INSERT`` for this row; ``customer``: the customer's name when
        ``customer_id`` is not known (looked up in the tower's ``customers``)."""
        from psycopg.types.json import Jsonb

        values = {name: getattr(self, name) for name in COLUMNS}
        values["recipients"] = list(self.recipients)
        values["findings"] = Jsonb([dict(f) for f in self.findings])
        values["quarantine_meta"] = Jsonb(dict(self.quarantine_meta))
        values["customer"] = customer
        return values

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Quarantined:
        """A row as the reads select it."""
        values = dict(zip(COLUMNS, row[: len(COLUMNS)], strict=True))
        values["recipients"] = tuple(values["recipients"] or ())
        values["findings"] = tuple(values["findings"] or ())
        values["quarantine_meta"] = dict(values["quarantine_meta"] or {})
        message = values["message"]
        values["message"] = bytes(message) if message is not None else None
        return cls(**values, held=bool(row[len(COLUMNS)]))


def insert(conn: Any, row: Quarantined, *, customer: str | None = None) -> None:
    """Run ``INSERT`` for ``row`` on ``conn`` (committed when the caller's transaction is, or
    at once on an autocommit connection)."""
    with conn.cursor() as cur:
        cur.execute(INSERT, row.params(customer=customer))


def _select(with_message: bool) -> str:
    return _SELECT.format(message="message" if with_message else "NULL::bytea")


def by_event_id(conn: Any, event_id: uuid.UUID | str) -> Quarantined | None:
    """The quarantine row ``event_id`` with its bytes, or None (no such row, or not a
    quarantine row)."""
    with conn.cursor() as cur:
        cur.execute(
            _select(True) + " WHERE event_id = %s AND quarantine_id IS NOT NULL",
            (uuid.UUID(str(event_id)),),
        )
        row = cur.fetchone()
    return Quarantined.from_row(row) if row is not None else None


def by_quarantine_id(conn: Any, quarantine_id: str) -> list[Quarantined]:
    """Every row carrying ``quarantine_id``, with its bytes (one at a tower; at the GOC two
    towers could carry the same text: address a message there by ``event_id``)."""
    with conn.cursor() as cur:
        cur.execute(
            _select(True) + " WHERE quarantine_id = %s ORDER BY scanned_at, event_id",
            (quarantine_id,),
        )
        return [Quarantined.from_row(row) for row in cur.fetchall()]


def page(
    conn: Any,
    *,
    limit: int = 50,
    before: tuple[datetime, uuid.UUID] | None = None,
    customer_id: int | None = None,
    with_message: bool = False,
) -> list[Quarantined]:
    """Quarantine rows newest first (``scanned_at``, then ``event_id``), at most ``limit``
    (1..PAGE_MAX). Keyset paging: ``before`` is the last row's ``(scanned_at, event_id)`` of
    the page before, and the next page starts after it, however many rows arrive meanwhile.
    ``customer_id``: only that customer's rows."""
    if not 1 <= limit <= PAGE_MAX:
        raise ValueError(f"limit must be 1..{PAGE_MAX}, not {limit}")
    where = ["quarantine_id IS NOT NULL"]
    params: list[Any] = []
    if customer_id is not None:
        where.append("customer_id = %s")
        params.append(customer_id)
    if before is not None:
        where.append("(scanned_at, event_id) < (%s, %s)")
        params.extend((before[0], uuid.UUID(str(before[1]))))
    query = (
        _select(with_message)
        + " WHERE "
        + " AND ".join(where)
        + " ORDER BY scanned_at DESC, event_id DESC LIMIT %s"
    )
    with conn.cursor() as cur:
        cur.execute(query, (*params, limit))
        return [Quarantined.from_row(row) for row in cur.fetchall()]


def cursor_of(row: Quarantined) -> tuple[datetime, uuid.UUID]:
    """The ``before`` of the page after the one ending with ``row``."""
    return row.scanned_at, row.event_id


@dataclass(frozen=True)
class Release:
    """A release of a message the relay took (``RELEASES``)."""

    by: str
    at: datetime
    recipients: tuple[str, ...]  # as logged; empty: all of the message's recipients
    request_id: uuid.UUID | None  # None: the operators' command

    def describe(self) -> str:
        """``by <who> at <when>`` (UTC), for an answer or an operator."""
        from datetime import UTC

        return f"by {self.by} at {self.at.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"


def releases(
    conn: Any, event_id: uuid.UUID | str, *, besides: uuid.UUID | None = None
) -> list[Release]:
    """The releases of ``event_id`` the relay took, oldest first; ``besides``: not that
    request's own."""
    with conn.cursor() as cur:
        cur.execute(RELEASES, (uuid.UUID(str(event_id)),))
        found = [
            Release(str(by), at, tuple(recipients or ()), request_id)
            for by, at, recipients, request_id in cur.fetchall()
        ]
    return [r for r in found if besides is None or r.request_id != besides]


def released_to(done: Sequence[Release], recipients: Sequence[str]) -> dict[str, Release]:
    """Which of the message's ``recipients`` (lower case) a release in ``done`` covered, and
    by which (the first): a release without recipients covered them all."""
    covered: dict[str, Release] = {}
    for release in done:
        for address in release.recipients or recipients:
            covered.setdefault(address.lower(), release)
    return covered
