"""Replication state of the tower's SQL primary (blocking; the monitor runs it in a thread)."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

# Physical standbys only: the GOC's logical subscription (mailtower.goc.sync) has a walsender
# too, and must neither count as a streaming standby nor hide a missing one.
QUERY = (
    "SELECT r.application_name, r.state, coalesce(extract(epoch FROM r.replay_lag), 0) "
    "FROM pg_stat_replication r WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots s "
    "WHERE s.active_pid = r.pid AND s.slot_type = 'logical')"
)


@dataclass(frozen=True)
class Standby:
    """One row of pg_stat_replication."""

    name: str
    state: str
    lag_s: float


def query_standbys(dsn: str, host: str) -> list[Standby]:
    """Ask the primary ``host`` (overriding the DSN's host list) for its standbys."""
    # statement_timeout bounds a hung server; connect_timeout comes from the DSN.
    with psycopg.connect(
        dsn, host=host, autocommit=True, options="-c statement_timeout=3000"
    ) as conn:
        rows = conn.execute(QUERY).fetchall()
    return [Standby(str(name), str(state), float(lag)) for name, state, lag in rows]
