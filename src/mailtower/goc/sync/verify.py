"""Cheap comparisons of the GOC and a tower, for checks and tests."""

from __future__ import annotations

from psycopg import sql

from mailtower.goc.sync.catalog import columns, connect, scalar
from mailtower.goc.sync.names import CONFIG_TABLES, PRIMARY_KEYS
from mailtower.goc.sync.schema import TOWER_ONLY_COLUMNS


def config_digest(dsn: str) -> dict[str, str]:
    """Per configuration table, an md5 of its rows in primary-key order (equal ⇔ same rows).

    Only the replicated columns are hashed (not the tower's own, ``TOWER_ONLY_COLUMNS``), so
    the GOC and a tower compare directly; in name order, as replication matches them (a table
    an upgrade altered has another column order than one made new).
    """
    digests: dict[str, str] = {}
    with connect(dsn) as conn:
        for table in CONFIG_TABLES:
            own = TOWER_ONLY_COLUMNS.get(table, ())
            names = sorted(c for c in columns(conn, table) if c not in own)
            cols = sql.SQL(", ").join(map(sql.Identifier, names))
            order = sql.Identifier(PRIMARY_KEYS[table])
            digests[table] = str(
                scalar(
                    conn,
                    sql.SQL(
                        "SELECT md5(coalesce(string_agg(r::text, E'\\n' ORDER BY k), ''))"
                        " FROM (SELECT ({}) AS r, {} AS k FROM {}) AS t"
                    ).format(cols, order, sql.Identifier("public", table)),
                )
            )
    return digests


def event_count(dsn: str, tower: str | None = None) -> int:
    """Events stored (of one tower when given)."""
    with connect(dsn) as conn:
        if tower is None:
            return int(scalar(conn, "SELECT count(*) FROM public.verdict_events"))
        return int(
            scalar(conn, "SELECT count(*) FROM public.verdict_events WHERE tower = %s", (tower,))
        )
