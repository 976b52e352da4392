"""Sync between the GOC and every tower, with PostgreSQL logical replication.

Configuration (customers, domains, routes, policies, recipients) flows down: publication
``mt_config`` at the GOC, subscription ``mt_config_<tower>`` on each tower's primary. Verdict
events flow up: publication ``mt_events`` (INSERT only) on each tower's primary, subscription
``mt_events_<tower>`` at the GOC. Both sides need ``wal_level = logical``. docs/architecture.md
("GOC sync") gives the design, failover included. One module per concept:

- ``names``: every object's name, from the tower's name (slots carry the primary's timeline)
- ``schema``: the GOC's tables, and the triggers that make duplicate events harmless, stamp
  the tower and keep a tower from changing or removing events it already sent
- ``goc``: ``ensure_goc``, ``ensure_goc_subscription``
- ``tower``: ``ensure_tower`` (re-subscribes the configuration on a promoted standby)
- ``failover``: ``repoint_after_failover`` (events re-pointed without loss or duplicates)
- ``reconcile``: ``reconcile_events``, copying by event id what the GOC lacks
- ``health``: ``sync_health`` (subscription state, slot lag) for the monitor, ``wait_ready``
- ``verify``: ``config_digest``, ``event_count``
- ``roles``, ``publication``, ``subscription``, ``slots``, ``catalog``, ``conninfo``: helpers
- ``changes``: ``Changes``, what an ensure step did (nothing on a second call)
- ``exceptions``: ``SyncError`` and one subclass per failure

Every call is blocking (psycopg); run them from a host that reaches the GOC and the tower's
SQL hosts (the GOC, or the lab's controller).
"""

from __future__ import annotations

from mailtower.goc.sync.changes import Changes
from mailtower.goc.sync.conninfo import sync_conninfo
from mailtower.goc.sync.exceptions import (
    NotPrimary,
    RepointNeeded,
    SchemaMissing,
    SlotBusy,
    SyncError,
    SyncTimeout,
    WalLevelNotLogical,
)
from mailtower.goc.sync.failover import RepointReport, repoint_after_failover
from mailtower.goc.sync.goc import ensure_goc, ensure_goc_subscription
from mailtower.goc.sync.health import SyncHealth, sync_health, wait_caught_up, wait_ready
from mailtower.goc.sync.reconcile import ReconcileResult, reconcile_events
from mailtower.goc.sync.tower import ensure_tower
from mailtower.goc.sync.verify import config_digest, event_count

__all__ = [
    "Changes",
    "NotPrimary",
    "ReconcileResult",
    "RepointNeeded",
    "RepointReport",
    "SchemaMissing",
    "SlotBusy",
    "SyncError",
    "SyncHealth",
    "SyncTimeout",
    "WalLevelNotLogical",
    "config_digest",
    "ensure_goc",
    "ensure_goc_subscription",
    "ensure_tower",
    "event_count",
    "reconcile_events",
    "repoint_after_failover",
    "sync_conninfo",
    "sync_health",
    "wait_caught_up",
    "wait_ready",
]
