"""The portal's test hub: a throwaway PostgreSQL 15 with the GOC's schema (``ensure_goc``),
the portal's objects, the role ``mt_portal`` with its grants (the portal connects as it, so the
tests also prove its privileges are enough), ``quarantine_actions`` as
made by the GOC deploy's own ``quarantine_actions.ensure`` (with row-level security for each
tower's ``mt_status_<tower>``), and helpers writing quarantined events."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from email.message import EmailMessage
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from mailtower.goc.eye.status import status_role
from mailtower.goc.portal import store
from mailtower.goc.sync import quarantine_actions
from mailtower.goc.sync.changes import Changes
from mailtower.goc.sync.goc import ensure_goc

PORTAL_PASSWORD = "portal-role-password-0123456789"

# The towers of the hub's quarantine_actions (add_quarantined writes "tower-a" by default).
TOWERS = ("tower-a", "tower-b")
STATUS_PASSWORD = "status-role-password-0123456789"


@contextmanager
def portal_hub(name: str = "goc", *, actions: bool = True) -> Iterator[Any]:
    """A started cluster (tests/pgclusters.py) with the GOC's and the portal's schema."""
    import pgclusters  # tests/ is on sys.path (rootdir conftest)

    workdir = pgclusters.make_workdir("mailtower-portal-")
    cluster = pgclusters.Cluster.create(name, workdir)
    try:
        ensure_goc(cluster.dsn(), sync_password="sync-password-0123456789")
        with cluster.connect() as conn:
            if actions:  # as the GOC deploy's sync step makes it, before the portal's step
                for tower in TOWERS:
                    conn.execute(
                        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                            sql.Identifier(status_role(tower)), sql.Literal(STATUS_PASSWORD)
                        )
                    )
                quarantine_actions.ensure(conn, list(TOWERS), Changes("goc"))
            store.apply_schema(conn)
            store.ensure_role(conn, PORTAL_PASSWORD)
            store.apply_grants(conn)
        yield cluster
    finally:
        cluster.destroy()
        shutil.rmtree(workdir, ignore_errors=True)


def portal_dsn(cluster: Any) -> str:
    return cluster.conninfo(store.PORTAL_ROLE, PORTAL_PASSWORD)


def add_customer(conn: psycopg.Connection[Any], name: str, domain: str) -> int:
    row = conn.execute("INSERT INTO customers (name) VALUES (%s) RETURNING id", (name,)).fetchone()
    assert row is not None
    conn.execute("INSERT INTO domains (name, customer_id) VALUES (%s, %s)", (domain, row[0]))
    return int(row[0])


def small_message(
    sender: str, recipients: list[str], subject: str, body: str = "Hello.\n", **attach: bytes
) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(recipients)
    msg["Subject"] = subject
    msg.set_content(body)
    for filename, data in attach.items():
        msg.add_attachment(data, maintype="application", subtype="octet-stream", filename=filename)
    return msg.as_bytes()


def add_quarantined(
    conn: psycopg.Connection[Any],
    *,
    customer_id: int | None,
    recipients: list[str],
    sender: str = "bad@sender.example",
    subject: str = "Invoice",
    at: datetime | None = None,
    verdict: str = "virus",
    tower: str = "tower-a",
    message: bytes | None = b"",
    expires_in: timedelta = timedelta(days=14),
) -> str:
    """One quarantined event as scand writes it (docs/quarantine.md); its event_id."""
    event_id = str(uuid.uuid4())
    if message == b"":
        message = small_message(sender, recipients, subject)
    row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    at = at or row[0]
    conn.execute(
        "INSERT INTO verdict_events (event_id, tower, scanner, scanned_at, verdict, message_id,"
        " sender, recipients, findings, quarantine_id, size_bytes, customer_id, subject,"
        " expires_at, message, quarantine_meta)"
        " VALUES (%s, %s, 'scanner-1', %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            event_id,
            tower,
            at,
            verdict,
            f"<{event_id}@sender.example>",
            sender,
            recipients,
            Jsonb([{"engine": "clamd", "name": "Win.Test.EICAR", "part": "message"}]),
            f"q-{event_id[:12]}",
            len(message or b""),
            customer_id,
            subject,
            at + expires_in,
            message,
            Jsonb({"reason": verdict}),
        ),
    )
    return event_id
