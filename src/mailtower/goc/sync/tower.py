"""The tower side: the events publication, and the config subscription to the GOC.

The config subscription lives in the primary's catalog, so the standby has it too (physical
replication) and starts it when promoted, with the old primary's slot at the GOC. Resuming
that way can miss configuration: the GOC's slot has advanced to what the *old* primary
confirmed, which may include changes that never reached the standby. So a subscription made
for another timeline (names.config_slot) is never resumed: it is dropped, and the GOC's
configuration is loaded again at a consistent point (``_subscribe_at_snapshot``).

The tower's ``verdict_events`` also gets a CHECK that ``tower`` is this tower's name
(``OWN_TOWER_CHECK``): a scanner's SQL role — or anyone else on this primary — cannot store an
event under another tower's name. The GOC does not rely on it (it stamps the tower from its
subscription), but a tower's own view of its events stays true too.
"""

from __future__ import annotations

import logging

import psycopg
from psycopg import sql

from mailtower.goc.sync import slots, subscription
from mailtower.goc.sync.catalog import (
    Conn,
    columns,
    connect,
    lock,
    require_primary,
    require_publication,
    require_tables,
    scalar,
)
from mailtower.goc.sync.changes import Changes
from mailtower.goc.sync.conninfo import endpoint, redact
from mailtower.goc.sync.exceptions import SyncError
from mailtower.goc.sync.names import (
    CONFIG_PUBLICATION,
    CONFIG_TABLES,
    EVENTS_PUBLICATION,
    EVENTS_TABLE,
    config_slot,
    config_slot_prefix,
    config_subscription,
)
from mailtower.goc.sync.publication import ensure_publication
from mailtower.goc.sync.roles import ensure_select, ensure_sync_role
from mailtower.goc.sync.schema import TOWER_ONLY_COLUMNS

log = logging.getLogger(__name__)

OWN_TOWER_CHECK = "verdict_events_own_tower"
# INSERT only: pruning old events at a tower must not delete them at the GOC. (The GOC skips
# or refuses anything else a widened publication sends: schema.py.)
EVENTS_OPERATIONS = ("insert",)


def ensure_tower(
    primary_dsn: str, goc_conninfo: str, tower_name: str, *, sync_password: str | None = None
) -> Changes:
    """Sync role, events publication and config subscription on a tower's primary.

    ``primary_dsn``: superuser on the primary (the tower schema already applied).
    ``goc_conninfo``: one host (the GOC), as the tower reaches it, as ``mt_sync``.
    ``sync_password``: the tower's ``mt_sync`` password, which the GOC connects with (None:
    the role must exist, its password is left alone). On a promoted standby this re-subscribes
    the configuration (see the module docstring). Returns what changed; nothing on a second
    call.
    """
    changes = Changes(tower_name)
    with connect(primary_dsn) as conn:
        lock(conn)
        timeline = require_primary(conn, tower_name, publishes=True)
        require_tables(
            conn,
            tower_name,
            (*CONFIG_TABLES, EVENTS_TABLE),
            "apply the tower schema first (roles/sql.py)",
        )
        ensure_own_tower_check(conn, tower_name, changes)
        ensure_sync_role(conn, sync_password, changes)
        ensure_select(conn, (EVENTS_TABLE,), changes)
        ensure_publication(conn, EVENTS_PUBLICATION, (EVENTS_TABLE,), EVENTS_OPERATIONS, changes)
        _ensure_config_subscription(conn, goc_conninfo, tower_name, timeline, changes)
    return changes


def own_tower_pending(conn: Conn, tower: str) -> str | None:
    """What ``ensure_own_tower_check`` would do on this primary (None: nothing)."""
    found = scalar(
        conn,
        "SELECT pg_get_expr(conbin, conrelid) FROM pg_constraint"
        " WHERE conname = %s AND conrelid = 'public.verdict_events'::regclass",
        (OWN_TOWER_CHECK,),
    )
    if found is None:
        return f"add CHECK {OWN_TOWER_CHECK} (tower = {tower!r}) on {EVENTS_TABLE}"
    # PostgreSQL deparses the expression as (tower = 'name'::text).
    if found != f"(tower = {_quote(tower)}::text)":
        return f"replace CHECK {OWN_TOWER_CHECK} {found} by (tower = {tower!r})"
    return None


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def ensure_own_tower_check(conn: Conn, tower: str, changes: Changes) -> None:
    """Only rows of ``tower`` in this primary's ``verdict_events``, whoever inserts them.

    ``NOT VALID``: rows already stored are not checked (a tower renamed keeps its history);
    every new row is.
    """
    pending = own_tower_pending(conn, tower)
    if pending is None:
        return
    table = _table(EVENTS_TABLE)
    check = sql.Identifier(OWN_TOWER_CHECK)
    with conn.transaction():
        conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(table, check))
        conn.execute(
            sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK (tower = {}) NOT VALID").format(
                table, check, sql.Literal(tower)
            )
        )
    changes.did(pending)


def _ensure_config_subscription(
    conn: Conn, goc_conninfo: str, tower: str, timeline: int, changes: Changes
) -> None:
    name = config_subscription(tower)
    slot = config_slot(tower, timeline)
    sub = subscription.get(conn, name)
    try:
        goc = connect(goc_conninfo)
    except psycopg.OperationalError as exc:
        # A tower is deployed and keeps working while the GOC is away; its own subscription,
        # made for this primary, reconnects by itself. Anything else needs the GOC.
        if (
            sub is not None
            and sub.slot_name == slot
            and endpoint(sub.conninfo) == endpoint(goc_conninfo)
        ):
            log.warning(
                "event=goc_unreachable tower=%s subscription=%s checked=local error=%r",
                tower,
                name,
                exc,
            )
            return
        raise SyncError(
            f"{tower}: the GOC ({redact(goc_conninfo)}) is unreachable and subscription {name}"
            f" must be made for this primary; retry when the GOC answers ({exc})"
        ) from exc
    with goc:
        require_primary(goc, "goc", publishes=True)
        require_publication(goc, "goc", CONFIG_PUBLICATION, "run ensure_goc first")
        if sub is not None:
            reason = _resync_reason(sub, goc_conninfo, slot, goc)
            if reason is None:
                subscription.ensure_settings(conn, sub, goc_conninfo, CONFIG_PUBLICATION, changes)
                _ensure_tables_subscribed(conn, goc, name, changes)
                return
            subscription.drop_keep_slot(conn, sub)
            changes.did(f"dropped subscription {name} ({reason})")
        # Slots of this tower's earlier primaries (or of an attempt that did not finish) keep
        # WAL at the GOC for ever, and one held by a dead primary's walsender is terminated.
        for old in slots.with_prefix(goc, config_slot_prefix(tower)):
            slots.drop(goc, old.name, "goc", changes)
        if sub is not None:
            # Table-copy slots the old subscription may have left, named
            # pg_<subscription oid>_sync_<table oid>_<system id of this tower's pair>: another
            # tower's subscription can have the same oid, never the same system id.
            system_id = scalar(conn, "SELECT system_identifier FROM pg_control_system()")
            for old in slots.with_prefix(goc, f"pg_{sub.oid}_sync_", numbered=False):
                if old.name.endswith(f"_{system_id}"):
                    slots.drop(goc, old.name, "goc", changes)
        if _config_empty(conn):
            subscription.create(
                conn,
                name,
                goc_conninfo,
                CONFIG_PUBLICATION,
                slot_name=slot,
                create_slot=True,
                copy_data=True,
            )
            changes.did(f"created subscription {name} to the GOC (slot {slot}, initial copy)")
        else:
            rows = _subscribe_at_snapshot(conn, goc_conninfo, name, slot)
            changes.did(
                f"replaced the configuration by the GOC's ({rows} rows) and subscribed {name}"
                f" from that point (slot {slot})"
            )


def _ensure_tables_subscribed(conn: Conn, goc: Conn, name: str, changes: Changes) -> None:
    """Take the tables the GOC publishes that the subscription does not know yet.

    A subscription applies only the tables the publisher listed when it was made (or last
    refreshed): a table the GOC publishes since (``recipients``, after an upgrade) has its
    changes skipped here until ``REFRESH PUBLICATION``, which adds it and copies its rows (the
    tower's copy is empty: only this subscription writes it). Not done on the GOC's word alone
    for a table this tower does not have: ``require_tables`` refused that earlier.
    """
    published = {
        f"{schema_name}.{table}"
        for schema_name, table in goc.execute(
            "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s",
            (CONFIG_PUBLICATION,),
        ).fetchall()
    }
    missing = sorted(published - set(subscription.tables(conn, name)))
    if not missing:
        return
    # Not in a transaction block (PostgreSQL refuses); the connection is autocommit.
    conn.execute(
        sql.SQL("ALTER SUBSCRIPTION {} REFRESH PUBLICATION WITH (copy_data = true)").format(
            sql.Identifier(name)
        )
    )
    changes.did(f"refreshed subscription {name} (copying {', '.join(missing)})")


def _resync_reason(
    sub: subscription.Subscription, goc_conninfo: str, slot: str, goc: Conn
) -> str | None:
    """Why the config subscription must be made again (None: it is this primary's and fine)."""
    if endpoint(sub.conninfo) != endpoint(goc_conninfo):
        return f"it follows {redact(sub.conninfo)}, not the GOC {redact(goc_conninfo)}"
    if sub.slot_name != slot:
        return (
            f"its slot {sub.slot_name} was made for another primary of the tower;"
            f" this primary's is {slot}"
        )
    found = slots.find(goc, slot)
    if found is None:
        return f"its slot {slot} does not exist at the GOC"
    if found.wal_status == "lost":
        return f"its slot {slot} at the GOC was invalidated (max_slot_wal_keep_size)"
    return None


def _config_empty(conn: Conn) -> bool:
    return all(
        scalar(conn, sql.SQL("SELECT NOT EXISTS (SELECT 1 FROM {})").format(_table(t)))
        for t in CONFIG_TABLES
    )


def _table(name: str) -> sql.Identifier:
    return sql.Identifier("public", name)


def _subscribe_at_snapshot(conn: Conn, goc_conninfo: str, name: str, slot: str) -> int:
    """Make the tower's configuration the GOC's as of a new slot's start, and subscribe there.

    The slot exports a snapshot; the GOC's tables are read under it; then one transaction on
    the tower replaces its tables with what was read and creates the subscription on that slot
    without copying. The relay never sees the tables empty or half-loaded, and the stream
    starts exactly after what was loaded (an INSERT of a row already loaded would stop the
    apply worker). Returns the number of rows loaded.
    """
    # The replicated columns (the tower's own take their defaults, then its trigger's stamp).
    cols = {
        t: [c for c in columns(conn, t) if c not in TOWER_ONLY_COLUMNS.get(t, ())]
        for t in CONFIG_TABLES
    }
    data: dict[str, bytes] = {}
    with (
        slots.create_with_snapshot(goc_conninfo, slot) as snapshot,
        psycopg.connect(goc_conninfo) as reader,
    ):
        reader.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        reader.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
        for table in CONFIG_TABLES:
            query = sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT").format(
                sql.SQL(", ").join(map(sql.Identifier, cols[table])), _table(table)
            )
            with reader.cursor().copy(query) as copy:
                data[table] = b"".join(bytes(block) for block in copy)
        reader.rollback()
    rows = sum(block.count(b"\n") for block in data.values())
    with conn.transaction():
        for table in reversed(CONFIG_TABLES):  # children first (foreign keys)
            conn.execute(sql.SQL("DELETE FROM {}").format(_table(table)))
        for table in CONFIG_TABLES:
            query = sql.SQL("COPY {} ({}) FROM STDIN").format(
                _table(table), sql.SQL(", ").join(map(sql.Identifier, cols[table]))
            )
            with conn.cursor().copy(query) as copy:
                copy.write(data[table])
        subscription.create(
            conn,
            name,
            goc_conninfo,
            CONFIG_PUBLICATION,
            slot_name=slot,
            create_slot=False,
            copy_data=False,
        )
    return rows
