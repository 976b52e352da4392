"""The monitor reports its tower's state to a real PostgreSQL GOC (tower_status, VirusEye).

The GOC is a throwaway cluster (tests/pgclusters.py) with the hub's verdict_events and the
eye's objects; the monitor logs in as its tower's own ``mt_status_<tower>`` with only what the
GOC deploy gives it (its own row of tower_status).
The relay's queue comes from the real relay exporter's collector over a spool directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from eye_fixtures import goc_hub
from monitor_fakes import SCANNERS, FakeHAProxy, FakeHealth, free_port, tower, wait_for
from prometheus_client import start_http_server

from mailtower.goc.eye.status import TowerStatus, status_role
from mailtower.monitor import goc_status, replication, service
from mailtower.monitor.errors import RelayQueueError
from mailtower.monitor.replication import Standby
from mailtower.monitor.service import Monitor
from mailtower.relay import exporter as relay_exporter
from mailtower.settings import TowerSettings, from_data

pytestmark = pytest.mark.integration

NAMES = ["s01", "s02", "s03"]
STATUS_PASSWORD = "status-password-0123456789"
INTERVAL_S = 0.2
WAIT_S = 30.0  # generous (this machine may be busy): only a failure waits this long


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def goc() -> Iterator[Any]:
    with goc_hub() as cluster:
        with cluster.connect() as conn:
            role = status_role("unit")  # the tower's own role (monitor_fakes.tower: "unit")
            conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{STATUS_PASSWORD}'")
            # what the GOC deploy grants, nothing more: its own row only (goc.sync.deployed)
            conn.execute(f"GRANT INSERT, UPDATE, SELECT ON public.tower_status TO {role}")
            conn.execute(
                f"CREATE POLICY own_row ON public.tower_status TO {role}"
                " USING (tower = 'unit') WITH CHECK (tower = 'unit')"
            )
            conn.execute("ALTER TABLE public.tower_status ENABLE ROW LEVEL SECURITY")
        yield cluster


@pytest.fixture
def hub(goc: Any) -> Any:
    with goc.connect() as conn:
        conn.execute("TRUNCATE tower_status")
    return goc


class Spool:
    """A Postfix spool served by the real relay exporter's collector on 127.0.0.1."""

    def __init__(self, path: Path) -> None:
        self.path = path
        for queue in relay_exporter.QUEUES:
            (path / queue).mkdir(parents=True)
        self.port = free_port()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def queue(self, queue: str, count: int) -> None:
        """Put ``count`` messages (files in hashed subfolders, as Postfix does) in ``queue``."""
        for i in range(count):
            sub = self.path / queue / f"{i % 3:X}"
            sub.mkdir(exist_ok=True)
            (sub / f"{queue}{i:05d}").write_bytes(b"x")

    def serve(self) -> None:
        self._server, self._thread = start_http_server(
            self.port, addr="127.0.0.1", registry=relay_exporter.registry(self.path)
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join()
            self._server = None


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    spool = Spool(tmp_path / "spool")
    yield spool
    spool.stop()


def goc_tower(scanner_port: int, haproxy_port: int, goc_port: int, exporter_port: int):
    data = tower(scanner_port, haproxy_port).model_dump(mode="json")
    data["ports"]["relay_exporter"] = exporter_port
    # A stopped fake scanner is refused at once; a slow machine must not make live ones flap.
    data["limits"]["health_timeout_s"] = 3.0
    data["goc"] = {
        "address": "127.0.0.1",
        "port": goc_port,
        "database": "mailtower",
        "status_interval_s": INTERVAL_S,
    }
    data["secrets"] |= {
        "sql_sync": "s" * 16,
        "goc_sync": "g" * 16,
        "goc_status": STATUS_PASSWORD,
    }
    return from_data(data)


async def start_healths() -> list[FakeHealth]:
    first = FakeHealth(SCANNERS[0])
    await first.start()
    rest = [FakeHealth(ip, first.port) for ip in SCANNERS[1:]]
    for h in rest:
        await h.start()
    return [first, *rest]


@contextlib.asynccontextmanager
async def tower_parts(
    goc_port: int, exporter_port: int
) -> AsyncIterator[tuple[TowerSettings, list[FakeHealth]]]:
    """Three healthy fake scanners and a fake HAProxy, and settings pointing at them."""
    healths = await start_healths()
    haproxy = FakeHAProxy(dict(zip(NAMES, SCANNERS, strict=True)))
    await haproxy.start()
    try:
        yield goc_tower(healths[0].port, haproxy.port, goc_port, exporter_port), healths
    finally:
        for h in healths:
            with contextlib.suppress(AssertionError):  # already stopped by the test
                await h.stop()
        await haproxy.stop()


@contextlib.asynccontextmanager
async def running(monitor: Monitor) -> AsyncIterator[Monitor]:
    stop = asyncio.Event()
    task = asyncio.create_task(monitor.run(stop))
    try:
        await wait_for(lambda: monitor.http_port is not None or task.done(), 5, "monitor start")
        if task.done():
            task.result()
        yield monitor
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)  # every loop, the GOC's included, ends with stop


def fake_standbys(monkeypatch: pytest.MonkeyPatch, standbys: list[Standby]) -> None:
    monkeypatch.setattr(replication, "query_standbys", lambda dsn, host: list(standbys))


def sample(monitor: Monitor, name: str) -> float | None:
    return monitor.metrics.registry.get_sample_value(name)


async def row(hub: Any, tower_name: str = "unit") -> dict[str, Any] | None:
    def read() -> dict[str, Any] | None:
        with hub.connect() as conn:
            cur = conn.execute(
                "SELECT scanners_up, scanners_total, queue_size, replication_lag_s, updated_at"
                " FROM tower_status WHERE tower = %s",
                (tower_name,),
            )
            found = cur.fetchone()
        if found is None:
            return None
        keys = ("scanners_up", "scanners_total", "queue_size", "replication_lag_s", "updated_at")
        return dict(zip(keys, found, strict=True))

    return await asyncio.to_thread(read)


async def wait_row(hub: Any, what: str, **expected: Any) -> dict[str, Any]:
    """Poll the GOC until the tower's row has ``expected``; return it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    last: dict[str, Any] | None = None
    while loop.time() < deadline:
        last = await row(hub)
        if last is not None and all(last[k] == v for k, v in expected.items()):
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {WAIT_S}s waiting for {what}: row is {last}")


# -- the queue count ------------------------------------------------------------------------


def test_queue_size_counts_active_deferred_and_hold_from_the_real_exporter(tmp_path: Path):
    spool = Spool(tmp_path)
    spool.queue("active", 2)
    spool.queue("deferred", 5)
    spool.queue("hold", 3)
    spool.queue("incoming", 7)  # transient, not counted
    spool.queue("maildrop", 11)
    from prometheus_client import generate_latest

    text = generate_latest(relay_exporter.registry(tmp_path)).decode()
    assert goc_status.queue_size(text) == 2 + 5 + 3


@pytest.mark.parametrize(
    "text",
    [
        "",
        'mailtower_relay_queue_messages{queue="active"} 3.0\n',  # deferred missing
        'other_metric{queue="active"} 1.0\nother_metric{queue="deferred"} 1.0\n',
        "mailtower_relay_queue_messages{queue= garbage\n",
    ],
)
def test_queue_size_refuses_metrics_without_the_counts(text: str):
    with pytest.raises(RelayQueueError):
        goc_status.queue_size(text)


def test_read_queue_size_names_a_refused_connection():
    async def read() -> int:
        return await goc_status.read_queue_size("127.0.0.1", free_port(), 2.0)

    with pytest.raises(RelayQueueError, match="ConnectionRefusedError"):
        asyncio.run(read())


# -- the monitor and a real GOC -------------------------------------------------------------


def test_rows_appear_and_follow_the_tower(
    hub: Any, spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool.queue("active", 1)
    spool.queue("deferred", 4)
    spool.serve()
    fake_standbys(monkeypatch, [Standby("sql2", "streaming", 0.25)])

    async def scenario() -> None:
        async with tower_parts(hub.port, spool.port) as (settings, healths):
            monitor = Monitor(settings, sql_interval_s=0.1)
            async with running(monitor):
                first = await wait_row(
                    hub,
                    "the first report",
                    scanners_up=3,
                    scanners_total=3,
                    queue_size=5,
                    replication_lag_s=0.25,
                )
                assert sample(monitor, "mailtower_goc_status_up") == 1.0
                assert (
                    sample(monitor, "mailtower_goc_status_last_success_timestamp_seconds") or 0
                ) > 0

                # a scanner dies, mail piles up on hold, the standby stops streaming
                await healths[1].stop()
                spool.queue("hold", 6)
                fake_standbys(monkeypatch, [Standby("sql2", "startup", 0.0)])
                later = await wait_row(
                    hub,
                    "the report of the changed tower",
                    scanners_up=2,
                    queue_size=11,
                    replication_lag_s=None,
                )
                assert later["scanners_total"] == 3
                assert later["updated_at"] > first["updated_at"]
                assert sample(monitor, "mailtower_goc_status_failures_total") == 0.0

    asyncio.run(scenario())


def test_a_goc_that_is_down_is_a_gauge_and_a_log_then_catches_up(
    hub: Any, spool: Spool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    spool.queue("deferred", 2)
    spool.serve()
    fake_standbys(monkeypatch, [])

    async def scenario() -> None:
        async with tower_parts(hub.port, spool.port) as (settings, healths):
            monitor = Monitor(settings)
            async with running(monitor):
                await wait_row(hub, "the first report", scanners_up=3, queue_size=2)
                await wait_for(
                    lambda: sample(monitor, "mailtower_goc_status_up") == 1.0, WAIT_S, "gauge 1"
                )
                await asyncio.to_thread(hub.stop)
                try:
                    await wait_for(
                        lambda: sample(monitor, "mailtower_goc_status_up") == 0.0,
                        WAIT_S,
                        "mailtower_goc_status_up 0 with the GOC stopped",
                    )
                    # it keeps trying, and the other loops keep working: a scanner that dies
                    # now still leaves the pool
                    await healths[2].stop()
                    await wait_for(
                        lambda: not monitor.pool["s03"].enabled, WAIT_S, "s03 out of the pool"
                    )
                    await wait_for(
                        lambda: (sample(monitor, "mailtower_goc_status_failures_total") or 0) >= 5,
                        WAIT_S,
                        "five failed reports",
                    )
                    assert sample(monitor, "mailtower_goc_status_up") == 0.0
                finally:
                    await asyncio.to_thread(hub.start)
                # the kept connection died with the GOC: the monitor reconnects by itself
                await wait_row(hub, "the report after the GOC came back", scanners_up=2)
                await wait_for(
                    lambda: sample(monitor, "mailtower_goc_status_up") == 1.0,
                    WAIT_S,
                    "mailtower_goc_status_up 1 again",
                )

    with caplog.at_level(logging.INFO, logger="mailtower.monitor"):
        asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records]
    failed = [m for m in messages if "event=goc_status_failed" in m]
    assert failed, messages
    assert f"host=127.0.0.1 port={hub.port}" in failed[0]
    assert "error=" in failed[0]
    assert len(failed) == 1  # rate-limited: one line for five and more failures in < 60 s
    assert any("event=goc_status_ok" in m and "after_failures=" in m for m in messages)


def test_an_unreadable_relay_queue_skips_the_round_instead_of_reporting_zero(
    hub: Any, spool: Spool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    spool.queue("active", 3)
    spool.serve()
    fake_standbys(monkeypatch, [])

    async def scenario() -> None:
        async with tower_parts(hub.port, spool.port) as (settings, _):
            monitor = Monitor(settings)
            async with running(monitor):
                await wait_row(hub, "the first report", queue_size=3)
                await asyncio.to_thread(spool.stop)

                def skipped() -> float:
                    return sample(monitor, "mailtower_goc_status_skipped_total") or 0.0

                # rounds run one after the other: once one is skipped, no earlier one writes
                await wait_for(lambda: skipped() >= 1, WAIT_S, "a skipped round")
                reported = await row(hub)
                assert reported is not None
                await wait_for(lambda: skipped() >= 4, WAIT_S, "three more skipped rounds")
                still = await row(hub)
                assert still is not None
                # no row written while the queue is unknown (no false 0, no stale number)
                assert still["updated_at"] == reported["updated_at"]
                assert still["queue_size"] == 3
                assert sample(monitor, "mailtower_goc_status_up") == 1.0  # the GOC is fine

                spool.queue("deferred", 4)
                await asyncio.to_thread(spool.serve)
                await wait_row(hub, "the report once the exporter is back", queue_size=7)

    with caplog.at_level(logging.INFO, logger="mailtower.monitor"):
        asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records]
    skipped = [m for m in messages if "event=goc_status_skipped" in m]
    assert len(skipped) == 1, messages  # rate-limited
    assert "reason=relay_queue_unreadable relay=127.0.0.1:" in skipped[0]
    assert any("event=relay_queue_readable" in m for m in messages)


class TrackedWrites:
    """Wraps the monitor's GOC writer: which writes are running, how the finished ones ended."""

    def __init__(self, monitor: Monitor, monkeypatch: pytest.MonkeyPatch) -> None:
        writer = monitor.goc_writer
        assert writer is not None
        self._write = writer.write
        self._lock = threading.Lock()
        self.started = 0
        self.running = 0
        self.running_since = 0.0  # monotonic start of the latest write
        self.errors: list[str] = []
        monkeypatch.setattr(writer, "write", self.write)

    def write(self, status: TowerStatus) -> None:
        with self._lock:
            self.started += 1
            self.running += 1
            self.running_since = time.monotonic()
        try:
            self._write(status)
        except Exception as exc:
            self.errors.append(repr(exc))
            raise
        finally:
            with self._lock:
                self.running -= 1


def thaw(cluster: Any) -> None:
    for pid in cluster.pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def test_a_frozen_goc_is_given_up_on_and_caught_up_with(
    hub: Any, spool: Spool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A GOC host that hangs (TCP still acknowledged: no libpq timeout fires) fails the
    round after GOC_WRITE_TIMEOUT_S, and the stuck write is aborted, not left in its thread."""
    spool.serve()
    fake_standbys(monkeypatch, [])
    monkeypatch.setattr(service, "GOC_WRITE_TIMEOUT_S", 1.0)

    async def scenario() -> None:
        async with tower_parts(hub.port, spool.port) as (settings, healths):
            monitor = Monitor(settings)
            writes = TrackedWrites(monitor, monkeypatch)
            async with running(monitor):
                first = await wait_row(hub, "the first report", scanners_up=3)
                await asyncio.to_thread(hub.freeze)
                errors_before = len(writes.errors)
                try:
                    await wait_for(
                        lambda: sample(monitor, "mailtower_goc_status_up") == 0.0,
                        WAIT_S,
                        "mailtower_goc_status_up 0 with the GOC frozen",
                    )
                    # the write on the kept connection ended (aborted) though the GOC is frozen
                    await wait_for(
                        lambda: len(writes.errors) > errors_before,
                        WAIT_S,
                        "the stuck write to end",
                    )
                    await healths[0].stop()
                    await wait_for(
                        lambda: not monitor.pool["s01"].enabled, WAIT_S, "s01 out of the pool"
                    )
                finally:
                    await asyncio.to_thread(thaw, hub)
                later = await wait_row(hub, "the report after the thaw", scanners_up=2)
                assert later["updated_at"] > first["updated_at"]
                await wait_for(
                    lambda: sample(monitor, "mailtower_goc_status_up") == 1.0, WAIT_S, "gauge 1"
                )

    with caplog.at_level(logging.ERROR, logger="mailtower.monitor"):
        asyncio.run(scenario())
    failed = [r.getMessage() for r in caplog.records if "event=goc_status_failed" in r.getMessage()]
    assert failed and "no answer within 1s" in failed[0], failed


def test_stopping_while_the_goc_is_frozen_ends_the_write_too(
    hub: Any, spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool.serve()
    fake_standbys(monkeypatch, [])
    monkeypatch.setattr(service, "GOC_WRITE_TIMEOUT_S", 600.0)  # only the stop can end it

    async def scenario() -> None:
        async with tower_parts(hub.port, spool.port) as (settings, _):
            monitor = Monitor(settings)
            writes = TrackedWrites(monitor, monkeypatch)
            try:
                async with running(monitor):
                    await wait_row(hub, "the first report", scanners_up=3)
                    await asyncio.to_thread(hub.freeze)
                    # stuck: nothing completes on a frozen GOC (a write that was nearly done
                    # when it froze ends, and the next one gets stuck)
                    await wait_for(
                        lambda: writes.running == 1 and time.monotonic() - writes.running_since > 2,
                        WAIT_S,
                        "a write waiting on the frozen GOC",
                    )
                # running() returned: the monitor stopped; its thread must end as well, or
                # asyncio.run would wait for it at exit
                await wait_for(lambda: writes.running == 0, WAIT_S, "the stuck write to end")
                assert writes.errors
            finally:
                await asyncio.to_thread(thaw, hub)

    asyncio.run(scenario())


def test_a_wrong_password_is_a_failure_not_a_crash(hub: Any, spool: Spool) -> None:
    spool.serve()

    async def scenario() -> None:
        async with tower_parts(hub.port, spool.port) as (settings, _):
            data = settings.model_dump(mode="json")
            data["secrets"]["goc_status"] = "not-the-password-0123"
            monitor = Monitor(from_data(data))
            async with running(monitor):
                await wait_for(
                    lambda: (sample(monitor, "mailtower_goc_status_failures_total") or 0) >= 2,
                    WAIT_S,
                    "two failed reports",
                )
                assert sample(monitor, "mailtower_goc_status_up") == 0.0
                assert monitor.pool["s01"].healthy  # the health loop goes on
        assert await row(hub) is None

    asyncio.run(scenario())


def test_without_a_goc_there_is_no_loop_and_no_gauge() -> None:
    async def scenario() -> None:
        healths = await start_healths()
        haproxy = FakeHAProxy(dict(zip(NAMES, SCANNERS, strict=True)))
        await haproxy.start()
        monitor = Monitor(tower(healths[0].port, haproxy.port))
        assert monitor.settings.goc is None
        async with running(monitor):
            await wait_for(
                lambda: all(s.probed for s in monitor.pool.scanners), WAIT_S, "first probes"
            )
            names = {t.get_name() for t in asyncio.all_tasks()}
            assert "health" in names  # the loops are tasks named like this one would be
            assert "goc-status" not in names
            assert b"mailtower_goc_status" not in monitor.metrics.render()
        for h in healths:
            await h.stop()
        await haproxy.stop()

    asyncio.run(scenario())


def test_a_lasting_failure_is_logged_once_a_minute(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(service.time, "monotonic", lambda: clock[0])
    failures = service._FailureLog(every_s=60.0)
    logged = []
    for _ in range(30):  # a round every 5 s for 150 s
        logged.append(failures.failed())
        clock[0] += 5.0
    assert [i * 5 for i, yes in enumerate(logged) if yes] == [0, 60, 120]
    assert failures.recovered() == 30
    assert failures.failed()  # a new streak is logged at once
