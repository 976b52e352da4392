"""The GOC stamps each event with the tower whose subscription delivered it, never the row's own
``tower``; a tower's scanners can store only their own tower's events. Real PostgreSQL 15
clusters (tests/synclab.py): a GOC, tower-a, tower-b, each tower's primary playing a
compromised one (a superuser there drops the tower's own CHECK and forges rows, or widens its
publication to send UPDATE, DELETE and TRUNCATE, which the GOC skips or refuses)."""

from __future__ import annotations

import re
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
    deployed,
    ensure_goc,
    ensure_goc_subscription,
    ensure_tower,
    names,
    reconcile_events,
    schema,
    sync_health,
    wait_ready,
)
from mailtower.goc.sync.exceptions import SchemaMissing
from mailtower.goc.sync.goc import require_goc_ready, schema_pending
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


# --- A tower that widens its publication after the GOC subscribed -------------------------------

EVERYTHING = "insert, update, delete, truncate"


def subscribed(lab: SyncLab) -> None:
    """Both towers' events subscriptions made and streaming (the earlier tests made them)."""
    for tower in lab.towers.values():
        ensure_goc_subscription(lab.goc.dsn(), tower.name, tower.conninfo())
        wait_ready(lab.goc.dsn(), names.events_subscription(tower.name), timeout_s=30)


def stored(lab: SyncLab, tower: str, count: int) -> list[str]:
    """``count`` honest events of ``tower`` (its scanners' path), once they are at the GOC."""
    events = make_events(tower, count)
    flush_events(lab.towers[tower], events)
    ids = [str(e.event_id) for e in events]
    wait_until(lambda: len(towers_at_goc(lab, ids)) == count, 30, f"{tower}'s events at the GOC")
    return ids


def rows_at_goc(lab: SyncLab, ids: list[str]) -> dict[str, tuple[str, str]]:
    with lab.goc.connect() as conn:
        rows = conn.execute(
            "SELECT event_id::text, tower, verdict FROM verdict_events"
            " WHERE event_id = ANY(%s::uuid[])",
            (ids,),
        ).fetchall()
    return {event_id: (tower, verdict) for event_id, tower, verdict in rows}


def widen(lab: SyncLab, at: str) -> None:
    """What a compromised primary's superuser can do at any time after the GOC's check."""
    with lab.towers[at].primary.connect() as conn:
        conn.execute(f"ALTER PUBLICATION mt_events SET (publish = '{EVERYTHING}')")
        conn.execute(f"ALTER TABLE verdict_events DROP CONSTRAINT IF EXISTS {OWN_TOWER_CHECK}")


def published_operations(lab: SyncLab, at: str) -> tuple[bool, ...]:
    with lab.towers[at].primary.connect() as conn:
        row = conn.execute(
            "SELECT pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication"
            " WHERE pubname = 'mt_events'"
        ).fetchone()
    assert row is not None
    return tuple(row)


def tower_side(lab: SyncLab, at: str) -> deployed.TowerSide:
    return deployed.TowerSide(
        tower=at,
        dsn=lab.towers[at].primary.dsn(),
        goc_conninfo=lab.goc_conninfo(),
        sync_password=TOWER_SYNC_PASSWORD,
    )


def test_a_widened_publication_cannot_relabel_or_delete_events_at_the_goc(lab: SyncLab) -> None:
    subscribed(lab)
    own, others = stored(lab, A, 3), stored(lab, B, 2)
    before = rows_at_goc(lab, own + others)
    widen(lab, A)
    with lab.towers[A].primary.connect() as conn:
        # Relabel its own events as tower-b's, and change their verdict.
        conn.execute(
            "UPDATE verdict_events SET tower = %s, verdict = 'clean' WHERE event_id = %s",
            (B, own[0]),
        )
        conn.execute("DELETE FROM verdict_events WHERE event_id = %s", (own[1],))
        # Another tower's event, by id: insert it here (the GOC drops it as a duplicate), then
        # delete it, which sends a DELETE of that id.
        conn.execute(
            "INSERT INTO verdict_events (event_id, tower, scanner, scanned_at, verdict,"
            " recipients, size_bytes) VALUES (%s, %s, 's01', now(), 'clean', ARRAY['x@y'], 1)",
            (others[0], B),
        )
        conn.execute("DELETE FROM verdict_events WHERE event_id = %s", (others[0],))
    after = stored(lab, A, 1)  # streamed after the forgeries: they were applied (or skipped)
    assert rows_at_goc(lab, own + others) == before
    log = lab.goc.log_text()
    sub = names.events_subscription(A)
    for op, event_id in (("UPDATE", own[0]), ("DELETE", own[1]), ("DELETE", others[0])):
        assert f"{op} of event {event_id} from subscription {sub} skipped" in log
    # The deploy's check sees the widened publication; ensure_tower narrows it again.
    assert (
        f"set publication mt_events to publish insert (it publishes {EVERYTHING})"
        in deployed.tower_pending(tower_side(lab, A))
    )
    changed = ensure_tower(
        lab.towers[A].primary.dsn(), lab.goc_conninfo(), A, sync_password=TOWER_SYNC_PASSWORD
    )
    assert "set publication mt_events to publish insert" in changed.actions
    assert published_operations(lab, A) == (True, False, False, False)
    assert deployed.tower_pending(tower_side(lab, A)) == []
    assert after[0] in towers_at_goc(lab, after)


def test_an_operator_at_the_goc_still_updates_deletes_and_truncates(lab: SyncLab) -> None:
    subscribed(lab)
    ids = stored(lab, B, 2)
    with lab.goc.connect() as conn:
        assert (
            conn.execute(
                "UPDATE verdict_events SET verdict = 'suspicious' WHERE event_id = %s", (ids[0],)
            ).rowcount
            == 1
        )
        assert conn.execute("DELETE FROM verdict_events WHERE event_id = %s", (ids[1],)).rowcount
        with conn.transaction(force_rollback=True):
            conn.execute("TRUNCATE verdict_events")
            assert conn.execute("SELECT count(*) FROM verdict_events").fetchone() == (0,)
    assert rows_at_goc(lab, ids) == {ids[0]: (B, "suspicious")}


def test_the_goc_reports_and_recreates_a_missing_guard_trigger(lab: SyncLab) -> None:
    for trigger in (schema.KEEP_DELETE_TRIGGER, schema.REFUSE_TRUNCATE_TRIGGER):
        with lab.goc.connect() as conn:
            conn.execute(f"DROP TRIGGER {trigger} ON verdict_events")
            assert f"create trigger {trigger} (enabled ALWAYS)" in schema_pending(conn)
            with pytest.raises(SchemaMissing, match=trigger):
                require_goc_ready(conn)
        assert ensure_goc(lab.goc.dsn()).actions == [
            f"created trigger {trigger}",
            f"enabled trigger {trigger} ALWAYS (apply workers too)",
        ]
        assert not ensure_goc(lab.goc.dsn()).changed
        with lab.goc.connect() as conn:
            assert schema_pending(conn) == []


def test_a_replicated_truncate_stalls_only_that_towers_stream(lab: SyncLab) -> None:
    """Last: it leaves tower-a's subscription stalled until the operator skips the TRUNCATE."""
    subscribed(lab)
    own, others = stored(lab, A, 2), stored(lab, B, 2)
    with lab.goc.connect() as conn:
        total = conn.execute("SELECT count(*) FROM verdict_events").fetchone()
    widen(lab, A)
    with lab.towers[A].primary.connect() as conn:
        conn.execute("TRUNCATE verdict_events")
    stalled = make_events(A, 1)
    flush_events(lab.towers[A], stalled)
    sub = names.events_subscription(A)

    def apply_errors() -> int:
        (found,) = [s for s in sync_health(lab.goc.dsn()).subscriptions if s.name == sub]
        return found.apply_errors

    # The apply worker fails on the TRUNCATE, restarts, fails again: sync health shows it.
    wait_until(lambda: apply_errors() >= 2, 30, f"apply errors of {sub}")
    assert f"TRUNCATE from subscription {sub} refused" in lab.goc.log_text()
    with lab.goc.connect() as conn:
        assert conn.execute("SELECT count(*) FROM verdict_events").fetchone() == total
    assert set(towers_at_goc(lab, own + others).values()) == {A, B}
    assert towers_at_goc(lab, [str(stalled[0].event_id)]) == {}  # stalled behind it
    stored(lab, B, 1)  # the other tower's stream goes on
    # The runbook's way out: narrow the publication, skip the transaction the error names.
    ensure_tower(
        lab.towers[A].primary.dsn(), lab.goc_conninfo(), A, sync_password=TOWER_SYNC_PASSWORD
    )
    finished = re.findall(
        r"TRUNCATE\" in transaction \d+, finished at ([0-9A-F]+/[0-9A-F]+)", lab.goc.log_text()
    )
    assert finished, "the error's context names the transaction's finish LSN"
    with lab.goc.connect() as conn:
        conn.execute(f"ALTER SUBSCRIPTION {sub} SKIP (lsn = '{finished[-1]}')")
    wait_until(
        lambda: towers_at_goc(lab, [str(stalled[0].event_id)]) != {}, 30, "the stream resumed"
    )
    with lab.goc.connect() as conn:
        assert conn.execute("SELECT count(*) FROM verdict_events").fetchone()[0] > total[0]
