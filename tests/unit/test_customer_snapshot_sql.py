"""The scanners' policy snapshot against a real PostgreSQL with the tower's schema: the
change check sees every change whatever order transactions commit in, and the load query
gives each customer's policy as stored."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pgclusters  # tests/ is on sys.path (rootdir conftest)
import psycopg
import pytest
from needs import missing

from mailtower.customers import snapshot

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "templates/sql/etc/mailtower/sql/schema.sql.j2"
TOWER_ROLES = ("mailtower_relay", "mailtower_scanner", "mailtower_monitor")


@pytest.fixture(scope="module")
def cluster() -> Iterator[pgclusters.Cluster]:
    if not Path(pgclusters.PG_BIN / "initdb").exists():
        missing("PostgreSQL 15 (package postgresql-15)", module=True)
    workdir = pgclusters.make_workdir("mailtower-snapshot-")
    made = pgclusters.Cluster.create("snapshot", workdir)
    try:
        with made.connect() as conn:
            for role in TOWER_ROLES:
                conn.execute(f"CREATE ROLE {role} LOGIN")
            conn.execute(SCHEMA.read_text().encode())
            for name in ("alpha", "beta"):
                conn.execute("INSERT INTO customers (name) VALUES (%s)", (name,))
                conn.execute(
                    "INSERT INTO domains (name, customer_id)"
                    " SELECT %s, id FROM customers WHERE name = %s",
                    (f"{name}.example", name),
                )
                conn.execute(
                    "INSERT INTO policies (customer_id) SELECT id FROM customers WHERE name = %s",
                    (name,),
                )
        yield made
    finally:
        made.destroy()
        shutil.rmtree(workdir, ignore_errors=True)


def _set(conn: psycopg.Connection, customer: str, policy: str) -> None:
    """As the GOC's command writes a policy (replicated with the GOC's updated_at)."""
    conn.execute(
        "UPDATE policies SET policy = %s::jsonb, updated_at = now()"
        " WHERE customer_id = (SELECT id FROM customers WHERE name = %s)",
        (policy, customer),
    )


def test_a_change_committed_after_a_later_one_is_still_seen(cluster) -> None:
    """T1 begins (its updated_at is its start), T2 begins later and commits first, the poller
    loads; then T1 commits. A "latest updated_at" check would say nothing changed."""
    reader = cluster.connect()
    t1, t2 = cluster.connect(), cluster.connect()
    t1.autocommit = t2.autocommit = False
    try:
        t1.execute("SELECT now()")  # T1's start: its updated_at
        _set(t1, "alpha", '{"ban_extensions": ["zip"]}')
        t2.execute("SELECT pg_sleep(0.05)")
        _set(t2, "beta", '{"ban_extensions": ["rar"]}')
        t2.commit()
        seen = snapshot.change_check(reader)
        first = snapshot.load(reader, None, check=seen)
        assert first.policies["beta"].ban_extensions == ("rar",)
        assert first.policies["alpha"].ban_extensions == ()
        t1.commit()
        later = snapshot.change_check(reader)
        assert later != seen
        second = snapshot.load(reader, first, check=later)
        assert second.policies["alpha"].ban_extensions == ("zip",)
        assert snapshot.change_check(reader) == later  # nothing more: the same answer
    finally:
        for conn in (reader, t1, t2):
            conn.close()


def test_a_renamed_customer_and_a_deactivated_domain_are_changes(cluster) -> None:
    with cluster.connect() as conn:
        before = snapshot.change_check(conn)
        conn.execute("UPDATE customers SET name = 'gamma' WHERE name = 'beta'")
        renamed = snapshot.change_check(conn)
        assert renamed != before
        assert snapshot.load(conn, None).domains["beta.example"] == "gamma"
        conn.execute("UPDATE domains SET active = false WHERE name = 'beta.example'")
        assert snapshot.change_check(conn) != renamed
        assert "beta.example" not in snapshot.load(conn, None).domains
