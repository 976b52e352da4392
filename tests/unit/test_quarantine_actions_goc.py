"""The GOC's quarantine_actions on a real PostgreSQL: made by the GOC deploy's ``ensure``
(idempotent), and each tower's monitor role sees and answers only its own tower's requests."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pgclusters  # tests/ is on sys.path (rootdir conftest)
import psycopg
import pytest
from needs import missing

from mailtower.goc.eye.status import status_role
from mailtower.goc.sync import quarantine_actions
from mailtower.goc.sync.changes import Changes

pytestmark = pytest.mark.integration

PASSWORD = "status-password-0123456789"
TOWERS = ["lab-a", "lab-b"]


@pytest.fixture(scope="module")
def goc() -> Iterator[pgclusters.Cluster]:
    if not Path(pgclusters.PG_BIN / "initdb").exists():
        missing("PostgreSQL 15 (package postgresql-15)", module=True)
    workdir = pgclusters.make_workdir("mailtower-qactions-")
    cluster = pgclusters.Cluster.create("goc", workdir)
    try:
        with cluster.connect() as conn:
            for tower in TOWERS:
                conn.execute(f"CREATE ROLE {status_role(tower)} LOGIN PASSWORD '{PASSWORD}'")
            changes = Changes("goc")
            quarantine_actions.ensure(conn, TOWERS, changes)
            assert changes.actions
        yield cluster
    finally:
        cluster.destroy()
        shutil.rmtree(workdir, ignore_errors=True)


def _request(goc: pgclusters.Cluster, tower: str) -> uuid.UUID:
    request_id = uuid.uuid4()
    with goc.connect() as conn:
        conn.execute(
            "INSERT INTO quarantine_actions"
            " (request_id, event_id, tower, quarantine_id, action, requested_by)"
            " VALUES (%s, %s, %s, 'q1', 'release', 'portal:admin@x.example')",
            (request_id, uuid.uuid4(), tower),
        )
    return request_id


def _as(goc: pgclusters.Cluster, tower: str) -> psycopg.Connection[Any]:
    return psycopg.connect(goc.conninfo(status_role(tower), PASSWORD), autocommit=True)


def test_a_second_ensure_changes_nothing(goc: pgclusters.Cluster) -> None:
    with goc.connect() as conn:
        assert quarantine_actions.pending(conn, TOWERS) == []
        changes = Changes("goc")
        quarantine_actions.ensure(conn, TOWERS, changes)
        assert changes.actions == []


def test_a_tower_sees_and_answers_only_its_own_requests(goc: pgclusters.Cluster) -> None:
    mine, theirs = _request(goc, "lab-a"), _request(goc, "lab-b")
    with _as(goc, "lab-a") as conn:
        seen = [r for (r,) in conn.execute("SELECT request_id FROM quarantine_actions")]
        assert mine in seen and theirs not in seen
        answered = conn.execute(
            "UPDATE quarantine_actions SET done_at = now(), result = 'failed', answer = 'x'"
            " WHERE request_id = %s",
            (theirs,),
        ).rowcount
        assert answered == 0
        answered = conn.execute(
            "UPDATE quarantine_actions SET done_at = now(), result = 'released', answer = '250'"
            " WHERE request_id = %s",
            (mine,),
        ).rowcount
        assert answered == 1
    with goc.connect() as conn:
        row = conn.execute(
            "SELECT result, done_at IS NULL FROM quarantine_actions WHERE request_id = %s",
            (theirs,),
        ).fetchone()
    assert row == (None, True)


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO quarantine_actions (request_id, event_id, tower, quarantine_id, action,"
        " requested_by) VALUES (gen_random_uuid(), gen_random_uuid(), 'lab-a', 'q', 'delete',"
        " 'me')",
        "DELETE FROM quarantine_actions",
        "UPDATE quarantine_actions SET recipients = '{evil@x.example}'",
        "UPDATE quarantine_actions SET tower = 'lab-b'",
        "UPDATE quarantine_actions SET action = 'release'",
        "TRUNCATE quarantine_actions",
    ],
)
def test_a_tower_cannot_make_change_or_remove_requests(
    goc: pgclusters.Cluster, statement: str
) -> None:
    _request(goc, "lab-a")
    with _as(goc, "lab-a") as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(statement)


def test_a_grant_made_by_hand_is_taken_back(goc: pgclusters.Cluster) -> None:
    role = status_role("lab-b")
    with goc.connect() as conn:
        conn.execute(f"GRANT INSERT, DELETE ON quarantine_actions TO {role}")
        assert any("revoke" in p for p in quarantine_actions.pending(conn, TOWERS))
        quarantine_actions.ensure(conn, TOWERS, Changes("goc"))
        assert quarantine_actions.pending(conn, TOWERS) == []
    with _as(goc, "lab-b") as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("DELETE FROM quarantine_actions")
