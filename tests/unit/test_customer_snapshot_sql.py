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
    """Replication applies transactions in commit order, and ``updated_at`` is a transaction's
    start: a change can arrive with an older ``updated_at`` than one already seen. Here beta's
    (updated_at an hour ahead) is loaded first, then alpha's arrives, older."""
    with cluster.connect() as conn:
        conn.execute(
            'UPDATE policies SET policy = \'{"ban_extensions": ["rar"]}\','
            " updated_at = now() + interval '1 hour'"
            " WHERE customer_id = (SELECT id FROM customers WHERE name = 'beta')"
        )
        seen = snapshot.change_check(conn)
        first = snapshot.load(conn, None, check=seen)
        assert first.policies["beta"].ban_extensions == ("rar",)
        _set(conn, "alpha", '{"ban_extensions": ["zip"]}')
        later = snapshot.change_check(conn)
        assert later != seen
        second = snapshot.load(conn, first, check=later)
        assert second.policies["alpha"].ban_extensions == ("zip",)
        assert snapshot.change_check(conn) == later  # nothing more: the same answer


def test_an_uncommitted_change_is_seen_once_committed(cluster) -> None:
    reader, writer = cluster.connect(), cluster.connect()
    writer.autocommit = False
    try:
        before = snapshot.change_check(reader)
        _set(writer, "alpha", '{"ban_extensions": ["7z"]}')
        assert snapshot.change_check(reader) == before  # not visible yet: nothing to load
        writer.commit()
        after = snapshot.change_check(reader)
        assert after != before
        assert snapshot.load(reader, None).policies["alpha"].ban_extensions == ("7z",)
    finally:
        reader.close()
        writer.close()


def test_a_renamed_customer_and_a_deactivated_domain_are_changes(cluster) -> None:
    with cluster.connect() as conn:
        before = snapshot.change_check(conn)
        conn.execute("UPDATE customers SET name = 'gamma' WHERE name = 'beta'")
        renamed = snapshot.change_check(conn)
        assert renamed != before
        assert snapshot.load(conn, None).domains["beta.example"] == "gamma"
        conn.execute("UPDATE domains SET active = false WHERE name = 'beta.example'")
        deactivated = snapshot.change_check(conn)
        assert deactivated != renamed
        assert "beta.example" not in snapshot.load(conn, None).domains
        conn.execute("TRUNCATE policies")  # no row trigger: the file node tells
        assert snapshot.change_check(conn) != deactivated


def test_a_change_applied_as_the_replication_worker_applies_it_is_seen(cluster) -> None:
    """The GOC's changes arrive through an apply worker (session_replication_role = replica),
    where only ALWAYS triggers fire."""
    with cluster.connect() as conn:
        before = snapshot.change_check(conn)
        conn.execute("SET session_replication_role = replica")
        conn.execute("UPDATE customers SET name = name || '' WHERE name = 'alpha'")
        conn.execute("RESET session_replication_role")
        assert snapshot.change_check(conn) != before
