"""The SQL replication check turns pg_stat_replication rows (or a failure) into metrics."""

from __future__ import annotations

import asyncio

import pytest
from monitor_fakes import tower

from mailtower.monitor import replication
from mailtower.monitor.replication import Standby
from mailtower.monitor.service import Monitor


def sample(monitor: Monitor, name: str) -> float | None:
    return monitor.metrics.registry.get_sample_value(name)


def test_standbys_become_metrics_and_the_primary_is_asked(monkeypatch: pytest.MonkeyPatch):
    calls: list[tuple[str, str]] = []

    def fake_query(dsn: str, host: str) -> list[Standby]:
        calls.append((dsn, host))
        return [Standby("sql2", "streaming", 0.25), Standby("late", "catchup", 7.5)]

    monkeypatch.setattr(replication, "query_standbys", fake_query)
    monitor = Monitor(tower(1, 1))
    asyncio.run(monitor.check_sql())
    assert sample(monitor, "mailtower_sql_up") == 1.0
    assert sample(monitor, "mailtower_sql_standbys_streaming") == 1.0
    assert sample(monitor, "mailtower_sql_replication_lag_seconds") == 7.5
    ((dsn, host),) = calls
    assert host == "127.0.0.21"  # the primary only, whatever the DSN's host list says
    assert "user=mailtower_monitor" in dsn


def test_a_failed_query_sets_sql_down(monkeypatch: pytest.MonkeyPatch):
    def broken(dsn: str, host: str) -> list[Standby]:
        raise OSError("connection refused")

    monkeypatch.setattr(replication, "query_standbys", broken)
    monitor = Monitor(tower(1, 1))
    monitor.metrics.sql_up.set(1)
    asyncio.run(monitor.check_sql())
    assert sample(monitor, "mailtower_sql_up") == 0.0
