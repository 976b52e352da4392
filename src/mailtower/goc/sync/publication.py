"""Publications: which tables, and which operations, a server publishes."""

from __future__ import annotations

from psycopg import sql

from mailtower.goc.sync.catalog import Conn
from mailtower.goc.sync.changes import Changes

_OPERATIONS = ("insert", "update", "delete", "truncate")


def ensure_publication(
    conn: Conn,
    name: str,
    tables: tuple[str, ...],
    operations: tuple[str, ...],
    changes: Changes,
) -> None:
    """``name`` publishes exactly ``tables`` (schema public) and exactly ``operations``."""
    publish = ", ".join(operations)
    ident = sql.Identifier(name)
    table_list = sql.SQL(", ").join(sql.Identifier("public", t) for t in tables)
    row = conn.execute(
        "SELECT puballtables, pubinsert, pubupdate, pubdelete, pubtruncate"
        " FROM pg_publication WHERE pubname = %s",
        (name,),
    ).fetchone()
    if row is None:
        conn.execute(
            sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish = {})").format(
                ident, table_list, sql.Literal(publish)
            )
        )
        changes.did(f"created publication {name} ({', '.join(tables)}; {publish})")
        return
    all_tables, *flags = row
    have_ops = tuple(op for op, on in zip(_OPERATIONS, flags, strict=True) if on)
    if all_tables:
        # FOR ALL TABLES cannot be narrowed by ALTER; a publication we did not make.
        conn.execute(sql.SQL("DROP PUBLICATION {}").format(ident))
        conn.execute(
            sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish = {})").format(
                ident, table_list, sql.Literal(publish)
            )
        )
        changes.did(f"re-created publication {name} (was FOR ALL TABLES)")
        return
    have_tables = {
        str(r[0])
        for r in conn.execute(
            "SELECT tablename FROM pg_publication_tables WHERE pubname = %s"
            " AND schemaname = 'public'",
            (name,),
        ).fetchall()
    }
    if have_tables != set(tables):
        conn.execute(sql.SQL("ALTER PUBLICATION {} SET TABLE {}").format(ident, table_list))
        changes.did(f"set the tables of publication {name} to {', '.join(tables)}")
    if set(have_ops) != set(operations):
        conn.execute(
            sql.SQL("ALTER PUBLICATION {} SET (publish = {})").format(ident, sql.Literal(publish))
        )
        changes.did(f"set publication {name} to publish {publish}")
