"""Re-pointing the sync after a tower's SQL primary died and its standby was promoted.

PostgreSQL 15 does not carry logical replication slots to a standby, so after a promotion:

- the GOC's events subscription follows a slot on the dead primary. It is dropped (detached
  from its slot, so the dead server is never contacted), a slot is made on the new primary,
  the events the GOC lacks are copied by id (``reconcile``), and only then is the
  subscription created again on the new slot without copying. Everything committed before
  the slot existed is in the reconciliation's read (taken after it); everything after is
  decoded into the slot; what is in both is dropped by the GOC's dedup trigger.
- the tower's config subscription, inherited by the new primary through physical
  replication, is made again at a consistent point of the GOC (``tower.ensure_tower``), and
  the slots of the old primary at the GOC are dropped (terminating a walsender still serving
  the dead primary instead of waiting for ``wal_sender_timeout``).

Run it once the old primary is fenced (stopped, or cut off): a split-brain old primary that
keeps taking events would have them copied by no one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from mailtower.goc.sync import slots, subscription
from mailtower.goc.sync.catalog import connect, lock, require_primary, require_publication, scalar
from mailtower.goc.sync.changes import Changes
from mailtower.goc.sync.exceptions import SyncError
from mailtower.goc.sync.goc import (
    GOC,
    create_events_subscription,
    require_goc_ready,
    stale_reason,
)
from mailtower.goc.sync.names import (
    EVENTS_PUBLICATION,
    events_slot,
    events_slot_prefix,
    events_subscription,
)
from mailtower.goc.sync.reconcile import RECONCILE_TIMEOUT_S, ReconcileResult, reconcile
from mailtower.goc.sync.tower import ensure_tower


@dataclass(frozen=True)
class RepointReport:
    """What a re-point did, and how long it took."""

    tower: str
    timeline: int
    tower_changes: Changes
    goc_changes: Changes
    reconciled: ReconcileResult | None  # None: the events subscription already followed it
    seconds: float

    @property
    def changed(self) -> bool:
        return self.tower_changes.changed or self.goc_changes.changed


def repoint_after_failover(
    goc_dsn: str,
    tower_name: str,
    new_primary_dsn: str,
    *,
    tower_conninfo: str,
    goc_conninfo: str,
    sync_password: str | None = None,
) -> RepointReport:
    """Point the sync of ``tower_name`` at its new primary; a second call changes nothing.

    ``goc_dsn``: superuser at the GOC. ``new_primary_dsn``: superuser on the new primary.
    ``tower_conninfo``: the new primary as the GOC reaches it, as ``mt_sync`` (one host).
    ``goc_conninfo``: the GOC as the tower reaches it, as ``mt_sync``.
    """
    started = time.monotonic()
    with connect(new_primary_dsn) as admin, connect(tower_conninfo) as via_sync:
        timeline = require_primary(admin, tower_name, publishes=True)
        same = scalar(admin, "SELECT system_identifier FROM pg_control_system()") == scalar(
            via_sync, "SELECT system_identifier FROM pg_control_system()"
        )
        if not same or require_primary(via_sync, tower_name, publishes=True) != timeline:
            raise SyncError(
                f"{tower_name}: new_primary_dsn and tower_conninfo reach different servers"
            )
    tower_changes = ensure_tower(
        new_primary_dsn, goc_conninfo, tower_name, sync_password=sync_password
    )
    goc_changes, reconciled = repoint_events(goc_dsn, tower_name, tower_conninfo)
    return RepointReport(
        tower_name,
        timeline,
        tower_changes,
        goc_changes,
        reconciled,
        time.monotonic() - started,
    )


RESTORED = (
    "the GOC was restored from a backup: its slot's confirmed position may be past what the"
    " restored GOC holds"
)


def repoint_events(
    goc_dsn: str, tower_name: str, tower_conninfo: str, *, restored: bool = False
) -> tuple[Changes, ReconcileResult | None]:
    """Make the GOC's events subscription follow the tower's current primary, losing nothing.

    ``restored``: the GOC was restored from a backup (``mailtower sync goc --after-restore``).
    Its subscription, restored from the catalog, still names the tower's slot, but that slot
    has been confirmed up to what the *lost* GOC had received: resuming it would skip the
    events between the backup's end and the loss. So the subscription and its slot are made
    anew and those events copied by id, as after a failover (a second run copies none).
    """
    changes = Changes(GOC)
    name = events_subscription(tower_name)
    with (
        connect(goc_dsn, statement_timeout_s=RECONCILE_TIMEOUT_S) as goc,
        connect(tower_conninfo, statement_timeout_s=RECONCILE_TIMEOUT_S) as tower,
    ):
        lock(goc)
        require_primary(goc, GOC, publishes=False)
        require_goc_ready(goc)
        timeline = require_primary(tower, tower_name, publishes=True)
        require_publication(tower, tower_name, EVENTS_PUBLICATION, "run ensure_tower first")
        slot = events_slot(tower_name, timeline)
        sub = subscription.get(goc, name)
        if sub is not None:
            reason = RESTORED if restored else stale_reason(sub, tower_conninfo, slot, tower)
            if reason is None:
                subscription.ensure_settings(goc, sub, tower_conninfo, EVENTS_PUBLICATION, changes)
                return changes, None
            subscription.drop_keep_slot(goc, sub)
            changes.did(f"dropped subscription {name} ({reason})")
        for old in slots.with_prefix(tower, events_slot_prefix(tower_name)):
            # Made on this server by an earlier, unfinished re-point; after a restore, the
            # current one too (its position is the lost GOC's).
            if old.name != slot or restored:
                slots.drop(tower, old.name, tower_name, changes)
        # 1. the slot: from here on every commit is decoded for the new subscription
        if slots.find(tower, slot) is None:
            lsn = slots.create_logical(tower, slot)
            changes.did(f"created slot {slot} on {tower_name}'s primary at {lsn}")
        # 2. what was committed before it, and the GOC lacks
        reconciled = reconcile(goc, tower, tower_name)
        if reconciled.copied:
            changes.did(f"copied {reconciled.copied} events of {tower_name} the GOC lacked")
        # 3. the stream, from the slot's start (overlap with 2 is dropped by the dedup trigger)
        create_events_subscription(
            goc, tower_name, tower_conninfo, slot_name=slot, create_slot=False, copy_data=False
        )
        changes.did(f"created subscription {name} on slot {slot} (no copy: reconciled)")
    return changes, reconciled
