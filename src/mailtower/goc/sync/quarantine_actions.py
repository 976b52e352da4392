"""The GOC's ``quarantine_actions``: what the portal asks a tower to do with a quarantined
message (docs/quarantine.md), with row-level security so a tower's monitor sees and answers
only its own tower's requests.

The portal inserts a row; the tower's quarantine manager (``mailtower.monitor.quarantine``)
logs in as ``mt_status_<tower>``, reads its tower's pending rows and writes ``done_at``,
``result`` and ``answer`` back. That role may SELECT its tower's rows and UPDATE only those
three columns of them (column grants), never INSERT or DELETE. ``goc_apply`` (deployed.py)
runs ``ensure``; a second run changes nothing (``pending`` is empty).

Hook for the portal (goc/portal, roles/goc.py): its role's grants and policy on this table
(SELECT, INSERT for requests; it must never see other customers' rows through its own query
scoping) belong beside the tower policies in ``ensure``: pass its policies in
``extra_policies`` (name -> (role, command, qual)) and grant its privileges after ``ensure``.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from mailtower.goc.eye.status import status_role
from mailtower.goc.sync.catalog import relation_exists, scalar
from mailtower.goc.sync.changes import Changes

TABLE = "quarantine_actions"
DDL = """
CREATE TABLE IF NOT EXISTS public.quarantine_actions (
    request_id    uuid PRIMARY KEY,
    event_id      uuid NOT NULL,
    tower         text NOT NULL,
    quarantine_id text NOT NULL,
    action        text NOT NULL CHECK (action IN ('release', 'delete')),
    -- a release to these only (a subset of the event's recipients); empty: all of them
    recipients    text[] NOT NULL DEFAULT '{}',
    requested_by  text NOT NULL,
    requested_at  timestamptz NOT NULL DEFAULT now(),
    done_at       timestamptz,
    result        text CHECK (result IN ('released', 'deleted', 'failed', 'gone')),
    -- the tower's answer (the relay's reply, why it failed; while pending: the last attempt's)
    answer        text,
    CHECK ((done_at IS NULL) = (result IS NULL))
);
CREATE INDEX IF NOT EXISTS quarantine_actions_pending ON public.quarantine_actions (tower)
    WHERE done_at IS NULL;
-- the portal's reads of one message's requests (its state, its page, what a release covers)
CREATE INDEX IF NOT EXISTS quarantine_actions_event ON public.quarantine_actions
    (event_id, requested_at);
"""
INDEXES = ("quarantine_actions_pending", "quarantine_actions_event")
# What a tower's monitor may do: read its rows, answer them (these columns only).
TOWER_SELECT = "SELECT"
TOWER_UPDATE_COLUMNS = ("done_at", "result", "answer")
Policy = tuple[str, str, str]  # (role, command, qual)
# The policies ``ensure`` manages (and drops when their tower is gone); others are left alone.
OWN_PREFIXES = ("own_select_", "own_update_")


def tower_policies(towers: list[str]) -> dict[str, Policy]:
    """Row-level security: each tower's monitor may read and update only its tower's rows."""
    policies: dict[str, Policy] = {}
    for tower in towers:
        role, qual = status_role(tower), f"(tower = {sql.quote(tower)}::text)"
        policies[f"own_select_{role}"] = (role, "SELECT", qual)
        policies[f"own_update_{role}"] = (role, "UPDATE", qual)
    return policies


def pending(
    conn: psycopg.Connection[Any],
    towers: list[str],
    extra_policies: dict[str, Policy] | None = None,
) -> list[str]:
    """What ``ensure`` would do (nothing: the table, its policies and grants are as they must)."""
    if not relation_exists(conn, TABLE):
        return [f"create table {TABLE}"]
    todo: list[str] = []
    for index in INDEXES:
        if not scalar(
            conn, "SELECT 1 FROM pg_class WHERE relname = %s AND relkind = 'i'", (index,)
        ):
            todo.append(f"create index {index}")
    found = {
        name: (list(roles), cmd, qual)
        for name, roles, cmd, qual in conn.execute(
            "SELECT policyname, roles::text[], cmd, qual FROM pg_policies"
            " WHERE schemaname = 'public' AND tablename = %s",
            (TABLE,),
        ).fetchall()
    }
    wanted = tower_policies(towers) | (extra_policies or {})
    todo += [
        f"create policy {name} on {TABLE} for {role}"
        for name, (role, cmd, qual) in wanted.items()
        if found.get(name) != ([role], cmd, qual)
    ]
    todo += [
        f"drop policy {name} on {TABLE} (no such tower)"
        for name in found
        if name.startswith(OWN_PREFIXES) and name not in wanted
    ]
    if not scalar(
        conn, "SELECT relrowsecurity FROM pg_class WHERE oid = %s::regclass", (f"public.{TABLE}",)
    ):
        todo.append(f"enable row-level security on {TABLE}")
    for tower in towers:
        todo += _grants_pending(conn, status_role(tower))
    return todo


def _grants_pending(conn: psycopg.Connection[Any], role: str) -> list[str]:
    if not scalar(conn, "SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)):
        return []  # made by goc_apply before ensure runs; pending lists it as its own item
    todo = []
    table = f"public.{TABLE}"
    if not scalar(conn, "SELECT has_table_privilege(%s, %s, 'SELECT')", (role, table)):
        todo.append(f"grant SELECT on {TABLE} to {role}")
    for column in TOWER_UPDATE_COLUMNS:
        if not scalar(
            conn, "SELECT has_column_privilege(%s, %s, %s, 'UPDATE')", (role, table, column)
        ):
            todo.append(f"grant UPDATE ({column}) on {TABLE} to {role}")
    # Anything beyond that (granted by hand, or by an older deploy) is taken back.
    for privilege in ("INSERT", "DELETE", "TRUNCATE", "UPDATE"):
        if scalar(conn, "SELECT has_table_privilege(%s, %s, %s)", (role, table, privilege)):
            todo.append(f"revoke {privilege} on {TABLE} from {role}")
    return todo


def ensure(
    conn: psycopg.Connection[Any],
    towers: list[str],
    changes: Changes,
    extra_policies: dict[str, Policy] | None = None,
) -> None:
    """Create the table, its policies and each tower role's grants where they are missing;
    the roles (``mt_status_<tower>``) must exist. One transaction: the policies are in place
    before row-level security is on."""
    todo = pending(conn, towers, extra_policies)
    if not todo:
        return
    table = sql.Identifier("public", TABLE)
    with conn.transaction():
        conn.execute(DDL.encode())  # a constant: run as is, no parameters
        wanted = tower_policies(towers) | (extra_policies or {})
        existing = [
            name
            for (name,) in conn.execute(
                "SELECT policyname FROM pg_policies WHERE schemaname = 'public' AND tablename = %s",
                (TABLE,),
            ).fetchall()
            if name.startswith(OWN_PREFIXES) or name in wanted
        ]
        for name in existing:
            conn.execute(sql.SQL("DROP POLICY {} ON {}").format(sql.Identifier(name), table))
        for name, (role, cmd, qual) in wanted.items():
            check = (
                sql.SQL(" WITH CHECK {}").format(sql.SQL(qual)) if cmd == "UPDATE" else sql.SQL("")
            )
            conn.execute(
                sql.SQL("CREATE POLICY {} ON {} FOR {} TO {} USING {}{}").format(
                    sql.Identifier(name),
                    table,
                    sql.SQL(cmd),
                    sql.Identifier(role),
                    sql.SQL(qual),
                    check,
                )
            )
        conn.execute(sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(table))
        for tower in towers:
            grantee = sql.Identifier(status_role(tower))
            # Table and column privileges alike go, then exactly these are given.
            conn.execute(sql.SQL("REVOKE ALL ON {} FROM {}").format(table, grantee))
            conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(table, grantee))
            conn.execute(
                sql.SQL("GRANT UPDATE ({}) ON {} TO {}").format(
                    sql.SQL(", ").join(sql.Identifier(c) for c in TOWER_UPDATE_COLUMNS),
                    table,
                    grantee,
                )
            )
    changes.actions.extend(todo)
