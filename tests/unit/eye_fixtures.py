"""VirusEye's test hub: a throwaway PostgreSQL with the tower's verdict_events and the eye's
objects, and helpers that write events the way a tower's scanners do."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from mailtower.goc.eye.status import apply_schema

ROOT = Path(__file__).resolve().parents[2]
TOWER_SCHEMA = ROOT / "templates/sql/etc/mailtower/sql/schema.sql.j2"
# Roles the tower schema grants to; they only need to exist here.
TOWER_ROLES = ("mailtower_relay", "mailtower_scanner", "mailtower_monitor")


@contextmanager
def goc_hub(name: str = "goc") -> Iterator[Any]:
    """A started cluster (tests/pgclusters.py) whose ``mailtower`` database has the schema."""
    import pgclusters  # tests/ is on sys.path (rootdir conftest)

    workdir = pgclusters.make_workdir("mailtower-eye-")
    cluster = pgclusters.Cluster.create(name, workdir)
    try:
        with cluster.connect() as conn:
            for role in TOWER_ROLES:
                conn.execute(f"CREATE ROLE {role}")
            conn.execute(TOWER_SCHEMA.read_text())
            apply_schema(conn)
        yield cluster
    finally:
        cluster.destroy()
        shutil.rmtree(workdir, ignore_errors=True)


def finding(engine: str, name: str, part: str | None = "message") -> dict[str, Any]:
    return {"engine": engine, "name": name, "part": part}


def add_event(
    conn: psycopg.Connection[Any],
    *,
    tower: str,
    at: datetime,
    findings: list[dict[str, Any]],
    recipients: list[str],
    verdict: str = "virus",
) -> str:
    """Insert one verdict event as a scanner would; returns its event_id."""
    event_id = str(uuid.uuid4())
    conn.execute(
        "INSERT INTO verdict_events (event_id, tower, scanner, scanned_at, verdict, message_id,"
        " sender, recipients, findings, quarantine_id, size_bytes)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            event_id,
            tower,
            "10.201.1.101",
            at,
            verdict,
            f"<{event_id}@sender.example>",
            "someone@sender.example",
            recipients,
            Jsonb(findings),
            None if verdict == "clean" else f"q-{event_id[:12]}",
            2048,
        ),
    )
    return event_id
