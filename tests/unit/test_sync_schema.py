"""The GOC's schema against the tower's real template, and the ensure steps' idempotence and
refusals, on real PostgreSQL 15 clusters."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pgclusters import Cluster
from synclab import GOC_SYNC_PASSWORD, TOWER_SYNC_PASSWORD, SyncLab, apply_tower_schema

from mailtower.goc.sync import (
    NotPrimary,
    RepointNeeded,
    SchemaMissing,
    WalLevelNotLogical,
    ensure_goc,
    ensure_goc_subscription,
    ensure_tower,
    names,
)
from mailtower.goc.sync.schema import GOC_ONLY_COLUMNS

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
    assert [c for c in goc_cols if c[0] not in extra] == tower_cols
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
