"""A tower's SQL primary hangs, its standby is promoted, the sync is re-pointed: every event is
at the GOC exactly once, and the new primary's configuration is the GOC's, including a change
the old primary had applied but never sent to its standby. Real PostgreSQL 15 clusters."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pgclusters import wait_until
from synclab import (
    GOC_SYNC_PASSWORD,
    TOWER_SYNC_PASSWORD,
    SyncLab,
    Tower,
    add_customer,
    flush_events,
    make_events,
    route_of,
)

from mailtower.goc.sync import (
    RepointNeeded,
    config_digest,
    ensure_goc,
    ensure_goc_subscription,
    ensure_tower,
    names,
    repoint_after_failover,
    sync_health,
    wait_caught_up,
)
from mailtower.monitor.replication import query_standbys

pytestmark = pytest.mark.integration

TOWER = "tower-a"


@pytest.fixture(scope="module")
def lab() -> Iterator[SyncLab]:
    lab = SyncLab.create([TOWER], standby_for=[TOWER], wal_retrieve_retry_interval="1s")
    try:
        ensure_goc(lab.goc.dsn(), sync_password=GOC_SYNC_PASSWORD)
        add_customer(lab.goc, "before.example")
        lab.ensure_all()
        yield lab
    finally:
        lab.destroy()


def test_monitor_counts_the_standby_not_the_goc(lab: SyncLab) -> None:
    # tower-a's primary has two walsenders: its standby's and the GOC's subscription's.
    primary = lab.towers[TOWER].primary
    senders = primary.scalar("SELECT count(*) FROM pg_stat_replication")
    assert senders == 2
    standbys = query_standbys(primary.dsn(), str(primary.base))
    assert [s.name for s in standbys] == ["walreceiver"]


def goc_event_ids(lab: SyncLab) -> list[str]:
    with lab.goc.connect() as conn:
        rows = conn.execute(
            "SELECT event_id::text FROM verdict_events WHERE tower = %s", (TOWER,)
        ).fetchall()
    return [r[0] for r in rows]


def tower_event_ids(tower: Tower) -> set[str]:
    with tower.primary.connect() as conn:
        return {r[0] for r in conn.execute("SELECT event_id::text FROM verdict_events")}


def test_failover_loses_and_duplicates_nothing(lab: SyncLab) -> None:
    tower = lab.towers[TOWER]
    old, standby = tower.primary, tower.standby
    assert standby is not None
    sent: set[str] = set()

    # 1. steady state: events reach the GOC
    batch = make_events(TOWER, 200)
    flush_events(tower, batch)
    sent |= {e.event_id for e in batch}
    wait_until(lambda: len(goc_event_ids(lab)) == 200, 30, "the first 200 events at the GOC")

    # 2. the GOC falls behind (its subscription paused) while the tower keeps recording:
    #    these events reach the standby but not the GOC
    with lab.goc.connect() as conn:
        conn.execute(f"ALTER SUBSCRIPTION {names.events_subscription(TOWER)} DISABLE")
    wait_until(
        lambda: not any(s.worker_running for s in sync_health(lab.goc.dsn()).subscriptions),
        30,
        "the GOC's apply worker to stop",
    )
    batch = make_events(TOWER, 300)
    flush_events(tower, batch)
    sent |= {e.event_id for e in batch}
    lsn = old.current_lsn()
    wait_until(lambda: standby.replayed(lsn), 30, "the standby to replay the events")

    # 3. the standby stops for a while; meanwhile the old primary applies a config change from
    #    the GOC and confirms it to the GOC's slot: the standby never sees it
    standby.stop()
    add_customer(lab.goc, "late.example", "192.0.2.77")
    wait_until(lambda: route_of(old, "late.example") is not None, 30, "late.example on sql1")
    wait_caught_up(lab.goc.dsn(), names.config_slot(TOWER, 1), timeout_s=30)

    # 4. the old primary hangs (SIGSTOP: its connections stay open), the standby is promoted
    old.freeze()
    try:
        standby.start()
        standby.promote()
        wait_until(lambda: not standby.in_recovery(), 30, "the promotion")
        tower.primary, tower.standby = standby, old  # the scanners' DSN lists both anyway
        assert route_of(standby, "late.example") is None  # the change the standby missed

        # 5. scanners go on: their DSN lists both hosts, the writable one takes the events
        batch = make_events(TOWER, 100)
        flush_events(tower, batch)
        sent |= {e.event_id for e in batch}

        # the GOC's subscription follows a slot on the dead primary: ensure refuses to guess
        with pytest.raises(RepointNeeded, match="repoint_after_failover"):
            ensure_goc_subscription(lab.goc.dsn(), TOWER, tower.conninfo())
        # the GOC's config slot is still held for the hung primary's connection
        held_by = lab.goc.scalar(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
            names.config_slot(TOWER, 1),
        )
        assert held_by is not None

        # 6. re-point
        report = repoint_after_failover(
            lab.goc.dsn(),
            TOWER,
            standby.dsn(),
            tower_conninfo=tower.conninfo(),
            goc_conninfo=lab.goc_conninfo(),
        )
    finally:
        old.kill()  # fenced for good

    assert report.timeline == 2
    assert report.reconciled is not None
    assert report.reconciled.copied == 400  # paused 300 + 100 written on the new primary
    assert report.reconciled.goc_only == 0
    actions = "\n".join(report.tower_changes.actions + report.goc_changes.actions)
    assert f"dropped replication slot {names.config_slot(TOWER, 1)}" in actions
    assert "terminated the walsender" in actions

    # 7. after the re-point: new events and config flow through the new slots
    batch = make_events(TOWER, 100)
    flush_events(tower, batch)
    sent |= {e.event_id for e in batch}
    add_customer(lab.goc, "after.example")

    def all_events_once() -> bool:
        ids = goc_event_ids(lab)
        return len(ids) >= len(sent)

    wait_until(all_events_once, 30, "every event at the GOC")
    ids = goc_event_ids(lab)
    assert len(ids) == len(set(ids)) == len(sent) == 700
    assert set(ids) == sent == tower_event_ids(tower)
    wait_until(
        lambda: config_digest(standby.dsn()) == config_digest(lab.goc.dsn()),
        30,
        "the new primary's configuration to equal the GOC's",
    )
    assert route_of(standby, "late.example") == "smtp:[192.0.2.77]:25"
    assert route_of(standby, "after.example") is not None

    goc_health = {s.name: s for s in sync_health(lab.goc.dsn()).subscriptions}
    events = goc_health[names.events_subscription(TOWER)]
    assert events.slot_name == names.events_slot(TOWER, 2)
    assert events.worker_running and events.apply_errors == 0
    goc_slots = {s.name for s in sync_health(lab.goc.dsn()).slots}
    assert goc_slots == {names.config_slot(TOWER, 2)}  # the old primary's slot is gone

    # 8. a second re-point, and the ensure steps, change nothing
    again = repoint_after_failover(
        lab.goc.dsn(),
        TOWER,
        standby.dsn(),
        tower_conninfo=tower.conninfo(),
        goc_conninfo=lab.goc_conninfo(),
    )
    assert not again.changed, again
    assert not ensure_goc_subscription(lab.goc.dsn(), TOWER, tower.conninfo()).changed
    assert not ensure_tower(
        standby.dsn(), lab.goc_conninfo(), TOWER, sync_password=TOWER_SYNC_PASSWORD
    ).changed


def test_why_the_config_subscription_is_not_resumed() -> None:
    # The design's reason, on PostgreSQL itself: left alone, the subscription a promoted
    # standby inherits resumes from the GOC slot's position, which the old primary had moved
    # past a change the standby never received. The change is silently never applied.
    lab = SyncLab.create([TOWER], standby_for=[TOWER], wal_retrieve_retry_interval="1s")
    try:
        ensure_goc(lab.goc.dsn(), sync_password=GOC_SYNC_PASSWORD)
        lab.ensure_all()
        tower = lab.towers[TOWER]
        old, standby = tower.primary, tower.standby
        assert standby is not None
        lsn = old.current_lsn()
        wait_until(lambda: standby.replayed(lsn), 30, "the standby to replay")
        standby.stop()
        add_customer(lab.goc, "missed.example")
        wait_until(lambda: route_of(old, "missed.example") is not None, 30, "sql1 to apply")
        wait_caught_up(lab.goc.dsn(), names.config_slot(TOWER, 1), timeout_s=30)
        old.kill()
        standby.start()
        # the premise: the standby has the subscription fully synchronised, only not the change
        not_ready = "SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'"
        assert standby.scalar(not_ready) == 0
        standby.promote()
        add_customer(lab.goc, "later.example")
        wait_until(
            lambda: route_of(standby, "later.example") is not None,
            60,
            "the inherited subscription to resume",
        )
        assert route_of(standby, "missed.example") is None
    finally:
        lab.destroy()
