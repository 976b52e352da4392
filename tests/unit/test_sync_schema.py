"""The GOC's schema against the tower's real template, and the ensure steps' idempotence and
refusals, on real PostgreSQL 15 clusters."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pgclusters import Cluster, wait_until
from synclab import (
    GOC_SYNC_PASSWORD,
    TOWER_SCHEMA,
    TOWER_SYNC_PASSWORD,
    SyncLab,
    apply_tower_schema,
)

from mailtower.goc.sync import (
    NotPrimary,
    RepointNeeded,
    SchemaMissing,
    WalLevelNotLogical,
    config_digest,
    ensure_goc,
    ensure_goc_subscription,
    ensure_tower,
    names,
    wait_ready,
)
from mailtower.goc.sync.deployed import TowerSide, tower_pending
from mailtower.goc.sync.goc import schema_pending
from mailtower.goc.sync.schema import GOC_ONLY_COLUMNS, TOWER_ONLY_COLUMNS

pytestmark = pytest.mark.integration

A, B = "tower-a", "tower-b"
SHAPE = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
       coalesce(pg_get_expr(d.adbin, d.adrelid), '')
FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum
"""
CONSTRAINTS = """
SELECT contype, pg_get_constraintdef(oid) FROM pg_constraint
WHERE conrelid = %s::regclass ORDER BY contype, pg_get_constraintdef(oid)
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[SyncLab]:
    lab = SyncLab.create([A, B], wal_retrieve_retry_interval="1s")
    try:
        yield lab
    finally:
        lab.destroy()


Rows = list[tuple[object, ...]]


def shape(cluster: Cluster, table: str) -> tuple[Rows, Rows]:
    """Columns (name, type, not null, default) and constraints, as the server reports them."""
    with cluster.connect() as conn:
        cols = [tuple(r) for r in conn.execute(SHAPE, (f"public.{table}",)).fetchall()]
        cons = [tuple(r) for r in conn.execute(CONSTRAINTS, (f"public.{table}",)).fetchall()]
    return cols, cons


def test_ensure_goc_creates_then_changes_nothing(lab: SyncLab) -> None:
    first = ensure_goc(lab.goc.dsn(), sync_password=GOC_SYNC_PASSWORD)
    assert "created table verdict_events" in first.actions
    assert "created publication mt_config" in " ".join(first.actions)
    second = ensure_goc(lab.goc.dsn(), sync_password=GOC_SYNC_PASSWORD)
    assert not second.changed, second
    assert str(second) == "goc: no change"


@pytest.mark.parametrize("table", [*names.CONFIG_TABLES, names.EVENTS_TABLE])
def test_goc_tables_have_the_tower_shape(lab: SyncLab, table: str) -> None:
    ensure_goc(lab.goc.dsn(), sync_password=GOC_SYNC_PASSWORD)
    tower_cols, tower_cons = shape(lab.towers[A].primary, table)
    goc_cols, goc_cons = shape(lab.goc, table)
    extra = GOC_ONLY_COLUMNS.get(table, ())
    own = TOWER_ONLY_COLUMNS.get(table, ())
    assert [c for c in goc_cols if c[0] not in extra] == [c for c in tower_cols if c[0] not in own]
    # The tower's own columns must not need a value from replication (defaults fill them).
    assert all(c[3] for c in tower_cols if c[0] in own)
    assert goc_cons == tower_cons


def test_ensure_tower_and_subscription_create_then_change_nothing(lab: SyncLab) -> None:
    ensure_goc(lab.goc.dsn(), sync_password=GOC_SYNC_PASSWORD)
    for tower in lab.towers.values():
        first = ensure_tower(
            tower.primary.dsn(), lab.goc_conninfo(), tower.name, sync_password=TOWER_SYNC_PASSWORD
        )
        assert any("created subscription mt_config_" in a for a in first.actions)
        sub = ensure_goc_subscription(lab.goc.dsn(), tower.name, tower.conninfo())
        assert sub.changed
    for tower in lab.towers.values():
        again = ensure_tower(
            tower.primary.dsn(), lab.goc_conninfo(), tower.name, sync_password=TOWER_SYNC_PASSWORD
        )
        assert not again.changed, again
        assert not ensure_goc_subscription(lab.goc.dsn(), tower.name, tower.conninfo()).changed


def test_subscription_pointed_elsewhere_needs_a_repoint(lab: SyncLab) -> None:
    ensure_goc(lab.goc.dsn(), sync_password=GOC_SYNC_PASSWORD)
    for tower in lab.towers.values():
        ensure_tower(
            tower.primary.dsn(), lab.goc_conninfo(), tower.name, sync_password=TOWER_SYNC_PASSWORD
        )
        ensure_goc_subscription(lab.goc.dsn(), tower.name, tower.conninfo())
    # tower-a's subscription asked to follow tower-b's server: never silently re-pointed
    with pytest.raises(RepointNeeded, match="repoint_after_failover"):
        ensure_goc_subscription(lab.goc.dsn(), A, lab.towers[B].conninfo())


def test_tower_without_schema_is_refused(lab: SyncLab) -> None:
    with lab.towers[A].primary.connect("postgres") as conn:
        conn.execute("CREATE DATABASE empty")
    dsn = lab.towers[A].primary.dsn("empty")
    with pytest.raises(SchemaMissing, match="apply the tower schema"):
        ensure_tower(dsn, lab.goc_conninfo(), A, sync_password=TOWER_SYNC_PASSWORD)


def test_standby_and_wal_level_are_refused(lab: SyncLab) -> None:
    replica = Cluster.create("replica-wal", lab.workdir, wal_level="replica")
    try:
        apply_tower_schema(replica)
        with pytest.raises(WalLevelNotLogical, match="wal_level = logical"):
            ensure_tower(replica.dsn(), lab.goc_conninfo(), A, sync_password=TOWER_SYNC_PASSWORD)
        standby = replica.standby("replica-wal-standby", lab.workdir)
        try:
            with pytest.raises(NotPrimary, match="standby"):
                ensure_goc(standby.dsn(), sync_password=GOC_SYNC_PASSWORD)
        finally:
            standby.destroy()
    finally:
        replica.destroy()


OLD_POLICIES = """
ALTER TABLE policies DROP COLUMN policy,
    ADD COLUMN banned_extensions text[],
    ADD COLUMN max_message_bytes integer,
    ADD COLUMN encrypted_archives text CHECK (encrypted_archives IN ('quarantine', 'pass'))
"""


def test_an_old_shape_goc_and_tower_converge() -> None:
    """A GOC and a tower made before ``policies.policy`` and ``recipients``, subscribed and
    holding data, take the new shape: the GOC by ensure_goc, the tower by its schema template
    and ensure_tower, whose subscription is refreshed so the new table is copied."""
    old = SyncLab.create([A], wal_retrieve_retry_interval="1s")
    try:
        goc, tower = old.goc, old.towers[A]
        ensure_goc(goc.dsn(), sync_password=GOC_SYNC_PASSWORD)
        with goc.connect() as conn:  # what an older ensure_goc made
            conn.execute("ALTER PUBLICATION mt_config DROP TABLE recipients")
            conn.execute("DROP TABLE recipients")
            conn.execute(OLD_POLICIES)
            conn.execute("INSERT INTO customers (name) VALUES ('old.example')")
            conn.execute("INSERT INTO domains (name, customer_id) VALUES ('old.example', 1)")
            conn.execute("INSERT INTO policies (customer_id, banned_extensions) VALUES (1, '{x}')")
        with tower.primary.connect() as conn:
            conn.execute(OLD_POLICIES)
        ensure_tower(tower.primary.dsn(), old.goc_conninfo(), A, sync_password=TOWER_SYNC_PASSWORD)
        wait_ready(tower.primary.dsn(), names.config_subscription(A), timeout_s=30)
        with tower.primary.connect() as conn:  # the older tower template had no recipients
            conn.execute("DROP TABLE recipients")
        assert tower.primary.scalar("SELECT banned_extensions FROM policies") == ["x"]

        # The upgrade: the GOC first (deploys/goc.py), then the tower's schema and sync.
        first = ensure_goc(goc.dsn(), sync_password=GOC_SYNC_PASSWORD)
        assert {
            "dropped column policies.banned_extensions",
            "dropped column policies.encrypted_archives",
            "added column policies.policy",
            "created table recipients",
            "created index recipients_domain",
        } <= set(first.actions), first
        assert not ensure_goc(goc.dsn(), sync_password=GOC_SYNC_PASSWORD).changed
        with goc.connect() as conn:
            assert not schema_pending(conn)
            conn.execute("""UPDATE policies SET policy = '{"suspicious": "deliver"}'""")
            conn.execute("INSERT INTO recipients VALUES ('a@old.example', 'old.example')")
        for _ in range(2):  # the template is applied again whenever it changes
            with tower.primary.connect() as conn:
                conn.execute(TOWER_SCHEMA.read_text())
        side = TowerSide(
            tower=A,
            dsn=tower.primary.dsn(),
            goc_conninfo=old.goc_conninfo(),
            sync_password=TOWER_SYNC_PASSWORD,
        )
        assert tower_pending(side) == [
            f"refresh subscription {names.config_subscription(A)} (to copy recipients)"
        ]
        again = ensure_tower(
            tower.primary.dsn(), old.goc_conninfo(), A, sync_password=TOWER_SYNC_PASSWORD
        )
        assert any("refreshed subscription" in a for a in again.actions), again
        assert not ensure_tower(
            tower.primary.dsn(), old.goc_conninfo(), A, sync_password=TOWER_SYNC_PASSWORD
        ).changed
        assert tower_pending(side) == []
        wait_until(
            lambda: config_digest(tower.primary.dsn()) == config_digest(goc.dsn()),
            30,
            "the tower to take the GOC's policies and recipients",
        )
        assert tower.primary.scalar("SELECT address FROM recipients") == "a@old.example"
        assert tower.primary.scalar("SELECT policy->>'suspicious' FROM policies") == "deliver"
        for table in ("policies", "recipients"):
            goc_cols, goc_cons = shape(goc, table)
            tower_cols, tower_cons = shape(tower.primary, table)
            own = TOWER_ONLY_COLUMNS.get(table, ())
            assert sorted(goc_cols) == sorted(c for c in tower_cols if c[0] not in own)
            assert goc_cons == tower_cons
        # Later changes to the new table flow as to the others.
        with goc.connect() as conn:
            conn.execute("DELETE FROM recipients")
        wait_until(
            lambda: tower.primary.scalar("SELECT count(*) FROM recipients") == 0,
            30,
            "the delete to reach the tower",
        )
    finally:
        old.destroy()
