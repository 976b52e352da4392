"""Copy to the GOC the events a tower holds and the GOC lacks, by ``event_id``.

Used when the GOC's events subscription is re-pointed (after a failover, or when a slot was
lost): the new slot decodes only what is committed after it was made, so what the old
subscription had not delivered yet is copied here, read from the tower with psycopg and
inserted ``ON CONFLICT DO NOTHING`` (no dblink, no extension on either server).

Rows are stored under ``tower_name``, whatever their own ``tower`` column says: the GOC stamps
the tower from where the event came (as its trigger does for what the subscription applies).

Only event ids cross first (COPY into a temporary table at the GOC, one anti-join there);
then the missing rows, in chunks, each chunk committed at the GOC on its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar
from uuid import UUID

from psycopg import sql

from mailtower.goc.sync.catalog import Conn, columns, connect, scalar
from mailtower.goc.sync.names import EVENTS_TABLE

T = TypeVar("T")
# Reading every event id of a big tower is one statement: allow it far more than a DDL step.
RECONCILE_TIMEOUT_S = 1800


@dataclass(frozen=True)
class ReconcileResult:
    """Counts of one reconciliation of a tower's events with the GOC's."""

    tower: str
    at_tower: int  # events the tower's primary holds
    copied: int  # inserted at the GOC now: the GOC lacked them
    goc_only: int  # the tower's events the GOC has and the tower does not (pruned there, or
    # committed on a dead primary that had sent them to the GOC but not to its standby)


def reconcile_events(
    goc_dsn: str, tower_name: str, tower_conninfo: str, *, chunk: int = 5000
) -> ReconcileResult:
    """Copy the tower's events the GOC lacks; ``tower_conninfo`` may be the ``mt_sync`` one."""
    with (
        connect(goc_dsn, statement_timeout_s=RECONCILE_TIMEOUT_S) as goc,
        connect(tower_conninfo, statement_timeout_s=RECONCILE_TIMEOUT_S) as tower,
    ):
        return reconcile(goc, tower, tower_name, chunk=chunk)


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def reconcile(goc: Conn, tower: Conn, tower_name: str, *, chunk: int = 5000) -> ReconcileResult:
    table = sql.Identifier("public", EVENTS_TABLE)
    names = columns(tower, EVENTS_TABLE)
    cols = sql.SQL(", ").join(map(sql.Identifier, names))
    # The tower's name from the GOC's side, never the row's (schema.py: the stamp trigger).
    stamped = sql.SQL(", ").join(
        sql.Literal(tower_name) if n == "tower" else sql.Identifier(n) for n in names
    )
    goc.execute("CREATE TEMP TABLE IF NOT EXISTS mt_tower_ids (event_id uuid PRIMARY KEY)")
    goc.execute(
        sql.SQL(
            "CREATE TEMP TABLE IF NOT EXISTS mt_missing AS SELECT {} FROM {} WITH NO DATA"
        ).format(cols, table)
    )
    goc.execute("TRUNCATE mt_tower_ids, mt_missing")
    try:
        with goc.transaction():
            read = sql.SQL("COPY (SELECT event_id FROM {}) TO STDOUT (FORMAT binary)")
            with (
                tower.cursor().copy(read.format(table)) as source,
                goc.cursor().copy("COPY mt_tower_ids FROM STDIN (FORMAT binary)") as sink,
            ):
                for block in source:
                    sink.write(block)
        goc.execute("ANALYZE mt_tower_ids")
        at_tower = int(scalar(goc, "SELECT count(*) FROM mt_tower_ids"))
        missing: list[UUID] = [
            row[0]
            for row in goc.execute(
                sql.SQL(
                    "SELECT i.event_id FROM mt_tower_ids i WHERE NOT EXISTS"
                    " (SELECT 1 FROM {} v WHERE v.event_id = i.event_id)"
                ).format(table)
            ).fetchall()
        ]
        goc_only = int(
            scalar(
                goc,
                sql.SQL(
                    "SELECT count(*) FROM {} v WHERE v.tower = %s AND NOT EXISTS"
                    " (SELECT 1 FROM mt_tower_ids i WHERE i.event_id = v.event_id)"
                ).format(table),
                (tower_name,),
            )
        )
        copied = 0
        for ids in _chunks(missing, chunk):
            with goc.transaction():
                goc.execute("TRUNCATE mt_missing")
                read = sql.SQL("COPY (SELECT {} FROM {} WHERE event_id = ANY({})) TO STDOUT")
                with (
                    tower.cursor().copy(read.format(cols, table, sql.Literal(list(ids)))) as src,
                    goc.cursor().copy("COPY mt_missing FROM STDIN") as sink,
                ):
                    for block in src:
                        sink.write(block)
                cur = goc.execute(
                    sql.SQL(
                        "INSERT INTO {} ({}) SELECT {} FROM mt_missing"
                        " ON CONFLICT (event_id) DO NOTHING"
                    ).format(table, cols, stamped)
                )
                copied += max(cur.rowcount, 0)
    finally:
        goc.execute("DROP TABLE IF EXISTS mt_tower_ids, mt_missing")
    return ReconcileResult(tower_name, at_tower, copied, goc_only)
