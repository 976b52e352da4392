"""The GOC side: its schema, the config publication, and one events subscription per tower."""

from __future__ import annotations

from collections.abc import Mapping

from psycopg import sql

from mailtower.goc.sync import schema, slots, subscription
from mailtower.goc.sync.catalog import (
    Conn,
    columns,
    connect,
    lock,
    relation_exists,
    require_primary,
    require_publication,
    scalar,
)
from mailtower.goc.sync.changes import Changes
from mailtower.goc.sync.conninfo import endpoint, redact
from mailtower.goc.sync.exceptions import RepointNeeded, SchemaMissing, SyncError
from mailtower.goc.sync.names import (
    CONFIG_PUBLICATION,
    CONFIG_TABLES,
    EVENTS_PUBLICATION,
    EVENTS_TABLE,
    events_slot,
    events_subscription,
    goc_sync_role,
)
from mailtower.goc.sync.publication import ensure_publication
from mailtower.goc.sync.roles import (
    ensure_login_role,
    ensure_privileges,
    ensure_select,
    ensure_sync_role,
)

GOC = "goc"
# All operations: an update or delete of a route at the GOC must reach every tower.
CONFIG_OPERATIONS = ("insert", "update", "delete", "truncate")


def ensure_goc(
    goc_dsn: str,
    *,
    sync_password: str | None = None,
    tower_sync_passwords: Mapping[str, str] | None = None,
) -> Changes:
    """Schema, sync roles and config publication at the GOC (superuser ``goc_dsn``).

    ``tower_sync_passwords``: ``{tower: password}`` of each tower's own role
    ``mt_sync_<tower>`` (``names.goc_sync_role``), which that tower's config subscription
    connects as: what a deploy uses, and then the shared ``mt_sync`` is left alone (even with
    no tower: ``{}``), so the deploy never gives back a login it retired. ``sync_password``:
    one shared ``mt_sync`` instead (None, and ``tower_sync_passwords`` None too: the role
    must exist; its password is left alone). Returns what changed; nothing on a second call.
    """
    changes = Changes(GOC)
    with connect(goc_dsn) as conn:
        lock(conn)
        require_primary(conn, GOC, publishes=True)
        with conn.transaction():
            _ensure_schema(conn, changes)
        if sync_password is not None or tower_sync_passwords is None:
            ensure_sync_role(conn, sync_password, changes)
            ensure_select(conn, CONFIG_TABLES, changes)
        for tower, password in (tower_sync_passwords or {}).items():
            role = goc_sync_role(tower)
            ensure_login_role(conn, role, password, changes, replication=True)
            for table in CONFIG_TABLES:
                ensure_privileges(conn, role, table, ("SELECT",), changes)
        ensure_publication(conn, CONFIG_PUBLICATION, CONFIG_TABLES, CONFIG_OPERATIONS, changes)
    return changes


def _ensure_schema(conn: Conn, changes: Changes) -> None:
    for table, ddl in schema.TABLES.items():
        if not relation_exists(conn, table):
            conn.execute(ddl)
            changes.did(f"created table {table}")
    for action, statement in _column_changes(conn):
        conn.execute(statement)
        changes.did(action)
    for index in schema.INDEXES:
        if not relation_exists(conn, index.name):  # to_regclass finds indexes too
            conn.execute(index.ddl)
            changes.did(f"created index {index.name}")
    for trigger in schema.TRIGGERS:
        body = scalar(
            conn,
            "SELECT prosrc FROM pg_proc WHERE proname = %s"
            " AND pronamespace = 'public'::regnamespace",
            (trigger.function,),
        )
        if body != trigger.body:
            conn.execute(trigger.function_ddl)
            changes.did(f"{'created' if body is None else 'replaced'} function {trigger.function}")
        enabled = _trigger_state(conn, trigger.name)
        if enabled is None:
            conn.execute(trigger.ddl)
            changes.did(f"created trigger {trigger.name}")
        if enabled != "A":
            conn.execute(trigger.enable)
            changes.did(f"enabled trigger {trigger.name} ALWAYS (apply workers too)")


def schema_pending(conn: Conn) -> list[str]:
    """What ``_ensure_schema`` would do at the GOC (empty: nothing), for a deploy's check."""
    pending = [f"create table {t}" for t in schema.TABLES if not relation_exists(conn, t)]
    if pending:
        return pending
    pending += [action for action, _ in _column_changes(conn)]
    pending += [
        f"create index {i.name}" for i in schema.INDEXES if not relation_exists(conn, i.name)
    ]
    for trigger in schema.TRIGGERS:
        body = scalar(
            conn,
            "SELECT prosrc FROM pg_proc WHERE proname = %s"
            " AND pronamespace = 'public'::regnamespace",
            (trigger.function,),
        )
        if body != trigger.body and f"replace function {trigger.function}" not in pending:
            pending.append(f"replace function {trigger.function}")
        if _trigger_state(conn, trigger.name) != "A":
            pending.append(f"create trigger {trigger.name} (enabled ALWAYS)")
    return pending


def _column_changes(conn: Conn) -> list[tuple[str, sql.Composed]]:
    """What brings tables made by an older GOC to today's shape: (action, statement).

    Columns are matched by name (logical replication does too), so a table altered this way
    replicates like one made new; only its column order differs.
    """
    todo: list[tuple[str, sql.Composed]] = []
    for table, dropped in schema.DROPPED_COLUMNS.items():
        have = columns(conn, table)
        for column in dropped:
            if column in have:
                todo.append(
                    (
                        f"dropped column {table}.{column}",
                        sql.SQL("ALTER TABLE {} DROP COLUMN IF EXISTS {}").format(
                            sql.Identifier("public", table), sql.Identifier(column)
                        ),
                    )
                )
    for table, added in schema.ADDED_COLUMNS.items():
        have = columns(conn, table)
        for column, definition in added:
            if column not in have:
                todo.append(
                    (
                        f"added column {table}.{column}",
                        sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                            sql.Identifier("public", table),
                            sql.Identifier(column),
                            sql.SQL(definition),  # a constant of schema.py, never input
                        ),
                    )
                )
    return todo


def _trigger_state(conn: Conn, name: str) -> str | None:
    value = scalar(
        conn,
        "SELECT tgenabled FROM pg_trigger WHERE tgname = %s"
        " AND tgrelid = 'public.verdict_events'::regclass",
        (name,),
    )
    return None if value is None else str(value)


def require_goc_ready(conn: Conn) -> None:
    if not relation_exists(conn, "verdict_events"):
        raise SchemaMissing(f"{GOC}: table verdict_events missing; run ensure_goc first")
    for trigger in schema.TRIGGERS:
        if _trigger_state(conn, trigger.name) != "A":
            raise SchemaMissing(
                f"{GOC}: trigger {trigger.name} missing or not ALWAYS; run ensure_goc first"
            )


def stale_reason(
    sub: subscription.Subscription, tower_conninfo: str, slot: str, tower: Conn
) -> str | None:
    """Why the GOC's events subscription no longer follows the tower's primary (None: it does)."""
    if endpoint(sub.conninfo) != endpoint(tower_conninfo):
        return f"it follows {redact(sub.conninfo)}, not the primary {redact(tower_conninfo)}"
    if sub.slot_name != slot:
        return f"its slot {sub.slot_name} is not the slot {slot} of this primary's timeline"
    found = slots.find(tower, slot)
    if found is None:
        return f"its slot {slot} does not exist on the primary"
    if found.wal_status == "lost":
        return f"its slot {slot} was invalidated (WAL removed, max_slot_wal_keep_size)"
    return None


def ensure_goc_subscription(goc_dsn: str, tower_name: str, tower_conninfo: str) -> Changes:
    """The GOC's subscription ``mt_events_<tower>`` to the tower primary's events.

    ``tower_conninfo``: one host (the primary), as the GOC reaches it, as ``mt_sync``. The
    first time, existing events are copied (``copy_data``; the dedup trigger makes a re-copy
    harmless). Raises ``RepointNeeded`` when the subscription follows another server or slot
    (a failover happened): ``repoint_after_failover`` handles that, with reconciliation.
    """
    changes = Changes(GOC)
    name = events_subscription(tower_name)
    with connect(goc_dsn) as goc, connect(tower_conninfo) as tower:
        lock(goc)
        require_primary(goc, GOC, publishes=False)
        require_goc_ready(goc)
        timeline = require_primary(tower, tower_name, publishes=True)
        require_publication(tower, tower_name, EVENTS_PUBLICATION, "run ensure_tower first")
        slot = events_slot(tower_name, timeline)
        sub = subscription.get(goc, name)
        if sub is not None:
            reason = stale_reason(sub, tower_conninfo, slot, tower)
            if reason is not None:
                raise RepointNeeded(
                    f"{GOC}: subscription {name}: {reason}; run repoint_after_failover"
                    f" for {tower_name}"
                )
            subscription.ensure_settings(goc, sub, tower_conninfo, EVENTS_PUBLICATION, changes)
            return changes
        existing = slots.find(tower, slot)
        if existing is not None and existing.active_pid is not None:
            raise SyncError(
                f"{tower_name}: slot {slot} is in use by another subscriber (pid"
                f" {existing.active_pid}); is another GOC subscribed to this tower?"
            )
        create_events_subscription(
            goc,
            tower_name,
            tower_conninfo,
            slot_name=slot,
            create_slot=existing is None,
            copy_data=True,
        )
        changes.did(
            f"created subscription {name} to {redact(tower_conninfo)}"
            f" (slot {slot}, copying existing events)"
        )
    return changes


def create_events_subscription(
    goc: Conn,
    tower_name: str,
    tower_conninfo: str,
    *,
    slot_name: str,
    create_slot: bool,
    copy_data: bool,
) -> None:
    """``mt_events_<tower>``, enabled only once it is known to apply to ``verdict_events`` alone.

    The publisher lists a publication's tables when a subscription is made: a compromised tower
    that added ``customers`` (or any other table) to its ``mt_events`` would otherwise write
    into the GOC's configuration, which every tower takes. Such a subscription is dropped again
    (its slot left to the tower) and refused.
    """
    name = events_subscription(tower_name)
    subscription.create(
        goc,
        name,
        tower_conninfo,
        EVENTS_PUBLICATION,
        slot_name=slot_name,
        create_slot=create_slot,
        copy_data=copy_data,
        enabled=False,
    )
    applied = subscription.tables(goc, name)
    if applied != [f"public.{EVENTS_TABLE}"]:
        sub = subscription.get(goc, name)
        if sub is not None:
            subscription.drop_keep_slot(goc, sub)
        raise SyncError(
            f"{tower_name}: its publication {EVENTS_PUBLICATION} offers {applied or 'no table'},"
            f" not only {EVENTS_TABLE}; refused (is the tower's primary compromised, or its"
            " publication changed by hand?). Fix the publication, then deploy the GOC again"
        )
    subscription.enable(goc, name)
