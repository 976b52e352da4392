"""Subscription state and replication lag of one server, for the monitor to export.

Every server of the sync is both a publisher and a subscriber (the GOC publishes config and
subscribes to events; a tower primary the reverse), so one call reports both sides. It needs
``pg_monitor`` only (no superuser): ``pg_subscription.subconninfo`` is not read.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from mailtower.goc.sync.catalog import Conn, connect
from mailtower.goc.sync.exceptions import SyncTimeout


@dataclass(frozen=True)
class SubscriptionHealth:
    """A subscription on this server."""

    name: str
    enabled: bool
    slot_name: str | None  # on the publisher; its ``_tl<N>`` says which primary it belongs to
    worker_running: bool  # an apply worker is connected (or connecting)
    received_lsn: str | None
    last_message_age_s: float | None  # since the publisher's last message (keepalives too)
    tables_not_ready: int  # tables still being copied or synchronised
    apply_errors: int  # apply-worker errors since the statistics were reset
    sync_errors: int  # table-copy errors


@dataclass(frozen=True)
class SlotHealth:
    """A replication slot on this server (logical: a subscriber's; physical: a standby's)."""

    name: str
    kind: str  # 'logical' or 'physical'
    active: bool
    wal_status: str | None  # reserved / extended / unreserved / lost
    retained_bytes: int | None  # WAL kept on disk for this slot
    pending_bytes: int | None  # WAL the subscriber has not confirmed yet (logical)
    flush_lag_s: float | None  # walsender's flush_lag; None when idle or not connected


@dataclass(frozen=True)
class SyncHealth:
    subscriptions: list[SubscriptionHealth]
    slots: list[SlotHealth]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_SUBSCRIPTIONS = """
SELECT s.subname, s.subenabled, s.subslotname,
       w.pid IS NOT NULL, w.received_lsn::text,
       extract(epoch FROM clock_timestamp() - w.last_msg_receipt_time)::float8,
       (SELECT count(*) FROM pg_subscription_rel r
         WHERE r.srsubid = s.oid AND r.srsubstate <> 'r'),
       coalesce(st.apply_error_count, 0), coalesce(st.sync_error_count, 0)
FROM pg_subscription s
JOIN pg_database d ON d.oid = s.subdbid AND d.datname = current_database()
LEFT JOIN pg_stat_subscription w ON w.subid = s.oid AND w.relid IS NULL
LEFT JOIN pg_stat_subscription_stats st ON st.subid = s.oid
ORDER BY s.subname
"""

_SLOTS = """
WITH here AS (
  SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn()
              ELSE pg_current_wal_lsn() END AS lsn
)
SELECT s.slot_name, s.slot_type, s.active, s.wal_status,
       pg_wal_lsn_diff(here.lsn, s.restart_lsn)::bigint,
       pg_wal_lsn_diff(here.lsn, s.confirmed_flush_lsn)::bigint,
       extract(epoch FROM r.flush_lag)::float8
FROM pg_replication_slots s CROSS JOIN here
LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
WHERE s.database IS NULL OR s.database = current_database()
ORDER BY s.slot_name
"""


def _health(conn: Conn) -> SyncHealth:
    subs = [
        SubscriptionHealth(
            name=str(name),
            enabled=bool(enabled),
            slot_name=slot,
            worker_running=bool(running),
            received_lsn=lsn,
            last_message_age_s=age,
            tables_not_ready=int(not_ready),
            apply_errors=int(apply_errors),
            sync_errors=int(sync_errors),
        )
        for name, enabled, slot, running, lsn, age, not_ready, apply_errors, sync_errors in (
            conn.execute(_SUBSCRIPTIONS).fetchall()
        )
    ]
    slot_rows = [
        SlotHealth(str(name), str(kind), bool(active), wal, retained, pending, lag)
        for name, kind, active, wal, retained, pending, lag in conn.execute(_SLOTS).fetchall()
    ]
    return SyncHealth(subs, slot_rows)


def sync_health(dsn: str) -> SyncHealth:
    """Subscriptions and slots of the server at ``dsn`` (a ``pg_monitor`` role is enough)."""
    with connect(dsn) as conn:
        return _health(conn)


def wait_ready(dsn: str, subscription: str, *, timeout_s: float = 60.0) -> SubscriptionHealth:
    """Wait until ``subscription`` has a running worker and every table copied."""
    deadline = time.monotonic() + timeout_s
    with connect(dsn) as conn:
        while True:
            found = [s for s in _health(conn).subscriptions if s.name == subscription]
            if found and found[0].worker_running and found[0].tables_not_ready == 0:
                return found[0]
            if time.monotonic() > deadline:
                state = found[0] if found else "missing"
                raise SyncTimeout(
                    f"subscription {subscription} not ready after {timeout_s:.0f}s: {state}"
                )
            time.sleep(0.05)


def wait_caught_up(publisher_dsn: str, slot: str, *, timeout_s: float = 60.0) -> float:
    """Wait until the subscriber of ``slot`` confirmed everything the publisher has written
    now; returns the seconds waited."""
    started = time.monotonic()
    with connect(publisher_dsn) as conn:
        target = conn.execute("SELECT pg_current_wal_lsn()").fetchone()
        assert target is not None
        while True:
            row = conn.execute(
                "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots"
                " WHERE slot_name = %s",
                (target[0], slot),
            ).fetchone()
            if row is not None and row[0]:
                return time.monotonic() - started
            if time.monotonic() - started > timeout_s:
                raise SyncTimeout(f"slot {slot} did not catch up with {target[0]} in {timeout_s}s")
            time.sleep(0.05)
