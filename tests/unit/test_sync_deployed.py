"""``mailtower sync tower|goc`` as the roles run it: the check lists exactly what the apply
does, a second apply changes nothing, a tower not deployed yet is reported and skipped, and
after a promotion the GOC follows the new primary. Real PostgreSQL 15 clusters."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from pgclusters import wait_until
from synclab import (
    GOC_SYNC_PASSWORD,
    TOWER_SYNC_PASSWORD,
    SyncLab,
    add_customer,
    flush_events,
    make_events,
    route_of,
)

from mailtower.cli import main as mailtower
from mailtower.goc.eye.status import TowerStatus, status_role, upsert_tower_status
from mailtower.goc.sync import deployed, event_count, names

pytestmark = pytest.mark.integration

TOWER = "tower-a"
OTHER = "tower-b"
STATUS_PASSWORD = "status-password-0123"


@pytest.fixture(scope="module")
def lab() -> Iterator[SyncLab]:
    lab = SyncLab.create([TOWER], standby_for=[TOWER], wal_retrieve_retry_interval="1s")
    try:
        yield lab
    finally:
        lab.destroy()


def _goc_side(lab: SyncLab) -> deployed.GocSide:
    tower = lab.towers[TOWER]
    assert tower.standby is not None
    return deployed.GocSide(
        dsn=lab.goc.dsn(),
        eye_password="eye-password-0123456",
        towers=[
            deployed.GocTower(
                name=TOWER,
                hosts=[f"127.0.0.1:{tower.primary.port}", f"127.0.0.1:{tower.standby.port}"],
                sync_password=TOWER_SYNC_PASSWORD,
                goc_sync_password=GOC_SYNC_PASSWORD,
                status_password=STATUS_PASSWORD,
            ),
            # Deployed at the GOC, never at a tower here: its roles and row policy still exist.
            deployed.GocTower(
                name=OTHER,
                hosts=["127.0.0.1:1"],
                sync_password="other-sync-password-0123",
                goc_sync_password="other-goc-sync-password-0123",
                status_password="other-status-password-0123",
            ),
        ],
    )


def _tower_side(lab: SyncLab, primary: bool = True) -> deployed.TowerSide:
    tower = lab.towers[TOWER]
    cluster = tower.primary if primary else tower.standby
    assert cluster is not None
    return deployed.TowerSide(
        tower=TOWER,
        dsn=cluster.dsn(),
        # The tower's own role at the GOC (what roles/sql.py writes)
        goc_conninfo=lab.goc.conninfo(names.goc_sync_role(TOWER), GOC_SYNC_PASSWORD),
        sync_password=TOWER_SYNC_PASSWORD,
    )


def test_the_whole_sync_from_the_deploy_commands(lab: SyncLab, tmp_path: Path) -> None:
    goc, tower = _goc_side(lab), _tower_side(lab)
    # The GOC first: its objects; the tower has no sync role yet, so it is skipped.
    assert deployed.goc_pending(goc)
    first = deployed.goc_apply(goc)
    assert first.changes.changed and not first.followed
    assert "no primary reachable as mt_sync" in first.skipped[TOWER]
    assert set(first.skipped) == {TOWER, OTHER}
    add_customer(lab.goc, "deployed.example")
    # The tower: pending until applied; the standby has nothing to do.
    assert deployed.tower_pending(tower)
    assert deployed.tower_pending(_tower_side(lab, primary=False)) == []
    assert deployed.tower_apply(tower).changed
    assert deployed.tower_pending(tower) == []
    # The GOC again: now it follows the tower's primary, found among both hosts.
    assert deployed.goc_pending(goc) == [
        f"subscribe {names.events_subscription(TOWER)} to "
        f"127.0.0.1:{lab.towers[TOWER].primary.port}"
    ]
    second = deployed.goc_apply(goc)
    assert second.skipped.keys() == {OTHER}
    assert second.followed == {TOWER: f"127.0.0.1:{lab.towers[TOWER].primary.port}"}
    assert deployed.goc_pending(goc) == []
    assert not deployed.goc_apply(goc).changes.changed
    assert not deployed.tower_apply(tower).changed
    # A GOC made before rule bundles: its tower_status lacks their columns until the next apply.
    added = ["rules_bundle", "rules_target", "scanners_behind"]
    with lab.goc.connect() as conn:
        conn.execute("ALTER TABLE tower_status " + ", ".join(f"DROP COLUMN {c}" for c in added))
    assert deployed.goc_pending(goc) == [f"add column tower_status.{c}" for c in added]
    migrated = deployed.goc_apply(goc)
    assert migrated.changes.actions == [f"added tower_status columns {', '.join(added)}"]
    assert deployed.goc_pending(goc) == []
    # A GOC made before VirusEye kept logouts: the table and mt_eye's grants come with an apply.
    with lab.goc.connect() as conn:
        conn.execute("DROP TABLE eye_revoked_sessions")
    assert deployed.goc_pending(goc) == ["create table eye_revoked_sessions"]
    granted = deployed.goc_apply(goc)
    assert granted.changes.actions == [
        f"granted {p} on eye_revoked_sessions to mt_eye" for p in ("SELECT", "INSERT", "DELETE")
    ]
    with lab.goc.connect() as conn:
        conn.execute("REVOKE DELETE ON eye_revoked_sessions FROM mt_eye")
    assert deployed.goc_pending(goc) == ["grant DELETE on eye_revoked_sessions to mt_eye"]
    deployed.goc_apply(goc)
    assert deployed.goc_pending(goc) == []
    # Config down, events up.
    primary = lab.towers[TOWER].primary
    wait_until(lambda: route_of(primary, "deployed.example") is not None, 30, "config at tower")
    flush_events(lab.towers[TOWER], make_events(TOWER, 50))
    wait_until(lambda: event_count(lab.goc.dsn(), TOWER) == 50, 30, "events at the GOC")


def _status_row(lab: SyncLab, role: str, password: str, tower: str) -> None:
    with psycopg.connect(lab.goc.conninfo(role, password), autocommit=True) as conn:
        upsert_tower_status(conn, TowerStatus(tower, 1, 1, 0, None))


def test_each_towers_monitor_writes_only_its_own_status_row(lab: SyncLab) -> None:
    goc = _goc_side(lab)
    _status_row(lab, status_role(TOWER), STATUS_PASSWORD, TOWER)
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
        _status_row(lab, status_role(TOWER), STATUS_PASSWORD, OTHER)
    _status_row(lab, status_role(OTHER), "other-status-password-0123", OTHER)
    # Nor can it change the other tower's row by updating its own into it.
    with psycopg.connect(lab.goc.conninfo(status_role(TOWER), STATUS_PASSWORD)) as conn:
        updated = conn.execute("UPDATE tower_status SET queue_size = 99").rowcount
        assert updated == 1
    with psycopg.connect(lab.goc.conninfo("mt_eye", goc.eye_password)) as conn:
        rows = conn.execute("SELECT tower, queue_size FROM tower_status ORDER BY 1").fetchall()
    assert rows == [(TOWER, 99), (OTHER, 0)]


def test_the_shared_roles_of_an_older_goc_are_retired(lab: SyncLab) -> None:
    goc = _goc_side(lab)
    with lab.goc.connect() as conn:
        conn.execute("CREATE ROLE mt_status LOGIN PASSWORD 'shared-status-password-0123'")
        conn.execute("ALTER ROLE mt_sync LOGIN") if lab.goc.scalar(
            "SELECT 1 FROM pg_roles WHERE rolname = 'mt_sync'"
        ) else conn.execute("CREATE ROLE mt_sync LOGIN REPLICATION PASSWORD 'shared-0123456789'")
    assert deployed.goc_pending(goc) == [
        f"retire role {r} (each tower has its own)" for r in ("mt_status", "mt_sync")
    ]
    deployed.goc_apply(goc)
    assert deployed.goc_pending(goc) == []
    assert (
        lab.goc.scalar(
            "SELECT count(*) FROM pg_roles"
            " WHERE rolname IN ('mt_sync', 'mt_status') AND rolcanlogin"
        )
        == 0
    )


def test_cli_check_and_apply_exit_codes(lab: SyncLab, tmp_path: Path, capsys) -> None:
    config = tmp_path / "tower.json"
    config.write_text(_tower_side(lab).model_dump_json())
    assert mailtower(["sync", "tower", "--config", str(config), "--check"]) == 0
    assert mailtower(["sync", "tower", "--config", str(config)]) == 0
    assert "no change" in capsys.readouterr().out
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"tower": TOWER}))
    assert mailtower(["sync", "tower", "--config", str(broken), "--check"]) == 1
    assert "invalid sync settings" in capsys.readouterr().err
    assert mailtower(["sync", "goc", "--config", str(tmp_path / "missing.json")]) == 1
    assert "not found; deploy the host first" in capsys.readouterr().err


def test_after_a_promotion_the_deploy_commands_follow_the_new_primary(lab: SyncLab) -> None:
    tower = lab.towers[TOWER]
    assert tower.standby is not None
    flush_events(tower, make_events(TOWER, 30))
    wait_until(lambda: event_count(lab.goc.dsn(), TOWER) == 80, 30, "events before")
    tower.primary.stop()
    tower.standby.promote()
    wait_until(lambda: not tower.standby.in_recovery(), 30, "promotion")
    promoted = _tower_side(lab, primary=False)
    assert any("timeline" in line for line in deployed.tower_pending(promoted))
    deployed.tower_apply(promoted)
    assert deployed.tower_pending(promoted) == []
    goc = _goc_side(lab)
    assert any("re-point" in line for line in deployed.goc_pending(goc))
    report = deployed.goc_apply(goc)
    assert report.followed == {TOWER: f"127.0.0.1:{tower.standby.port}"}
    assert deployed.goc_pending(goc) == []
    flush_events(tower, make_events(TOWER, 20))
    wait_until(lambda: event_count(lab.goc.dsn(), TOWER) == 100, 30, "events after")


def test_a_goc_without_towers_never_touches_the_shared_sync_role() -> None:
    """``towers: []``: a fresh GOC deploys (no shared mt_sync asked for), and an upgraded one
    keeps its retired mt_sync retired, apply after apply."""
    alone = SyncLab.create([])
    try:
        side = deployed.GocSide(dsn=alone.goc.dsn(), eye_password="eye-password-0123456")
        assert deployed.goc_apply(side).changes.changed
        assert alone.goc.scalar("SELECT count(*) FROM pg_roles WHERE rolname = 'mt_sync'") == 0
        assert deployed.goc_pending(side) == []
        assert not deployed.goc_apply(side).changes.changed
        with alone.goc.connect() as conn:  # what an older GOC's deploy retired
            conn.execute("CREATE ROLE mt_sync NOLOGIN NOREPLICATION PASSWORD 'shared-0123456789'")
        again = deployed.goc_apply(side)
        assert not again.changes.changed, again.changes
        assert (
            alone.goc.scalar(
                "SELECT rolcanlogin OR rolreplication FROM pg_roles WHERE rolname = 'mt_sync'"
            )
            is False
        )
    finally:
        alone.destroy()
