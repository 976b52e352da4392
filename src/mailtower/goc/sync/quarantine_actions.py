"""The GOC's ``quarantine_actions``: what the portal asks a tower to do with a quarantined
message (docs/quarantine.md), with row-level security so a tower's monitor sees and answers
only its own tower's requests.

The portal inserts a row; the tower's quarantine manager (``mailtower.monitor.quarantine``)
logs in as ``mt_status_<tower>``, reads its tower's pending rows and writes ``done_at``,
``result`` and ``answer`` back. That role may SELECT its tower's rows and UPDATE only those
three columns of them (column grants), never INSERT or DELETE. ``goc_apply`` (deployed.py)
runs ``ensure``; a second run changes nothing (``pending`` is empty).

The portal (``mt_portal``, goc/portal) asks: it may SELECT and INSERT, every tower's rows
(policy ``mt_portal_all``; it is the GOC's own app and scopes its reads per customer itself),
never UPDATE or DELETE. Its role is made by its own deploy step (``mailtower portal schema``),
which may run before or after this module's first ``ensure``; so both converge on the same
state, whichever comes first: ``ensure`` adds the portal's policy and grants once the role
exists (and ``pending`` reports them missing), and the portal's step calls ``ensure_portal``,
which makes the table if it is not there yet and never touches the towers' policies. The
towers' policy management drops only its own (``OWN_PREFIXES``), never the portal's.
``extra_policies`` (name -> (role, command, qual)) adds any other policy beside them.
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
# The GOC's quarantine portal: asks (INSERT) and shows (SELECT) requests of every tower.
PORTAL_ROLE = "mt_portal"
PORTAL_POLICY = "mt_portal_all"
PORTAL_PRIVILEGES = ("SELECT", "INSERT")
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


def portal_policies(conn: psycopg.Connection[Any]) -> dict[str, Policy]:
    """The portal's policy, once its role exists (its own deploy step makes it)."""
    if not scalar(conn, "SELECT 1 FROM pg_roles WHERE rolname = %s", (PORTAL_ROLE,)):
        return {}
    return {PORTAL_POLICY: (PORTAL_ROLE, "ALL", "true")}


def _policies_pending(
    conn: psycopg.Connection[Any], wanted: dict[str, Policy], *, drop_own: bool
) -> list[str]:
    found = {
        name: (list(roles), cmd, qual)
        for name, roles, cmd, qual in conn.execute(
            "SELECT policyname, roles::text[], cmd, qual FROM pg_policies"
            " WHERE schemaname = 'public' AND tablename = %s",
            (TABLE,),
        ).fetchall()
    }
    todo = [
        f"create policy {name} on {TABLE} for {role}"
        for name, (role, cmd, qual) in wanted.items()
        if found.get(name) != ([role], cmd, qual)
    ]
    if drop_own:
        todo += [
            f"drop policy {name} on {TABLE} (no such tower)"
            for name in found
            if name.startswith(OWN_PREFIXES) and name not in wanted
        ]
    return todo


def _rls_pending(conn: psycopg.Connection[Any]) -> list[str]:
    if scalar(
        conn, "SELECT relrowsecurity FROM pg_class WHERE oid = %s::regclass", (f"public.{TABLE}",)
    ):
        return []
    return [f"enable row-level security on {TABLE}"]


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
    wanted = tower_policies(towers) | portal_policies(conn) | (extra_policies or {})
    todo += _policies_pending(conn, wanted, drop_own=True)
    todo += _rls_pending(conn)
    for tower in towers:
        todo += _grants_pending(conn, status_role(tower))
    todo += _portal_grants_pending(conn)
    return todo


def _portal_grants_pending(conn: psycopg.Connection[Any]) -> list[str]:
    if not portal_policies(conn):
        return []  # no portal at this GOC (yet)
    table = f"public.{TABLE}"
    todo = [
        f"grant {privilege} on {TABLE} to {PORTAL_ROLE}"
        for privilege in PORTAL_PRIVILEGES
        if not scalar(
            conn, "SELECT has_table_privilege(%s, %s, %s)", (PORTAL_ROLE, table, privilege)
        )
    ]
    for privilege in ("UPDATE", "DELETE", "TRUNCATE"):  # it asks; the towers answer
        if scalar(conn, "SELECT has_table_privilege(%s, %s, %s)", (PORTAL_ROLE, table, privilege)):
            todo.append(f"revoke {privilege} on {TABLE} from {PORTAL_ROLE}")
    return todo


def _grant_portal(conn: psycopg.Connection[Any]) -> None:
    grantee = sql.Identifier(PORTAL_ROLE)
    table = sql.Identifier("public", TABLE)
    conn.execute(sql.SQL("REVOKE ALL ON {} FROM {}").format(table, grantee))
    conn.execute(
        sql.SQL("GRANT {} ON {} TO {}").format(
            sql.SQL(", ").join(sql.SQL(p) for p in PORTAL_PRIVILEGES), table, grantee
        )
    )


def _create_policy(conn: psycopg.Connection[Any], name: str, policy: Policy) -> None:
    role, cmd, qual = policy
    # ``qual`` as pg_policies shows it (the comparison of ``pending``), in parentheses here
    check = sql.SQL(" WITH CHECK ({})").format(sql.SQL(qual)) if cmd == "UPDATE" else sql.SQL("")
    conn.execute(
        sql.SQL("CREATE POLICY {} ON {} FOR {} TO {} USING ({}){}").format(
            sql.Identifier(name),
            sql.Identifier("public", TABLE),
            sql.SQL(cmd),
            sql.Identifier(role),
            sql.SQL(qual),
            check,
        )
    )


def portal_pending(conn: psycopg.Connection[Any]) -> list[str]:
    """What ``ensure_portal`` would do (nothing without the portal's role)."""
    wanted = portal_policies(conn)
    if not wanted:
        return []
    if not relation_exists(conn, TABLE):
        return [f"create table {TABLE}"]
    todo = [
        f"create index {index}"
        for index in INDEXES
        if not scalar(conn, "SELECT 1 FROM pg_class WHERE relname = %s AND relkind = 'i'", (index,))
    ]
    todo += _policies_pending(conn, wanted, drop_own=False)
    todo += _rls_pending(conn)
    return todo + _portal_grants_pending(conn)


def ensure_portal(conn: psycopg.Connection[Any], changes: Changes) -> None:
    """The portal's side (its deploy step, ``mailtower portal schema``): the table if it is not
    there yet (the sync's first ``ensure`` may come later), the portal's policy and grants.
    The towers' policies and grants are ``ensure``'s: never touched here. The role must exist."""
    todo = portal_pending(conn)
    if not todo:
        return
    table = sql.Identifier("public", TABLE)
    with conn.transaction():
        conn.execute(DDL.encode())  # a constant: run as is, no parameters
        for name, policy in portal_policies(conn).items():
            conn.execute(
                sql.SQL("DROP POLICY IF EXISTS {} ON {}").format(sql.Identifier(name), table)
            )
            _create_policy(conn, name, policy)
        conn.execute(sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(table))
        _grant_portal(conn)
    changes.actions.extend(todo)


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
        wanted = tower_policies(towers) | portal_policies(conn) | (extra_policies or {})
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
        for name, policy in wanted.items():
            _create_policy(conn, name, policy)
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
        if portal_policies(conn):
            _grant_portal(conn)
    changes.actions.extend(todo)
