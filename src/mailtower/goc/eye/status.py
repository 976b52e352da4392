"""Each tower's state for VirusEye: the ``tower_status`` table, its DDL and its upsert.

Blocking (psycopg): a tower's monitor calls it from a thread, as it does its replication query.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

UPSERT = """
INSERT INTO public.tower_status AS s
    (tower, scanners_up, scanners_total, queue_size, replication_lag_s,
     rules_bundle, rules_target, scanners_behind, clamav, updated_at)
VALUES (%(tower)s, %(scanners_up)s, %(scanners_total)s, %(queue_size)s,
        %(replication_lag_s)s, %(rules_bundle)s, %(rules_target)s, %(scanners_behind)s,
        %(clamav)s, now())
ON CONFLICT (tower) DO UPDATE SET
    scanners_up = excluded.scanners_up,
    scanners_total = excluded.scanners_total,
    queue_size = excluded.queue_size,
    replication_lag_s = excluded.replication_lag_s,
    rules_bundle = excluded.rules_bundle,
    rules_target = excluded.rules_target,
    scanners_behind = excluded.scanners_behind,
    clamav = excluded.clamav,
    updated_at = excluded.updated_at
"""
STATUS_ROLE_PREFIX = "mt_status_"


def status_role(tower: str) -> str:
    """The GOC role tower ``tower``'s monitor logs in as; it may write only its tower's row
    (row-level security, ``mailtower.goc.sync.deployed``)."""
    return STATUS_ROLE_PREFIX + tower.replace("-", "_")


# Columns schema.sql adds to a tower_status made before them (see missing_columns).
ADDED_COLUMNS = ("rules_bundle", "rules_target", "scanners_behind", "clamav")


@dataclass(frozen=True)
class TowerStatus:
    """What a tower's monitor reports about its tower."""

    tower: str
    scanners_up: int
    scanners_total: int
    queue_size: int  # messages in the relay's queue (active + deferred)
    replication_lag_s: float | None  # standby replay lag; None = no standby streaming
    # Rule bundles: the oldest version any in-service scanner runs (None: unknown, or the
    # shipped rules), the version the monitor's mirror holds (None: none yet), and how many
    # in-service scanners run an older one than that.
    rules_bundle: int | None = None
    rules_target: int | None = None
    scanners_behind: int = 0
    # The official ClamAV databases in the tower's mirror (None: the tower takes none, or has
    # none yet): {"databases": {db: {"version", "built_at" (Unix time or None), "behind"
    # (scanners serving without that version)}}, "upstream_last_ok" (the GOC's last good
    # check upstream, Unix time or None), "scanners_behind", "rejected" (the set failed its
    # canary)} — mailtower.monitor.rollout.clamav.ClamavRollout.status.
    clamav: dict[str, Any] | None = None


def schema_sql() -> str:
    """The DDL of VirusEye's objects (the table above and the virus indexes)."""
    return resources.files("mailtower.goc.eye").joinpath("schema.sql").read_text()


def apply_schema(conn: psycopg.Connection) -> None:
    """Create VirusEye's objects if missing (``verdict_events`` must exist already)."""
    with conn.transaction():
        conn.execute(schema_sql().encode())  # a trusted file: run as is, no parameters


def missing_columns(conn: psycopg.Connection) -> list[str]:
    """ADDED_COLUMNS an existing ``tower_status`` lacks (apply_schema adds them)."""
    rows = conn.execute(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = 'public' AND table_name = 'tower_status'"
    ).fetchall()
    present = {name for (name,) in rows}
    return [c for c in ADDED_COLUMNS if c not in present]


def upsert_tower_status(conn: psycopg.Connection, status: TowerStatus) -> None:
    """Record ``status`` as the tower's current state, stamped with the database's clock."""
    # The database's now(), not the tower's clock: staleness is judged by the GOC's clock too.
    with conn.transaction():
        conn.execute(
            UPSERT,
            {
                "tower": status.tower,
                "scanners_up": status.scanners_up,
                "scanners_total": status.scanners_total,
                "queue_size": status.queue_size,
                "replication_lag_s": status.replication_lag_s,
                "rules_bundle": status.rules_bundle,
                "rules_target": status.rules_target,
                "scanners_behind": status.scanners_behind,
                "clamav": Jsonb(status.clamav) if status.clamav is not None else None,
            },
        )
