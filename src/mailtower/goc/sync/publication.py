"""Publications: which tables, and which operations, a server publishes."""

from __future__ import annotations

from psycopg import sql

from mailtower.goc.sync.catalog import Conn
from mailtower.goc.sync.changes import Changes

_OPERATIONS = ("insert", "update", "delete", "truncate")


def _state(conn: Conn, name: str) -> tuple[bool, set[str], set[str]] | None:
    """(FOR ALL TABLES, its operations, its tables in public) of publication ``name``."""
    row = conn.execute(
        "SELECT puballtables, pubinsert, pubupdate, pubdelete, pubtruncate"
        " FROM pg_publication WHERE pubname = %s",
        (name,),
    ).fetchone()
    if row is None:
        return None
    all_tables, *flags = row
    have_ops = {op for op, on in zip(_OPERATIONS, flags, strict=True) if on}
    have_tables = {
        str(r[0])
        for r in conn.execute(
            "SELECT tablename FROM pg_publication_tables WHERE pubname = %s"
            " AND schemaname = 'public'",
            (name,),
        ).fetchall()
    }
    return bool(all_tables), have_ops, have_tables


def publication_pending(
    conn: Conn, name: str, tables: tuple[str, ...], operations: tuple[str, ...]
) -> list[str]:
    """What ``ensure_publication`` would do (empty: nothing), for a deploy's check."""
    state = _state(conn, name)
    if state is None:
        return [f"create publication {name}"]
    all_tables, have_ops, have_tables = state
    if all_tables:
        return [f"re-create publication {name} (it is FOR ALL TABLES)"]
    pending = []
    if have_tables != set(tables):
        pending.append(f"set the tables of publication {name} to {', '.join(tables)}")
    if have_ops != set(operations):
        pending.append(
            f"set publication {name} to publish {', '.join(operations)}"
            f" (it publishes {', '.join(o for o in _OPERATIONS if o in have_ops) or 'nothing'})"
        )
    return pending


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
    state = _state(conn, name)
    if state is None:
        conn.execute(
            sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish = {})").format(
                ident, table_list, sql.Literal(publish)
            )
        )
        changes.did(f"created publication {name} ({', '.join(tables)}; {publish})")
        return
    all_tables, have_ops, have_tables = state
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
    if have_tables != set(tables):
        conn.execute(sql.SQL("ALTER PUBLICATION {} SET TABLE {}").format(ident, table_list))
        changes.did(f"set the tables of publication {name} to {', '.join(tables)}")
    if have_ops != set(operations):
        conn.execute(
            sql.SQL("ALTER PUBLICATION {} SET (publish = {})").format(ident, sql.Literal(publish))
        )
        changes.did(f"set publication {name} to publish {publish}")
