"""Subscriptions: reading, creating, adjusting and dropping them."""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from mailtower.goc.sync.catalog import Conn
from mailtower.goc.sync.changes import Changes
from mailtower.goc.sync.conninfo import endpoint, redact


@dataclass(frozen=True)
class Subscription:
    """A row of pg_subscription."""

    oid: int
    name: str
    enabled: bool
    conninfo: str
    slot_name: str | None
    publications: tuple[str, ...]


def get(conn: Conn, name: str) -> Subscription | None:
    row = conn.execute(
        "SELECT s.oid, s.subname, s.subenabled, s.subconninfo, s.subslotname, s.subpublications"
        " FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid"
        " WHERE d.datname = current_database() AND s.subname = %s",
        (name,),
    ).fetchone()
    if row is None:
        return None
    oid, subname, enabled, conninfo, slot, pubs = row
    return Subscription(int(oid), subname, bool(enabled), conninfo, slot, tuple(pubs))


def create(
    conn: Conn,
    name: str,
    conninfo: str,
    publication: str,
    *,
    slot_name: str,
    create_slot: bool,
    copy_data: bool,
    enabled: bool = True,
) -> None:
    conn.execute(
        sql.SQL(
            "CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {}"
            " WITH (slot_name = {}, create_slot = {}, copy_data = {}, enabled = {})"
        ).format(
            sql.Identifier(name),
            sql.Literal(conninfo),
            sql.Identifier(publication),
            sql.Literal(slot_name),
            sql.Literal(create_slot),
            sql.Literal(copy_data),
            sql.Literal(enabled),
        )
    )


def tables(conn: Conn, name: str) -> list[str]:
    """The tables subscription ``name`` applies changes to (as the publisher listed them when
    it was made), schema-qualified."""
    rows = conn.execute(
        "SELECT n.nspname || '.' || c.relname FROM pg_subscription_rel r"
        " JOIN pg_class c ON c.oid = r.srrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
        " JOIN pg_subscription s ON s.oid = r.srsubid"
        " JOIN pg_database d ON d.oid = s.subdbid"
        " WHERE d.datname = current_database() AND s.subname = %s ORDER BY 1",
        (name,),
    ).fetchall()
    return [str(table) for (table,) in rows]


def enable(conn: Conn, name: str) -> None:
    conn.execute(sql.SQL("ALTER SUBSCRIPTION {} ENABLE").format(sql.Identifier(name)))


def drop_keep_slot(conn: Conn, sub: Subscription) -> None:
    """Drop a subscription without contacting its publisher (which may be dead or hung).

    Detaching the slot first is the documented way; the caller deals with the remote slot.
    """
    name = sql.Identifier(sub.name)
    conn.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(name))
    conn.execute(sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(name))
    conn.execute(sql.SQL("DROP SUBSCRIPTION {}").format(name))


def ensure_settings(
    conn: Conn, sub: Subscription, conninfo: str, publication: str, changes: Changes
) -> None:
    """Same server: bring the conninfo (e.g. a new password), publication and state in line."""
    assert endpoint(sub.conninfo) == endpoint(conninfo), "re-pointing is not a setting"
    name = sql.Identifier(sub.name)
    if sub.conninfo != conninfo:
        conn.execute(
            sql.SQL("ALTER SUBSCRIPTION {} CONNECTION {}").format(name, sql.Literal(conninfo))
        )
        changes.did(f"set the connection of subscription {sub.name} to {redact(conninfo)}")
    if sub.publications != (publication,):
        conn.execute(
            sql.SQL("ALTER SUBSCRIPTION {} SET PUBLICATION {} WITH (refresh = false)").format(
                name, sql.Identifier(publication)
            )
        )
        changes.did(f"set the publication of subscription {sub.name} to {publication}")
    if not sub.enabled:
        conn.execute(sql.SQL("ALTER SUBSCRIPTION {} ENABLE").format(name))
        changes.did(f"enabled subscription {sub.name}")
