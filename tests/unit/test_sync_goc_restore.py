"""The GOC restored from a backup taken before events and a customer reached it: what
``mailtower sync goc --after-restore`` and ``mailtower sync tower`` re-make. Real PostgreSQL
15 clusters; the backup is a copy of the stopped GOC's data directory without the contents of
pg_replslot (pgBackRest leaves them out too). (Real pgBackRest: test_backup_pgbackrest.py;
the lab: tests/pair/test_96_goc_backup.py.)"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

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

from mailtower.goc.sync import config_digest, ensure_goc, ensure_tower, names, wait_caught_up
from mailtower.goc.sync.failover import RESTORED, repoint_events

pytestmark = pytest.mark.integration

TOWER = "tower-a"


@pytest.fixture(scope="module")
def lab() -> Iterator[SyncLab]:
    lab = SyncLab.create([TOWER], wal_retrieve_retry_interval="1s")
    try:
        ensure_goc(lab.goc.dsn(), sync_password=GOC_SYNC_PASSWORD)
        add_customer(lab.goc, "before.example")
        lab.ensure_all()
        yield lab
    finally:
        lab.destroy()


def goc_event_ids(lab: SyncLab) -> list[str]:
    with lab.goc.connect() as conn:
        rows = conn.execute("SELECT event_id::text FROM verdict_events WHERE tower = %s", (TOWER,))
        return [r[0] for r in rows.fetchall()]


def test_restored_goc_gets_the_lost_events_and_the_tower_its_configuration(lab: SyncLab) -> None:
    tower = lab.towers[TOWER]
    sent: set[str] = set()
    batch = make_events(TOWER, 100)
    flush_events(tower, batch)
    sent |= {e.event_id for e in batch}
    wait_until(lambda: len(goc_event_ids(lab)) == 100, 30, "the first 100 events at the GOC")

    # 1. the backup
    saved = lab.workdir / "goc-backup"
    lab.goc.stop()
    subprocess.run(["cp", "-a", str(lab.goc.data), str(saved)], check=True)
    for slot in (saved / "pg_replslot").iterdir():
        shutil.rmtree(slot)
    lab.goc.start()

    # 2. after it: events and a customer reach the GOC (and the tower), then the GOC is lost
    batch = make_events(TOWER, 150)
    flush_events(tower, batch)
    sent |= {e.event_id for e in batch}
    wait_until(lambda: len(goc_event_ids(lab)) == 250, 30, "250 events at the GOC")
    add_customer(lab.goc, "lost.example")
    wait_until(lambda: route_of(tower.primary, "lost.example") is not None, 30, "lost.example")
    wait_caught_up(tower.primary.dsn(), names.events_slot(TOWER, 1), timeout_s=30)
    lab.goc.stop()

    # 3. the restore: the GOC as the backup left it
    shutil.rmtree(lab.goc.data)
    subprocess.run(["cp", "-a", str(saved), str(lab.goc.data)], check=True)
    lab.goc.start()
    assert len(goc_event_ids(lab)) == 100
    assert lab.goc.scalar("SELECT count(*) FROM pg_replication_slots") == 0

    # 4. the GOC's side: the events subscription and slot made anew, the 150 lost copied
    changes, reconciled = repoint_events(lab.goc.dsn(), TOWER, tower.conninfo(), restored=True)
    assert reconciled is not None and reconciled.copied == 150, changes
    assert any(RESTORED in a for a in changes.actions)
    # 5. the tower's side: its config slot at the GOC is gone; the GOC's configuration is
    #    loaded again (lost.example was the lost GOC's only) and subscribed from there
    tower_changes = ensure_tower(
        tower.primary.dsn(), lab.goc_conninfo(), TOWER, sync_password=TOWER_SYNC_PASSWORD
    )
    assert any("does not exist at the GOC" in a for a in tower_changes.actions), tower_changes
    assert route_of(tower.primary, "lost.example") is None
    assert route_of(tower.primary, "before.example") is not None

    # 6. the sync resumes both ways, every event at the GOC exactly once
    batch = make_events(TOWER, 50)
    flush_events(tower, batch)
    sent |= {e.event_id for e in batch}
    add_customer(lab.goc, "after.example")
    wait_until(lambda: len(goc_event_ids(lab)) >= len(sent), 30, "every event at the GOC")
    ids = goc_event_ids(lab)
    assert len(ids) == len(set(ids)) == 300 and set(ids) == sent
    wait_until(
        lambda: config_digest(tower.primary.dsn()) == config_digest(lab.goc.dsn()),
        30,
        "the tower's configuration to equal the GOC's",
    )
    assert route_of(tower.primary, "after.example") is not None

    # 7. done: without --after-restore nothing more to do; with it, nothing lost to copy
    quiet, none = repoint_events(lab.goc.dsn(), TOWER, tower.conninfo())
    assert not quiet.changed and none is None
    assert not ensure_tower(
        tower.primary.dsn(), lab.goc_conninfo(), TOWER, sync_password=TOWER_SYNC_PASSWORD
    ).changed
    _, again = repoint_events(lab.goc.dsn(), TOWER, tower.conninfo(), restored=True)
    assert again is not None and again.copied == 0
