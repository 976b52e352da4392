"""The sync as deploys run it: one JSON file per side, a check that changes nothing, an apply.

The roles write the file (``/etc/mailtower/sync/tower.json`` on a tower's SQL hosts,
``/etc/mailtower/sync/goc.json`` at the GOC) and run ``mailtower sync tower|goc`` on the host,
as ``postgres`` over the local socket. ``--check`` lists what an apply would do, without
doing it, so a redeploy of a synced tower runs nothing (pyinfra reads it as a fact).

- tower: on the primary, ``ensure_tower`` (sync role, events publication, config
  subscription). On a standby there is nothing to do: its catalog is the primary's.
- GOC: ``ensure_goc`` (schema, one sync role per tower, config publication), VirusEye's
  objects and roles (``mt_status_<tower>`` for each tower's monitor, allowed by row-level
  security to write only its tower's ``tower_status`` row; ``mt_eye`` for the web view); the
  shared ``mt_sync``/``mt_status`` of a GOC made before towers had their own are retired
  (NOLOGIN); the portal's ``quarantine_actions`` (each ``mt_status_<tower>`` reads and answers
  only its tower's requests; ``mt_portal``, once its own step made it, asks for any:
  ``quarantine_actions.ensure``). Then for every tower
  the events subscription follows that tower's *current* primary, found by asking each of its
  SQL hosts (``repoint_events``: the first time, and after a failover, alike). A tower that is
  not reachable or not deployed yet is reported and left for the next run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from pydantic import Field, ValidationError

from mailtower.goc.eye.status import apply_schema, missing_columns, status_role
from mailtower.goc.sync import quarantine_actions, subscription
from mailtower.goc.sync.catalog import connect, relation_exists, scalar, server_state
from mailtower.goc.sync.changes import Changes
from mailtower.goc.sync.conninfo import endpoint, redact, sync_conninfo
from mailtower.goc.sync.exceptions import SyncError
from mailtower.goc.sync.failover import repoint_events
from mailtower.goc.sync.goc import (
    CONFIG_OPERATIONS,
    GOC,
    ensure_goc,
    schema_pending,
    stale_reason,
)
from mailtower.goc.sync.names import (
    CONFIG_PUBLICATION,
    CONFIG_TABLES,
    EVENTS_PUBLICATION,
    EVENTS_TABLE,
    SYNC_ROLE,
    config_slot,
    config_subscription,
    events_slot,
    events_subscription,
    goc_sync_role,
)
from mailtower.goc.sync.publication import publication_pending
from mailtower.goc.sync.roles import ensure_login_role, ensure_privileges, scram_matches
from mailtower.goc.sync.tower import EVENTS_OPERATIONS, ensure_tower, own_tower_pending
from mailtower.settings import StrictModel

# The one role all towers' monitors shared before each had its own (status_role): retired.
SHARED_STATUS_ROLE = "mt_status"
STATUS_TABLE = "tower_status"
EYE_STATUS_POLICY = "mt_eye_reads"  # VirusEye reads every tower's row
EYE_ROLE = "mt_eye"  # VirusEye: reads the hub
EYE_TABLES = ("verdict_events", "tower_status", "customers", "domains")
# VirusEye's own table: logouts kept across its restarts (mailtower.goc.eye.revocations).
EYE_REVOCATIONS = ("eye_revoked_sessions", ("SELECT", "INSERT", "DELETE"))


class TowerSide(StrictModel):
    """``/etc/mailtower/sync/tower.json`` on a tower's SQL hosts."""

    tower: str = Field(pattern=r"^[a-z][a-z0-9-]{0,30}$")
    dsn: str = "dbname=mailtower"  # superuser on this host (local socket, as postgres)
    goc_conninfo: str  # the GOC as this tower reaches it, as mt_sync (one host)
    sync_password: str = Field(min_length=16)  # this tower's mt_sync, which the GOC uses


class GocTower(StrictModel):
    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,30}$")
    # Its SQL hosts (ADDRESS, or ADDRESS:PORT when not ``port``): whichever is primary is followed.
    hosts: list[str] = Field(min_length=1)
    port: int = 5432
    database: str = "mailtower"
    sync_password: str = Field(min_length=16)  # the tower's mt_sync, which the GOC connects as
    # This tower's own roles at the GOC, with the passwords its settings hold (secrets.goc_sync,
    # secrets.goc_status): mt_sync_<tower> (its config subscription), mt_status_<tower>.
    goc_sync_password: str = Field(min_length=16)
    status_password: str = Field(min_length=16)

    def conninfo(self, host: str) -> str:
        address, _, port = host.partition(":")
        return sync_conninfo(
            address,
            int(port or self.port),
            self.database,
            SYNC_ROLE,
            self.sync_password,
            connect_timeout="5",
        )


class GocSide(StrictModel):
    """``/etc/mailtower/sync/goc.json`` at the GOC."""

    dsn: str = "dbname=goc"  # superuser at the GOC (local socket, as postgres)
    eye_password: str = Field(min_length=16)  # mt_eye: VirusEye
    towers: list[GocTower] = []


def load(path: Path, model: type[TowerSide] | type[GocSide]) -> Any:
    try:
        return model.model_validate(json.loads(path.read_text()))
    except FileNotFoundError as exc:
        raise SyncError(f"{path}: not found; deploy the host first") from exc
    except (ValueError, ValidationError) as exc:
        raise SyncError(f"{path}: invalid sync settings: {exc}") from exc


# --- the tower side -------------------------------------------------------------------------


def tower_pending(side: TowerSide) -> list[str]:
    """What ``tower_apply`` would do here (nothing on a standby)."""
    with connect(side.dsn) as conn:
        state = server_state(conn)
        if state.in_recovery or state.timeline is None:
            return []
        pending = _role_pending(conn, SYNC_ROLE, side.sync_password, replication=True)
        if relation_exists(conn, EVENTS_TABLE):
            own = own_tower_pending(conn, side.tower)
            if own is not None:
                pending.append(own)
        # A publication widened by hand (update, delete, truncate; another table) is put back.
        pending += publication_pending(conn, EVENTS_PUBLICATION, (EVENTS_TABLE,), EVENTS_OPERATIONS)
        name = config_subscription(side.tower)
        sub = subscription.get(conn, name)
        if sub is None:
            pending.append(f"create subscription {name}")
        elif endpoint(sub.conninfo) != endpoint(side.goc_conninfo):
            pending.append(f"re-point subscription {name} to {redact(side.goc_conninfo)}")
        elif sub.slot_name != config_slot(side.tower, state.timeline):
            pending.append(f"re-subscribe {name} for timeline {state.timeline} (a promotion)")
        elif not sub.enabled:
            pending.append(f"enable subscription {name}")
        else:
            subscribed = {t.removeprefix("public.") for t in subscription.tables(conn, name)}
            missing = sorted(set(CONFIG_TABLES) - subscribed)
            if missing:  # the GOC publishes a new table (or will, once deployed)
                pending.append(f"refresh subscription {name} (to copy {', '.join(missing)})")
        return pending


def tower_apply(side: TowerSide) -> Changes:
    with connect(side.dsn) as conn:
        if server_state(conn).in_recovery:
            return Changes(side.tower)  # a standby: the primary's catalog arrives by streaming
    return ensure_tower(side.dsn, side.goc_conninfo, side.tower, sync_password=side.sync_password)


# --- the GOC side ---------------------------------------------------------------------------


@dataclass
class GocReport:
    changes: Changes
    followed: dict[str, str] = field(default_factory=dict)  # tower -> its primary's host
    skipped: dict[str, str] = field(default_factory=dict)  # tower -> why not now


def find_primary(tower: GocTower) -> tuple[str | None, str]:
    """The host of ``tower`` that is its primary, else None and why none is."""
    reasons = []
    for host in tower.hosts:
        try:
            with connect(tower.conninfo(host)) as conn:
                if not scalar(conn, "SELECT pg_is_in_recovery()"):
                    return host, ""
                reasons.append(f"{host} is a standby")
        except psycopg.Error as exc:
            reasons.append(f"{host}: {str(exc).strip().splitlines()[0]}")
    return None, "; ".join(reasons)


def goc_pending(side: GocSide) -> list[str]:
    """What ``goc_apply`` would do (towers not reachable yet are not counted)."""
    pending: list[str] = []
    with connect(side.dsn) as goc:
        # The sync's tables, indexes and verdict_events' triggers (an upgraded GOC lacks new ones).
        pending += schema_pending(goc)
        for table in ("tower_status", EYE_REVOCATIONS[0]):
            if not relation_exists(goc, table):
                pending.append(f"create table {table}")
        if relation_exists(goc, "tower_status"):
            pending += [f"add column tower_status.{c}" for c in missing_columns(goc)]
        # A GOC made before a configuration table existed publishes it from now on.
        pending += publication_pending(goc, CONFIG_PUBLICATION, CONFIG_TABLES, CONFIG_OPERATIONS)
        for t in side.towers:
            pending += _role_pending(
                goc, goc_sync_role(t.name), t.goc_sync_password, replication=True
            )
            pending += _role_pending(goc, status_role(t.name), t.status_password)
        pending += _role_pending(goc, EYE_ROLE, side.eye_password)
        pending += [f"retire role {r} (each tower has its own)" for r in _shared_roles(goc)]
        if relation_exists(goc, STATUS_TABLE):
            pending += _status_policies_pending(goc, side)
        # The portal's requests to the towers (docs/quarantine.md)
        pending += quarantine_actions.pending(goc, [t.name for t in side.towers])
        if not pending:
            table, privileges = EYE_REVOCATIONS
            pending += [
                f"grant {p} on {table} to {EYE_ROLE}"
                for p in privileges
                if not scalar(
                    goc, "SELECT has_table_privilege(%s, %s, %s)", (EYE_ROLE, f"public.{table}", p)
                )
            ]
        if pending:
            return pending
        for tower in side.towers:
            host, _why = find_primary(tower)
            if host is None:
                continue
            name = events_subscription(tower.name)
            sub = subscription.get(goc, name)
            if sub is None:
                pending.append(f"subscribe {name} to {host}")
                continue
            with connect(tower.conninfo(host)) as conn:
                if not _published(conn, EVENTS_PUBLICATION):
                    continue  # the tower's deploy has not made its publication yet
                timeline = server_state(conn).timeline or 0
                reason = stale_reason(
                    sub, tower.conninfo(host), events_slot(tower.name, timeline), conn
                )
            if reason is not None:
                pending.append(f"re-point {name}: {reason}")
            elif not sub.enabled:
                pending.append(f"enable subscription {name}")
    return pending


def goc_apply(side: GocSide, *, restored: bool = False) -> GocReport:
    """Everything at the GOC, and every tower's events followed from its primary;
    ``restored``: the GOC was just restored from a backup (``failover.repoint_events``)."""
    changes = ensure_goc(
        side.dsn, tower_sync_passwords={t.name: t.goc_sync_password for t in side.towers}
    )
    report = GocReport(changes)
    with connect(side.dsn) as goc:
        before = relation_exists(goc, "tower_status")
        added = missing_columns(goc) if before else []
        apply_schema(goc)
        if not before:
            changes.did("created VirusEye's objects (tower_status, virus indexes)")
        if added:
            changes.did(f"added tower_status columns {', '.join(added)}")
        for t in side.towers:
            role = status_role(t.name)
            ensure_login_role(goc, role, t.status_password, changes)
            ensure_privileges(goc, role, STATUS_TABLE, ("SELECT", "INSERT", "UPDATE"), changes)
        ensure_login_role(goc, EYE_ROLE, side.eye_password, changes)
        for table in EYE_TABLES:
            ensure_privileges(goc, EYE_ROLE, table, ("SELECT",), changes)
        ensure_privileges(goc, EYE_ROLE, *EYE_REVOCATIONS, changes)
        _ensure_status_policies(goc, side, changes)
        # The portal's requests to the towers: each tower's monitor reads and answers its own.
        quarantine_actions.ensure(goc, [t.name for t in side.towers], changes)
        for role in _shared_roles(goc):
            goc.execute(sql.SQL("ALTER ROLE {} NOLOGIN NOREPLICATION").format(sql.Identifier(role)))
            changes.did(f"retired role {role} (NOLOGIN: each tower has its own)")
    for tower in side.towers:
        host, why = find_primary(tower)
        if host is None:
            report.skipped[tower.name] = (
                f"no primary reachable as {SYNC_ROLE} ({why}); a tower not deployed yet is"
                " subscribed by the next GOC deploy"
            )
            continue
        with connect(tower.conninfo(host)) as conn:
            published = _published(conn, EVENTS_PUBLICATION)
        if not published:
            report.skipped[tower.name] = (
                f"its primary {host} has no publication {EVENTS_PUBLICATION} yet (deploy the"
                " tower, then the GOC again)"
            )
            continue
        tower_changes, _reconciled = repoint_events(
            side.dsn, tower.name, tower.conninfo(host), restored=restored
        )
        changes.actions.extend(tower_changes.actions)
        report.followed[tower.name] = host
    return report


def _shared_roles(conn: psycopg.Connection[Any]) -> list[str]:
    """The GOC's roles all towers shared before each had its own, still able to log in."""
    rows = conn.execute(
        "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s) AND rolcanlogin ORDER BY 1",
        ([SYNC_ROLE, SHARED_STATUS_ROLE],),
    ).fetchall()
    return [str(name) for (name,) in rows]


def _status_policies(side: GocSide) -> dict[str, tuple[str, str]]:
    """Row-level security on tower_status: policy name -> (role, the rows it may touch)."""
    policies = {EYE_STATUS_POLICY: (EYE_ROLE, "true")}
    for t in side.towers:
        policies[f"own_row_{status_role(t.name)}"] = (
            status_role(t.name),
            f"(tower = {sql.quote(t.name)}::text)",
        )
    return policies


def _status_policies_pending(conn: psycopg.Connection[Any], side: GocSide) -> list[str]:
    found = {
        name: (list(roles), qual)
        for name, roles, qual in conn.execute(
            "SELECT policyname, roles::text[], qual FROM pg_policies"
            " WHERE schemaname = 'public' AND tablename = %s",
            (STATUS_TABLE,),
        ).fetchall()
    }
    pending = [
        f"create policy {name} on {STATUS_TABLE} for {role}"
        for name, (role, qual) in _status_policies(side).items()
        if found.get(name) != ([role], qual)
    ]
    if not scalar(
        conn,
        "SELECT relrowsecurity FROM pg_class WHERE oid = %s::regclass",
        (f"public.{STATUS_TABLE}",),
    ):
        pending.append(f"enable row-level security on {STATUS_TABLE}")
    return pending


def _ensure_status_policies(conn: psycopg.Connection[Any], side: GocSide, changes: Changes) -> None:
    """Each tower's monitor may read and write only its tower's row; VirusEye reads them all.

    The policies are made before row-level security is switched on, in one transaction, so
    VirusEye never sees the table empty.
    """
    pending = _status_policies_pending(conn, side)
    if not pending:
        return
    table = sql.Identifier("public", STATUS_TABLE)
    with conn.transaction():
        for name, (role, qual) in _status_policies(side).items():
            conn.execute(
                sql.SQL("DROP POLICY IF EXISTS {} ON {}").format(sql.Identifier(name), table)
            )
            conn.execute(
                sql.SQL("CREATE POLICY {} ON {} TO {} USING {} WITH CHECK {}").format(
                    sql.Identifier(name), table, sql.Identifier(role), sql.SQL(qual), sql.SQL(qual)
                )
                if role != EYE_ROLE
                else sql.SQL("CREATE POLICY {} ON {} FOR SELECT TO {} USING (true)").format(
                    sql.Identifier(name), table, sql.Identifier(role)
                )
            )
        conn.execute(sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(table))
    changes.actions.extend(pending)


def _published(conn: psycopg.Connection[Any], publication: str) -> bool:
    return bool(scalar(conn, "SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,)))


def _role_pending(
    conn: psycopg.Connection[Any], role: str, password: str, *, replication: bool = False
) -> list[str]:
    row = conn.execute(
        "SELECT rolcanlogin, rolreplication, rolpassword FROM pg_authid WHERE rolname = %s",
        (role,),
    ).fetchone()
    if row is None:
        return [f"create role {role}"]
    can_login, has_replication, verifier = row
    pending = []
    if not can_login or (replication and not has_replication):
        pending.append(f"give role {role} its attributes")
    if not scram_matches(verifier, password):
        pending.append(f"set the password of role {role}")
    return pending


__all__ = [
    "GOC",
    "GocReport",
    "GocSide",
    "GocTower",
    "TowerSide",
    "find_primary",
    "goc_apply",
    "goc_pending",
    "load",
    "tower_apply",
    "tower_pending",
]
