"""Small catalog reads and writes shared by the ensure and re-point steps (blocking, psycopg)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from mailtower.goc.sync.exceptions import NotPrimary, SchemaMissing, WalLevelNotLogical

Conn = psycopg.Connection[Any]

# Serialises ensure/re-point runs on one server (two deploys at once would race on CREATE).
_LOCK_KEY = 0x6D74_7379_6E63  # "mtsync"


def connect(dsn: str, *, statement_timeout_s: int = 60) -> Conn:
    """An autocommit connection with connect and statement timeouts (a hung or unreachable
    server fails the step instead of holding it)."""
    extra: dict[str, Any] = {}
    if "connect_timeout" not in conninfo_to_dict(dsn):
        extra["connect_timeout"] = 10
    return psycopg.connect(dsn, autocommit=True, options="-c statement_timeout=60000", **extra)


def lock(conn: Conn) -> None:
    """Take the session-level sync lock of this server (released when ``conn`` closes)."""
    conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))


def scalar(conn: Conn, query: str | sql.Composable, params: Any = None) -> Any:
    row = conn.execute(query, params).fetchone()  # type: ignore[arg-type]
    return None if row is None else row[0]


@dataclass(frozen=True)
class DatabaseState:
    in_recovery: bool
    wal_level: str
    timeline: int | None  # None on a standby


def server_state(conn: Conn) -> DatabaseState:
    in_recovery = bool(scalar(conn, "SELECT pg_is_in_recovery()"))
    wal_level = str(scalar(conn, "SHOW wal_level"))
    timeline = None
    if not in_recovery:
        # The first 8 hex digits of a WAL file name are its timeline; pg_walfile_name uses the
        # timeline being written now (pg_control_checkpoint() lags until the next checkpoint).
        walfile = str(scalar(conn, "SELECT pg_walfile_name(pg_current_wal_lsn())"))
        timeline = int(walfile[:8], 16)
    return DatabaseState(in_recovery, wal_level, timeline)


def require_primary(conn: Conn, label: str, *, publishes: bool) -> int:
    """The primary's timeline; raise if ``label`` is a standby or cannot publish."""
    state = server_state(conn)
    if state.in_recovery or state.timeline is None:
        raise NotPrimary(f"{label}: the server is a standby; point the sync at the primary")
    if publishes and state.wal_level != "logical":
        raise WalLevelNotLogical(
            f"{label}: wal_level is {state.wal_level!r}; set wal_level = logical and restart"
        )
    return state.timeline


def relation_exists(conn: Conn, table: str) -> bool:
    return scalar(conn, "SELECT to_regclass(%s)", (f"public.{table}",)) is not None


def require_tables(conn: Conn, label: str, tables: tuple[str, ...], what: str) -> None:
    missing = [t for t in tables if not relation_exists(conn, t)]
    if missing:
        raise SchemaMissing(f"{label}: table(s) {', '.join(missing)} missing; {what}")


def require_publication(conn: Conn, label: str, name: str, what: str) -> None:
    if scalar(conn, "SELECT 1 FROM pg_publication WHERE pubname = %s", (name,)) is None:
        raise SchemaMissing(f"{label}: publication {name} missing; {what}")


def columns(conn: Conn, table: str) -> list[str]:
    """Column names of ``public.<table>`` in order."""
    rows = conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s)"
        " AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        (f"public.{table}",),
    ).fetchall()
    return [str(r[0]) for r in rows]
