"""The SQL pair: primary streaming to a hot standby, schema, scram, tower-only access."""

from __future__ import annotations

import subprocess

GROUP = "sql"


def test_postgresql_running(node):
    svc = node.service("postgresql@15-main")
    assert svc.is_running and svc.is_enabled


def test_roles(tower, node, node_name):
    recovery = tower.psql("SELECT pg_is_in_recovery()", host=node)
    is_primary = node_name == tower.hosts("sql")[0].name
    assert recovery == ("f" if is_primary else "t")


def test_primary_streams_to_standby(tower):
    rows = tower.psql("SELECT client_addr, state FROM pg_stat_replication")
    standby = str(tower.settings.sql_standby)
    assert f"{standby}|streaming" in rows.splitlines()


def test_schema_and_customers_replicated(tower, node):
    tables = set(
        tower.psql("SELECT tablename FROM pg_tables WHERE schemaname = 'public'", host=node).split()
    )
    assert {"customers", "domains", "routes", "policies", "verdict_events"} <= tables
    domains = set(tower.psql("SELECT name FROM domains WHERE active", host=node).split())
    assert {c.domain for c in tower.settings.customers} <= domains


def test_password_encryption_is_scram(tower, node):
    assert tower.psql("SHOW password_encryption", host=node) == "scram-sha-256"


def test_hosts_outside_the_tower_are_refused(tower, node_name):
    """pg_hba admits only the tower's hosts: the controller is not one of them."""
    s = tower.settings
    done = subprocess.run(
        [
            "psql",
            f"host={tower.entry(node_name).address} port={s.ports.postgres} "
            f"dbname={s.sql_database} user=mailtower_relay password={s.secrets.sql_relay} "
            "connect_timeout=5",
            "-c",
            "SELECT 1",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert "no pg_hba.conf entry" in done.stderr
