"""Config down from the GOC, events up from two towers, duplicates, a GOC outage and the health
report, on real PostgreSQL 15 clusters (a GOC, tower-a, tower-b)."""

from __future__ import annotations

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

from mailtower.goc.sync import (
    config_digest,
    ensure_goc,
    ensure_tower,
    event_count,
    names,
    reconcile_events,
    sync_health,
    wait_ready,
)
from mailtower.goc.sync.health import SlotHealth
from mailtower.scand.events import PostgresSink

pytestmark = pytest.mark.integration

A, B = "tower-a", "tower-b"


@pytest.fixture(scope="module")
def lab() -> Iterator[SyncLab]:
    lab = SyncLab.create([A, B], wal_retrieve_retry_interval="1s")
    try:
        ensure_goc(lab.goc.dsn(), sync_password=GOC_SYNC_PASSWORD)
        add_customer(lab.goc, "shared.example")
        # tower-b was seeded locally before the sync existed (roles/sql.py's customers.sql):
        # one customer the GOC has under another id, one the GOC does not have at all.
        with lab.towers[B].primary.connect() as conn:
            conn.execute("INSERT INTO customers (id, name) VALUES (7, 'shared.example')")
            conn.execute("INSERT INTO customers (id, name) VALUES (8, 'local-only.example')")
            conn.execute("INSERT INTO domains (name, customer_id) VALUES ('local-only.example', 8)")
        lab.ensure_all()
        yield lab
    finally:
        lab.destroy()


def in_sync(lab: SyncLab, tower: str) -> bool:
    return config_digest(lab.towers[tower].primary.dsn()) == config_digest(lab.goc.dsn())


def test_seeded_tower_takes_the_goc_configuration(lab: SyncLab) -> None:
    b = lab.towers[B].primary
    assert in_sync(lab, A) and in_sync(lab, B)
    assert b.scalar("SELECT count(*) FROM customers WHERE name = 'local-only.example'") == 0
    assert b.scalar("SELECT id FROM customers WHERE name = 'shared.example'") == (
        lab.goc.scalar("SELECT id FROM customers WHERE name = 'shared.example'")
    )


def test_config_changes_reach_both_towers(lab: SyncLab) -> None:
    add_customer(lab.goc, "new.example", "192.0.2.10")
    with lab.goc.connect() as conn:
        conn.execute(
            "UPDATE routes SET transport = 'smtp:[192.0.2.99]:2525' WHERE domain = 'shared.example'"
        )
        conn.execute("""UPDATE policies SET policy = '{"max_message_bytes": 1000000}'""")
        conn.execute("INSERT INTO recipients VALUES ('other@shared.example', 'shared.example')")
    for tower in (A, B):
        wait_until(lambda t=tower: in_sync(lab, t), 30, f"{tower} to take the changes")
        primary = lab.towers[tower].primary
        assert route_of(primary, "new.example") == "smtp:[192.0.2.10]:25"
        assert route_of(primary, "shared.example") == "smtp:[192.0.2.99]:2525"
        assert primary.scalar("SELECT count(*) FROM recipients WHERE domain = 'new.example'") == 1
    with lab.goc.connect() as conn:
        conn.execute("DELETE FROM customers WHERE name = 'new.example'")  # cascades
    for tower in (A, B):
        wait_until(lambda t=tower: in_sync(lab, t), 30, f"{tower} to take the delete")
        assert route_of(lab.towers[tower].primary, "new.example") is None
        assert (
            lab.towers[tower].primary.scalar(
                "SELECT count(*) FROM recipients WHERE domain = 'new.example'"
            )
            == 0
        )


def test_events_from_both_towers_reach_the_goc(lab: SyncLab) -> None:
    before = {t: event_count(lab.goc.dsn(), t) for t in (A, B)}
    flush_events(lab.towers[A], make_events(A, 300))
    flush_events(lab.towers[B], make_events(B, 200))
    for tower, n in ((A, 300), (B, 200)):
        wait_until(
            lambda t=tower, n=n: event_count(lab.goc.dsn(), t) == before[t] + n,
            30,
            f"{n} events of {tower} at the GOC",
        )
    row = lab.goc.scalar(
        "SELECT count(*) FROM verdict_events WHERE received_at < scanned_at"
    )  # received_at is filled at the GOC, after the scan
    assert row == 0


def test_an_event_the_goc_already_has_does_not_stop_the_stream(lab: SyncLab) -> None:
    # As after a failover: a scanner re-flushes to the new primary an event the dead primary
    # had already sent to the GOC. Without the GOC's dedup trigger this is a unique violation
    # that stops the apply worker, retrying the same transaction for ever.
    known, fresh = make_events(B, 2)
    sink = PostgresSink(lab.goc.dsn())
    sink([known])  # the GOC has it
    sink.close()
    flush_events(lab.towers[B], [known, fresh])  # one transaction with both
    wait_until(
        lambda: (
            lab.goc.scalar(
                "SELECT count(*) FROM verdict_events WHERE event_id = %s", fresh.event_id
            )
            == 1
        ),
        30,
        "the fresh event at the GOC",
    )
    assert (
        lab.goc.scalar("SELECT count(*) FROM verdict_events WHERE event_id = %s", known.event_id)
        == 1
    )
    health = {s.name: s for s in sync_health(lab.goc.dsn()).subscriptions}
    assert health[names.events_subscription(B)].apply_errors == 0


def test_goc_outage_towers_keep_recording_and_catch_up(lab: SyncLab) -> None:
    goc = lab.goc
    before = {t: event_count(goc.dsn(), t) for t in (A, B)}
    goc.stop()
    try:
        # the towers go on: scanners write, and the config subscriptions retry the GOC
        flush_events(lab.towers[A], make_events(A, 400))
        flush_events(lab.towers[B], make_events(B, 300))

        def events_slot() -> SlotHealth:
            slots = sync_health(lab.towers[A].primary.dsn()).slots
            return next(s for s in slots if s.name == names.events_slot(A, 1))

        wait_until(lambda: not events_slot().active, 30, "the GOC's walsender on tower-a to end")
        assert (events_slot().pending_bytes or 0) > 0  # the backlog is kept for the GOC
        # a tower deploy meanwhile succeeds and changes nothing
        changes = ensure_tower(
            lab.towers[A].primary.dsn(), lab.goc_conninfo(), A, sync_password=TOWER_SYNC_PASSWORD
        )
        assert not changes.changed
    finally:
        goc.start()
    for tower, n in ((A, 400), (B, 300)):
        wait_until(
            lambda t=tower, n=n: event_count(goc.dsn(), t) == before[t] + n,
            60,
            f"{tower}'s backlog at the GOC",
        )
    add_customer(goc, "after-outage.example")
    for tower in (A, B):
        wait_ready(lab.towers[tower].primary.dsn(), names.config_subscription(tower))
        wait_until(lambda t=tower: in_sync(lab, t), 60, f"{tower} to take config after the outage")
    for tower in (A, B):
        result = reconcile_events(goc.dsn(), tower, lab.towers[tower].conninfo())
        assert result.copied == 0 and result.goc_only == 0, result  # nothing lost, nothing extra


def test_health_needs_pg_monitor_only(lab: SyncLab) -> None:
    with lab.goc.connect() as conn:
        conn.execute("CREATE ROLE health_probe LOGIN PASSWORD 'probe-password-0123'")
        conn.execute("GRANT pg_monitor TO health_probe")
    health = sync_health(lab.goc.conninfo("health_probe", "probe-password-0123"))
    subs = {s.name: s for s in health.subscriptions}
    assert set(subs) == {names.events_subscription(A), names.events_subscription(B)}
    assert all(s.worker_running and s.tables_not_ready == 0 for s in subs.values())
    assert {s.name for s in health.slots} == {names.config_slot(A, 1), names.config_slot(B, 1)}
    assert health.as_dict()["subscriptions"][0]["name"] == names.events_subscription(A)


def test_sync_password_change(lab: SyncLab) -> None:
    # A new password for tower-a's mt_sync: ensure_tower sets it, the GOC's subscription is
    # given the new conninfo by ensure_goc_subscription, and the stream goes on.
    from mailtower.goc.sync import ensure_goc_subscription

    tower = lab.towers[A]
    changes = ensure_tower(
        tower.primary.dsn(), lab.goc_conninfo(), A, sync_password="another-password-0123"
    )
    assert changes.actions == [f"set the password of role {names.SYNC_ROLE}"]
    conninfo = tower.primary.conninfo(names.SYNC_ROLE, "another-password-0123")
    changes = ensure_goc_subscription(lab.goc.dsn(), A, conninfo)
    assert [a.split(" to ")[0] for a in changes.actions] == [
        f"set the connection of subscription {names.events_subscription(A)}"
    ]
    before = event_count(lab.goc.dsn(), A)
    flush_events(tower, make_events(A, 10))
    wait_until(lambda: event_count(lab.goc.dsn(), A) == before + 10, 30, "events after")
    # and back, for whatever runs next
    ensure_tower(tower.primary.dsn(), lab.goc_conninfo(), A, sync_password=TOWER_SYNC_PASSWORD)
    ensure_goc_subscription(lab.goc.dsn(), A, tower.conninfo())


def test_the_apply_worker_stamps_rows_for_the_scanners_deltas(lab: SyncLab) -> None:
    """The GOC's changes, applied by the real apply worker, fire the tower's ALWAYS trigger:
    a policy change is a scanner's delta, a deleted customer a full load (schema.sql.j2)."""
    from mailtower.customers import snapshot

    add_customer(lab.goc, "delta.example")
    wait_until(lambda: in_sync(lab, A), 30, "tower-a to take the customer")
    tower = lab.towers[A].primary
    assert (
        tower.scalar(
            "SELECT p.mt_gen FROM policies p JOIN customers c ON c.id = p.customer_id"
            " WHERE c.name = 'delta.example'"
        )
        > 0
    )
    assert (
        lab.goc.scalar("SELECT count(*) FROM pg_attribute WHERE attname = 'mt_gen' AND attnum > 0")
        == 0
    )  # the tower's own column
    with tower.connect() as conn:
        first, _ = snapshot.refresh(conn, None)
        with lab.goc.connect() as goc:
            goc.execute(
                """UPDATE policies SET policy = '{"ban_extensions": ["rar"]}' WHERE customer_id"""
                " = (SELECT id FROM customers WHERE name = 'delta.example')"
            )
        wait_until(lambda: in_sync(lab, A), 30, "tower-a to take the policy")
        second, mode = snapshot.refresh(conn, first)
        assert mode == "delta"
        assert second.lookup("x@delta.example")[1].ban_extensions == ("rar",)  # type: ignore[union-attr]
        assert second.same_content(snapshot.load(conn, first))
        with lab.goc.connect() as goc:
            goc.execute("DELETE FROM customers WHERE name = 'delta.example'")
        wait_until(lambda: in_sync(lab, A), 30, "tower-a to take the delete")
        third, mode = snapshot.refresh(conn, second)
        assert mode == "full" and "delta.example" not in third.domains
