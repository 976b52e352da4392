"""The GOC deploy's two steps on quarantine_actions, on a real PostgreSQL, in either order:
the sync (`mailtower sync goc`: the table, each tower's row-level security) and the portal's
(`mailtower portal schema`: mt_portal, its grants and policy). One run of both converges,
a second changes nothing, the towers' policy management keeps the portal's policy, the portal
asks for (and reads) every tower's rows but changes none, and a tower still sees only its own."""

from __future__ import annotations

import io
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pgclusters  # tests/ is on sys.path (rootdir conftest)
import psycopg
import pytest
from needs import missing

from mailtower.cli import main
from mailtower.goc.eye.status import status_role
from mailtower.goc.sync import deployed, quarantine_actions
from mailtower.goc.sync.goc import ensure_goc

pytestmark = pytest.mark.integration

TOWERS = ("lab-a", "lab-b")
STATUS_PASSWORD = "status-password-0123456789"
PORTAL_PASSWORD = "portal-password-0123456789"


@pytest.fixture
def goc() -> Iterator[pgclusters.Cluster]:
    if not Path(pgclusters.PG_BIN / "initdb").exists():
        missing("PostgreSQL 15 (package postgresql-15)")
    workdir = pgclusters.make_workdir("mailtower-qaportal-")
    cluster = pgclusters.Cluster.create("goc", workdir)
    try:
        yield cluster
    finally:
        cluster.destroy()
        shutil.rmtree(workdir, ignore_errors=True)


def side(goc: pgclusters.Cluster, towers: tuple[str, ...] = TOWERS) -> deployed.GocSide:
    # The towers' SQL hosts answer nothing: their subscriptions wait (reported skipped).
    return deployed.GocSide(
        dsn=goc.dsn(),
        eye_password="eye-password-0123456",
        towers=[
            deployed.GocTower(
                name=t,
                hosts=["127.0.0.1:1"],
                sync_password=f"{t}-sync-password-0123",
                goc_sync_password=f"{t}-goc-sync-password-0123",
                status_password=STATUS_PASSWORD,
            )
            for t in towers
        ],
    )


def portal_schema(goc: pgclusters.Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """The deploy's step, as roles/goc.py runs it (the password on standard input)."""
    monkeypatch.setattr("sys.stdin", io.StringIO(PORTAL_PASSWORD + "\n"))
    assert main(["portal", "--dsn", goc.dsn(), "schema", "--role-password-stdin"]) == 0


def catalog(goc: pgclusters.Cluster) -> list[Any]:
    """quarantine_actions' policies, row-level security and privileges, to compare runs."""
    with goc.connect() as conn:
        policies = conn.execute(
            "SELECT policyname, roles::text[], cmd, qual, with_check FROM pg_policies"
            " WHERE tablename = 'quarantine_actions' ORDER BY 1"
        ).fetchall()
        acl = conn.execute(
            "SELECT relacl::text[], relrowsecurity FROM pg_class"
            " WHERE oid = 'public.quarantine_actions'::regclass"
        ).fetchone()
        columns = conn.execute(
            "SELECT attname, attacl::text[] FROM pg_attribute WHERE attrelid ="
            " 'public.quarantine_actions'::regclass AND attacl IS NOT NULL ORDER BY 1"
        ).fetchall()
    return [policies, acl, columns]


def request(conn: psycopg.Connection[Any], tower: str) -> uuid.UUID:
    request_id = uuid.uuid4()
    conn.execute(
        "INSERT INTO quarantine_actions (request_id, event_id, tower, quarantine_id, action,"
        " requested_by) VALUES (%s, %s, %s, 'q1', 'release', 'admin:a')",
        (request_id, uuid.uuid4(), tower),
    )
    return request_id


@pytest.mark.parametrize("order", ["sync-first", "portal-first"])
def test_both_steps_converge_in_one_run_whatever_the_order(
    goc: pgclusters.Cluster, monkeypatch: pytest.MonkeyPatch, order: str
) -> None:
    if order == "sync-first":  # roles/goc.py's order
        deployed.goc_apply(side(goc))
        portal_schema(goc, monkeypatch)
    else:  # `mailtower portal schema` by hand on a GOC made before quarantine_actions
        ensure_goc(goc.dsn(), sync_password="sync-password-0123456789")
        portal_schema(goc, monkeypatch)
        deployed.goc_apply(side(goc))
    assert deployed.goc_pending(side(goc)) == []
    with goc.connect() as conn:
        assert quarantine_actions.portal_pending(conn) == []
    names = [p[0] for p in catalog(goc)[0]]
    assert "mt_portal_all" in names and f"own_select_{status_role('lab-a')}" in names
    # A second run of both changes nothing.
    before = catalog(goc)
    assert deployed.goc_apply(side(goc)).changes.actions == []
    portal_schema(goc, monkeypatch)
    assert catalog(goc) == before

    # The portal asks for any tower's message and reads them all; it changes none.
    with psycopg.connect(goc.conninfo("mt_portal", PORTAL_PASSWORD), autocommit=True) as conn:
        mine, theirs = request(conn, "lab-a"), request(conn, "lab-b")
        seen = {r for (r,) in conn.execute("SELECT request_id FROM quarantine_actions")}
        assert seen == {mine, theirs}
        for statement in (
            "UPDATE quarantine_actions SET result = 'released', done_at = now()",
            "DELETE FROM quarantine_actions",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
    # A tower sees only its own, the portal's policy notwithstanding.
    info = goc.conninfo(status_role("lab-a"), STATUS_PASSWORD)
    with psycopg.connect(info, autocommit=True) as conn:
        seen = {r for (r,) in conn.execute("SELECT request_id FROM quarantine_actions")}
        assert seen == {mine}


def test_the_towers_policies_never_drop_the_portals(
    goc: pgclusters.Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployed.goc_apply(side(goc))
    portal_schema(goc, monkeypatch)
    # A tower leaves: its policies go, the portal's stays.
    assert any(status_role("lab-b") in p for p in deployed.goc_pending(side(goc, ("lab-a",))))
    deployed.goc_apply(side(goc, ("lab-a",)))
    names = [p[0] for p in catalog(goc)[0]]
    assert "mt_portal_all" in names
    assert not any(status_role("lab-b") in n for n in names)
    # The portal's policy or grants lost by hand: the sync's check sees it, its apply puts
    # them back (a redeploy runs the sync step when its check is not empty).
    with goc.connect() as conn:
        conn.execute("DROP POLICY mt_portal_all ON quarantine_actions")
        conn.execute("GRANT DELETE ON quarantine_actions TO mt_portal")
    assert deployed.goc_pending(side(goc, ("lab-a",))) == [
        "create policy mt_portal_all on quarantine_actions for mt_portal",
        "revoke DELETE on quarantine_actions from mt_portal",
    ]
    deployed.goc_apply(side(goc, ("lab-a",)))
    assert deployed.goc_pending(side(goc, ("lab-a",))) == []
