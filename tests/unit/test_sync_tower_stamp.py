"""The GOC stamps each event with the tower whose subscription delivered it, never the row's own
``tower``; a tower's scanners can store only their own tower's events. Real PostgreSQL 15
clusters (tests/synclab.py): a GOC, tower-a, tower-b, each tower's primary playing a
compromised one (a superuser there drops the tower's own CHECK and forges rows)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from pgclusters import wait_until
from synclab import (
    GOC_SYNC_PASSWORD,
    SCANNER_PASSWORD,
    TOWER_SYNC_PASSWORD,
    SyncLab,
    flush_events,
    make_events,
)

from mailtower.goc.sync import (
    SyncError,
    ensure_goc,
    ensure_goc_subscription,
    ensure_tower,
    names,
    reconcile_events,
    wait_ready,
)
from mailtower.goc.sync.tower import OWN_TOWER_CHECK

pytestmark = pytest.mark.integration

A, B = "tower-a", "tower-b"


@pytest.fixture(scope="module")
def lab() -> Iterator[SyncLab]:
    lab = SyncLab.create([A, B], wal_retrieve_retry_interval="1s")
    try:
        ensure_goc(lab.goc.dsn(), sync_password=GOC_SYNC_PASSWORD)
        for tower in lab.towers.values():
            ensure_tower(
                tower.primary.dsn(),
                lab.goc_conninfo(),
                tower.name,
                sync_password=TOWER_SYNC_PASSWORD,
            )
        yield lab
    finally:
        lab.destroy()


def forge(lab: SyncLab, at: str, claimed: str, count: int) -> list[str]:
    """``count`` events stored at ``at``'s primary by its superuser, claiming to be ``claimed``'s
    (the tower's own CHECK dropped first: a compromised primary can do anything locally)."""
    ids = [str(uuid.uuid4()) for _ in range(count)]
    with lab.towers[at].primary.connect() as conn:
        conn.execute(f"ALTER TABLE verdict_events DROP CONSTRAINT IF EXISTS {OWN_TOWER_CHECK}")
        for event_id in ids:
            conn.execute(
                "INSERT INTO verdict_events (event_id, tower, scanner, scanned_at, verdict,"
                " recipients, size_bytes) VALUES (%s, %s, 's01', now(), 'virus',"
                " ARRAY['victim@customer.example'], 1)",
                (event_id, claimed),
            )
    return ids


def towers_at_goc(lab: SyncLab, ids: list[str]) -> dict[str, str]:
    with lab.goc.connect() as conn:
        rows = conn.execute(
            "SELECT event_id::text, tower FROM verdict_events WHERE event_id = ANY(%s::uuid[])",
            (ids,),
        ).fetchall()
    return dict(rows)


def scanner_insert(lab: SyncLab, at: str, claimed: str) -> None:
    dsn = lab.towers[at].primary.conninfo("mailtower_scanner", SCANNER_PASSWORD)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO verdict_events (event_id, tower, scanner, scanned_at, verdict,"
            " recipients, size_bytes) VALUES (%s, %s, 's01', now(), 'clean', ARRAY['x@y.example'],"
            " 1)",
            (uuid.uuid4(), claimed),
        )


def test_a_scanner_stores_only_its_own_towers_events(lab: SyncLab) -> None:
    ensure_tower(  # the CHECK back, as a deploy puts it back
        lab.towers[A].primary.dsn(), lab.goc_conninfo(), A, sync_password=TOWER_SYNC_PASSWORD
    )
    scanner_insert(lab, A, A)
    with pytest.raises(psycopg.errors.CheckViolation, match=OWN_TOWER_CHECK):
        scanner_insert(lab, A, B)
    # The scanners' own path (PostgresSink) with the other tower's name: refused too.
    with pytest.raises(psycopg.Error):
        flush_events(lab.towers[A], make_events(B, 1))


def test_ensure_tower_restores_a_dropped_or_altered_check(lab: SyncLab) -> None:
    primary = lab.towers[B].primary
    with primary.connect() as conn:
        conn.execute(f"ALTER TABLE verdict_events DROP CONSTRAINT IF EXISTS {OWN_TOWER_CHECK}")
        conn.execute(
            f"ALTER TABLE verdict_events ADD CONSTRAINT {OWN_TOWER_CHECK}"
            f" CHECK (tower = '{A}') NOT VALID"
        )
    changed = ensure_tower(primary.dsn(), lab.goc_conninfo(), B, sync_password=TOWER_SYNC_PASSWORD)
    assert any(OWN_TOWER_CHECK in action for action in changed.actions)
    assert not ensure_tower(
        primary.dsn(), lab.goc_conninfo(), B, sync_password=TOWER_SYNC_PASSWORD
    ).changed
    with pytest.raises(psycopg.errors.CheckViolation):
        scanner_insert(lab, B, A)


def test_the_goc_stamps_the_tower_of_the_subscription(lab: SyncLab) -> None:
    """Copied at subscription time (table-copy worker) and streamed (apply worker) alike."""
    before = forge(lab, A, B, 5)  # there before the GOC subscribes: the initial copy
    ensure_goc_subscription(lab.goc.dsn(), A, lab.towers[A].conninfo())
    wait_ready(lab.goc.dsn(), names.events_subscription(A), timeout_s=30)
    streamed = forge(lab, A, B, 5) + forge(lab, A, "no-such-tower", 2)
    every = before + streamed
    wait_until(lambda: len(towers_at_goc(lab, every)) == len(every), 30, "forged events at GOC")
    assert set(towers_at_goc(lab, every).values()) == {A}
    with lab.goc.connect() as conn:
        forged_as_b = conn.execute(
            "SELECT count(*) FROM verdict_events WHERE tower <> %s AND event_id = ANY(%s::uuid[])",
            (A, every),
        ).fetchone()
    assert forged_as_b == (0,)
    # Honest events keep their tower, once each.
    honest = make_events(A, 3)
    with lab.towers[A].primary.connect() as conn:
        conn.execute(
            f"ALTER TABLE verdict_events ADD CONSTRAINT {OWN_TOWER_CHECK}"
            f" CHECK (tower = '{A}') NOT VALID"
        )
    flush_events(lab.towers[A], honest)
    ids = [str(e.event_id) for e in honest]
    wait_until(lambda: len(towers_at_goc(lab, ids)) == 3, 30, "honest events at the GOC")
    assert set(towers_at_goc(lab, ids).values()) == {A}


def test_reconciliation_stamps_the_tower_it_reconciles(lab: SyncLab) -> None:
    forged = forge(lab, B, A, 4)  # tower-b is not subscribed: only reconciliation copies these
    result = reconcile_events(lab.goc.dsn(), B, lab.towers[B].conninfo())
    assert result.copied >= 4
    assert set(towers_at_goc(lab, forged).values()) == {B}


def test_a_publication_offering_more_than_events_is_refused(lab: SyncLab) -> None:
    """A compromised tower adding the GOC's configuration tables to its mt_events publication
    must not get a subscription that writes customers, domains or routes at the GOC."""
    primary = lab.towers[B].primary
    with primary.connect() as conn:
        conn.execute("ALTER PUBLICATION mt_events ADD TABLE customers")
    try:
        with pytest.raises(SyncError, match="not only verdict_events"):
            ensure_goc_subscription(lab.goc.dsn(), B, lab.towers[B].conninfo())
        assert (
            lab.goc.scalar(
                "SELECT count(*) FROM pg_subscription WHERE subname = %s",
                names.events_subscription(B),
            )
            == 0
        )
    finally:
        with primary.connect() as conn:
            conn.execute("ALTER PUBLICATION mt_events DROP TABLE customers")
    ensure_goc_subscription(lab.goc.dsn(), B, lab.towers[B].conninfo())
    wait_ready(lab.goc.dsn(), names.events_subscription(B), timeout_s=30)
