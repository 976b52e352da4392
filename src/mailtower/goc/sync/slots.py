"""Replication slots: listing, creating (optionally with an exported snapshot) and dropping."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
from psycopg import pq, sql

from mailtower.goc.sync.catalog import Conn, scalar
from mailtower.goc.sync.changes import Changes
from mailtower.goc.sync.conninfo import redact
from mailtower.goc.sync.exceptions import SlotBusy, SyncError


@dataclass(frozen=True)
class Slot:
    """A row of pg_replication_slots."""

    name: str
    active_pid: int | None
    wal_status: str | None


def find(conn: Conn, name: str) -> Slot | None:
    row = conn.execute(
        "SELECT slot_name, active_pid, wal_status FROM pg_replication_slots WHERE slot_name = %s",
        (name,),
    ).fetchone()
    return None if row is None else Slot(str(row[0]), row[1], row[2])


def with_prefix(conn: Conn, prefix: str, *, numbered: bool = True) -> list[Slot]:
    """Slots named ``<prefix><digits>`` (``numbered``) or ``<prefix><anything>``."""
    rows = conn.execute(
        "SELECT slot_name, active_pid, wal_status FROM pg_replication_slots"
        " WHERE starts_with(slot_name, %s) ORDER BY slot_name",
        (prefix,),
    ).fetchall()
    found = [Slot(str(n), p, w) for n, p, w in rows]
    if numbered:
        found = [s for s in found if s.name[len(prefix) :].isdigit()]
    return found


def create_logical(conn: Conn, name: str) -> str:
    """A pgoutput slot; returns its consistent point. Every later commit is decoded into it."""
    return str(
        scalar(
            conn,
            "SELECT lsn FROM pg_create_logical_replication_slot(%s, 'pgoutput')",
            (name,),
        )
    )


@contextmanager
def create_with_snapshot(conninfo: str, name: str) -> Iterator[str]:
    """Create a pgoutput slot and yield the snapshot exported at its consistent point.

    A transaction that sets this snapshot sees exactly what was committed before the slot's
    first decoded change: reading under it and then streaming from the slot misses nothing and
    repeats nothing. The snapshot lives while the replication connection is open and idle.
    """
    with psycopg.connect(conninfo, autocommit=True, replication="database") as rconn:
        # The replication protocol takes simple-query commands only: libpq's PQexec.
        command = sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'export')")
        res = rconn.pgconn.exec_(command.format(sql.Identifier(name)).as_bytes(rconn))
        if res.status != pq.ExecStatus.TUPLES_OK:
            message = res.error_message.decode(errors="replace").strip()
            raise SyncError(f"{redact(conninfo)}: could not create slot {name}: {message}")
        snapshot = res.get_value(0, 2)
        assert snapshot is not None
        yield snapshot.decode()


def drop(conn: Conn, name: str, label: str, changes: Changes, *, timeout_s: float = 30.0) -> None:
    """Drop a slot, terminating the walsender that holds it.

    A walsender serving a primary that died without closing its TCP connection holds the slot
    until ``wal_sender_timeout`` (60 s by default); it is terminated rather than waited for. A
    subscriber reconnecting at once would take the slot again, so this retries to a deadline.
    """
    deadline = time.monotonic() + timeout_s
    terminated = False
    while True:
        slot = find(conn, name)
        if slot is None:
            return
        if slot.active_pid is not None:
            conn.execute("SELECT pg_terminate_backend(%s, 5000)", (slot.active_pid,))
            terminated = True
        try:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
        except psycopg.errors.ObjectInUse as exc:
            if time.monotonic() > deadline:
                raise SlotBusy(
                    f"{label}: slot {name} is still in use after {timeout_s:.0f}s of"
                    f" terminating its walsender; stop the subscriber using it ({exc})"
                ) from exc
            time.sleep(0.1)
            continue
        except psycopg.errors.UndefinedObject:
            return  # dropped meanwhile
        how = " (terminated the walsender holding it)" if terminated else ""
        changes.did(f"dropped replication slot {name}{how}")
        return
