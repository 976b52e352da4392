"""The monitor's loops: health probes, HAProxy reconciliation, SQL replication, the tower's
state to the GOC, the quarantine manager, HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST

from mailtower.goc.eye.status import TowerStatus, status_role
from mailtower.monitor import goc_status, health, http, replication
from mailtower.monitor.errors import HAProxyError, RelayQueueError
from mailtower.monitor.goc_status import GocStatusWriter
from mailtower.monitor.haproxy import RuntimeAPI
from mailtower.monitor.metrics import MonitorMetrics
from mailtower.monitor.pool import MAINT, READY, Pool, PoolMember, Transition
from mailtower.monitor.quarantine import QuarantineLoop, QuarantineManager
from mailtower.monitor.rollout import (
    CLAMAV_MIRROR_DIR,
    CLAMAV_STATE_DIR,
    MIRROR_DIR,
    ClamavRollout,
    Rollout,
)
from mailtower.monitor.rollout.stack import STATE_DIR as STACK_STATE_DIR
from mailtower.monitor.rollout.stack import StackRollout
from mailtower.settings import TowerSettings

log = logging.getLogger("mailtower.monitor")

RECONCILE_INTERVAL_S = 10.0  # catches a relay restart that lost the monitor's settings
SQL_INTERVAL_S = 5.0
RELAY_QUEUE_TIMEOUT_S = 3.0  # the relay exporter counts a few directories: quick when up
# A GOC write still running after this (connect_timeout 3 s + statement_timeout 3 s) waits on
# a GOC that does not answer at all: it is aborted and counted as failed. Until it has ended,
# the next rounds fail at once, so threads never pile up.
GOC_WRITE_TIMEOUT_S = 10.0
FAILURE_LOG_EVERY_S = 60.0  # a failure that lasts is logged once a minute, not every round


class _FailureLog:
    """Rate limit for a lasting failure: log the first one, then one every ``every_s``."""

    def __init__(self, every_s: float = FAILURE_LOG_EVERY_S) -> None:
        self.every_s = every_s
        self.failures = 0  # in the current streak
        self._next_log = 0.0

    def failed(self) -> bool:
        """Count a failure; True when this one should be logged."""
        self.failures += 1
        now = time.monotonic()
        if self.failures == 1 or now >= self._next_log:
            self._next_log = now + self.every_s
            return True
        return False

    def recovered(self) -> int:
        """End the streak; return how many failures it had (0: there was none)."""
        failures, self.failures = self.failures, 0
        return failures


class Monitor:
    """One tower's monitor; ``run`` until ``stop`` is set."""

    def __init__(
        self,
        settings: TowerSettings,
        *,
        reconcile_interval_s: float = RECONCILE_INTERVAL_S,
        sql_interval_s: float = SQL_INTERVAL_S,
        rules_mirror: Path = MIRROR_DIR,
        clamav_mirror: Path = CLAMAV_MIRROR_DIR,
        clamav_state: Path = CLAMAV_STATE_DIR,
        stack_state: Path = STACK_STATE_DIR,
    ) -> None:
        self.settings = settings
        limits = settings.limits
        self.pool = Pool(
            [(settings.scanner_name(i), str(ip)) for i, ip in enumerate(settings.hosts.scanners)],
            fail_after=limits.fail_after,
            recover_after=limits.recover_after,
            now=time.time(),
        )
        self.metrics = MonitorMetrics(
            self.pool,
            goc=settings.goc is not None,
            bundles=settings.bundles is not None,
            clamav=list(settings.clamav.databases) if settings.clamav is not None else None,
        )
        self.haproxy = RuntimeAPI(str(settings.hosts.relay), settings.ports.haproxy_runtime)
        # Held by whoever changes a scanner's HAProxy state, so the health loop and a rule
        # update never undo each other (the update sets the pool's ``held`` under it).
        self.haproxy_lock = asyncio.Lock()
        # Held by a rollout (rule bundles, ClamAV databases) while it has update windows open:
        # the two share the pool's capacity (batch, spare), so never both at once.
        self.windows_lock = asyncio.Lock()
        self.reconcile_interval_s = reconcile_interval_s
        self.sql_interval_s = sql_interval_s
        self.http_port: int | None = None  # the bound port, once serving
        self._reconcile_due = 0.0  # monotonic time of the next reconciliation
        self._sql_ok: bool | None = None
        # Largest replay lag of the last SQL check; None: no standby streams, or no answer.
        self.replication_lag_s: float | None = None
        self.goc_writer: GocStatusWriter | None = None
        if settings.goc is not None:
            password = settings.secrets.goc_status
            if password is None:  # TowerSettings refuses this; keeps mypy informed
                raise ValueError("settings.goc needs secrets.goc_status")
            self.goc_writer = GocStatusWriter(
                settings.goc_conninfo(status_role(settings.name), password)
            )
        self._goc_write: asyncio.Future[None] | None = None  # the write in its thread, if any
        self._goc_log = _FailureLog()
        self._relay_queue_log = _FailureLog()
        self.rollout: Rollout | None = None  # created in run(): it needs the event loop
        self.quarantine: QuarantineLoop | None = None  # likewise
        self.rules_mirror = rules_mirror
        self.clamav_rollout: ClamavRollout | None = None  # likewise
        self.clamav_mirror = clamav_mirror
        self.clamav_state = clamav_state
        # The rolling upgrade of scand: its windows need the canary secret (created in run()).
        self.upgrade: StackRollout | None = None
        self.stack_state = stack_state

    async def run(self, stop: asyncio.Event) -> None:
        """Serve HTTP and run the loops until ``stop`` is set."""
        server = await http.serve(self._handle_http, "0.0.0.0", self.settings.ports.monitor_http)
        self.http_port = server.sockets[0].getsockname()[1]
        log.info(
            "event=start scanners=%d relay=%s http_port=%d",
            len(self.pool.scanners),
            self.haproxy,
            self.http_port,
        )
        await self._adopt_haproxy_state()
        tasks = [
            asyncio.create_task(self._health_loop(stop), name="health"),
            asyncio.create_task(self._sql_loop(stop), name="sql"),
        ]
        if self.goc_writer is not None:
            tasks.append(asyncio.create_task(self._goc_loop(stop), name="goc-status"))
        # The tower side of the quarantine: the portal's requests, expiry, space, notices
        # (its blocking work in a thread of its own; a failure is logged, never fatal here).
        self.quarantine = QuarantineLoop(QuarantineManager(self.settings, self.metrics))
        tasks.append(asyncio.create_task(self.quarantine.run(stop), name="quarantine"))
        if self.settings.bundles is not None:
            self.rollout = Rollout(self, self.rules_mirror)
            tasks.append(asyncio.create_task(self.rollout.run(stop), name="rollout"))
        if self.settings.clamav is not None:
            rules = self.rollout
            self.clamav_rollout = ClamavRollout(
                self,
                self.clamav_mirror,
                self.clamav_state,
                # the canary samples of the rule bundle a scanner runs, when there are bundles
                samples=rules.samples if rules is not None else None,
            )
            tasks.append(asyncio.create_task(self.clamav_rollout.run(stop), name="clamav"))
        if self.settings.secrets.canary is not None:
            self.upgrade = StackRollout(self, state_dir=self.stack_state)
            tasks.append(asyncio.create_task(self.upgrade.run(stop), name="upgrade"))
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            server.close()
            await server.wait_closed()
            log.info("event=stop")

    # -- health ----------------------------------------------------------------------------

    async def _health_loop(self, stop: asyncio.Event) -> None:
        interval = self.settings.limits.health_interval_s
        next_tick = time.monotonic()
        while not stop.is_set():
            await self.tick()
            # A fixed rate: a slow tick (HAProxy timing out) is followed at once by the next.
            next_tick = max(next_tick + interval, time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), next_tick - time.monotonic())

    async def tick(self) -> None:
        """Probe every scanner once, apply the transitions, reconcile HAProxy when due."""
        limits, port = self.settings.limits, self.settings.ports.scanner_http
        results = await asyncio.gather(
            *(
                health.check_detail(s.address, port, limits.health_timeout_s)
                for s in self.pool.scanners
            )
        )
        now = time.time()
        transitions: list[Transition] = []
        for s, (ok, doc, silent) in zip(self.pool.scanners, results, strict=True):
            self.metrics.scanner_up.labels(s.name, s.address).set(1 if ok else 0)
            s.silent = silent
            if doc:
                s.rules_bundle = doc.get("rules_bundle")
                s.stack, s.stack_installed = doc.get("stack"), doc.get("stack_installed")
                if self.settings.bundles is not None:
                    self.metrics.scanner_rules_bundle.labels(s.name).set(s.rules_bundle or 0)
                if self.settings.clamav is not None:
                    self._record_clamav(s, doc.get("clamav"))
            transition = self.pool.observe(s.name, ok, now)
            if transition is not None:
                transitions.append(transition)
        for t in transitions:
            self._record(t)
        async with self.haproxy_lock:
            for t in transitions:
                if self.pool[t.scanner].held:  # a rule update took it meanwhile
                    continue
                try:
                    await self.haproxy.set_state(t.scanner, t.to)
                    if t.to == "maint" and self.pool[t.scanner].silent:
                        # Alive but not answering in time: a scan of a large message holds
                        # a one-process scand. Cutting its sessions would not stop that scan,
                        # whose re-injection would then deliver the message a second time
                        # after the relay's retry; they finish, or the relay's own timeout
                        # (smtp_data_done_timeout) ends them.
                        log.warning(
                            "event=sessions_kept scanner=%s reason=%r",
                            t.scanner,
                            "accepts connections, no /health answer in time",
                        )
                    elif t.to == "maint":
                        await self.haproxy.shutdown_sessions(t.scanner)
                except HAProxyError as exc:
                    self._haproxy_failed(exc)
                    break  # the reconciliation below (retried every tick) applies the rest
        if time.monotonic() >= self._reconcile_due:
            await self.reconcile()

    def _record_clamav(self, s: PoolMember, running: object) -> None:
        """The ClamAV versions a scanner's health answer names ({db: version})."""
        assert self.settings.clamav is not None
        if isinstance(running, dict):
            s.clamav = {str(db): v for db, v in running.items() if isinstance(v, int)}
        else:  # a scand without the official databases: nothing it runs is known
            s.clamav = None
        for db in self.settings.clamav.databases:
            self.metrics.clamav_scanner_version.labels(s.name, db).set((s.clamav or {}).get(db, 0))
        if self.clamav_rollout is not None:
            self.metrics.clamav_behind.set(self.clamav_rollout.scanners_behind())

    def _record(self, t: Transition) -> None:
        self.metrics.transitions.labels(t.scanner, t.to).inc()
        self.metrics.scanner_enabled.labels(t.scanner).set(1 if t.to == READY else 0)
        first = "failed" if t.to == MAINT else "good"
        log.warning(
            "event=transition scanner=%s address=%s to=%s after_first_%s_probe_s=%.2f",
            t.scanner,
            t.address,
            t.to,
            first,
            t.after_s,
        )

    # -- HAProxy ---------------------------------------------------------------------------

    def _haproxy_failed(self, exc: HAProxyError) -> None:
        self.metrics.haproxy_errors.inc()
        log.error("event=haproxy_error relay=%s error=%r", self.haproxy, str(exc))
        self._reconcile_due = 0.0  # retry on the next tick, not in 10 s

    async def _adopt_haproxy_state(self) -> None:
        """At start, believe what HAProxy says, so a restarted monitor re-enables nothing."""
        try:
            states = await self.haproxy.servers_state()
        except HAProxyError as exc:
            self._haproxy_failed(exc)  # keep the default belief (ready); reconcile corrects
            return
        now = time.time()
        for s in self.pool.scanners:
            if s.name in states:
                self.pool.adopt(s.name, not states[s.name].in_maintenance, now)
                self.metrics.scanner_enabled.labels(s.name).set(1 if s.enabled else 0)
        self._reconcile_due = time.monotonic() + self.reconcile_interval_s

    async def reconcile(self) -> None:
        """Correct every server whose HAProxy admin state differs from the monitor's belief
        (a scanner in a rule update, or kept out after one, belongs in maintenance)."""
        async with self.haproxy_lock:
            await self._reconcile()

    async def _reconcile(self) -> None:
        try:
            states = await self.haproxy.servers_state()
            for s in self.pool.scanners:
                state = states.get(s.name)
                if state is None:
                    log.error(
                        "event=haproxy_missing_server relay=%s server=scanners/%s address=%s "
                        "hint='render the relay haproxy.cfg from the same settings'",
                        self.haproxy,
                        s.name,
                        s.address,
                    )
                    continue
                ready = s.enabled and not s.held
                if state.in_maintenance == ready:
                    target = READY if ready else MAINT
                    log.warning(
                        "event=reconcile scanner=%s address=%s haproxy_admin_state=%d set=%s",
                        s.name,
                        s.address,
                        state.admin_state,
                        target,
                    )
                    await self.haproxy.set_state(s.name, target)
        except HAProxyError as exc:
            self._haproxy_failed(exc)
            return
        self._reconcile_due = time.monotonic() + self.reconcile_interval_s

    # -- SQL -------------------------------------------------------------------------------

    async def _sql_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.check_sql()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.sql_interval_s)

    async def check_sql(self) -> None:
        s = self.settings
        dsn = s.sql_dsn("mailtower_monitor", s.secret("sql_monitor"))
        primary = str(s.sql_primary)
        try:
            standbys = await asyncio.to_thread(replication.query_standbys, dsn, primary)
        except Exception as exc:  # psycopg errors, DNS, anything: a metric, never a crash
            self.metrics.sql_up.set(0)
            self.replication_lag_s = None  # unknown now: an old value would look current
            if self._sql_ok is not False:
                log.error("event=sql_down host=%s port=%d error=%r", primary, s.ports.postgres, exc)
            self._sql_ok = False
            return
        self.metrics.sql_up.set(1)
        streaming = [sb for sb in standbys if sb.state == "streaming"]
        self.metrics.sql_streaming.set(len(streaming))
        lag = max((sb.lag_s for sb in standbys), default=0.0)
        self.metrics.sql_lag.set(lag)
        self.replication_lag_s = lag if streaming else None
        if self._sql_ok is not True:
            log.info("event=sql_up host=%s standbys_streaming=%d", primary, len(streaming))
        self._sql_ok = True

    # -- the tower's state to the GOC (VirusEye) ----------------------------------------------

    async def _goc_loop(self, stop: asyncio.Event) -> None:
        goc = self.settings.goc
        assert goc is not None and self.goc_writer is not None
        log.info(
            "event=goc_status_start host=%s port=%d interval_s=%g",
            goc.address,
            goc.port,
            goc.status_interval_s,
        )
        # The first report after one interval: the pool has been probed by then.
        next_tick = time.monotonic() + goc.status_interval_s
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.0, next_tick - time.monotonic()))
                if stop.is_set():
                    return
                await self.report_status()
                next_tick = max(next_tick + goc.status_interval_s, time.monotonic())
        finally:
            pending = self._goc_write
            if pending is not None and not pending.done():
                # Its thread must end, or asyncio.run would wait for it at exit.
                self.goc_writer.abort()
                pending.cancel()
            else:
                self.goc_writer.close()

    def tower_status(self, queue_size: int) -> TowerStatus:
        """The row VirusEye shows for this tower, as the monitor knows it now."""
        scanners = self.pool.scanners
        # in HAProxy's rotation and answering (or in a rule update): the scanners of the tower
        serving = [s for s in scanners if s.enabled and s.healthy]
        running = [s.rules_bundle or 0 for s in serving]
        target = self.rollout.state.target if self.rollout is not None else None
        return TowerStatus(
            tower=self.settings.name,
            scanners_up=sum(1 for s in serving if not s.held),
            scanners_total=len(scanners),
            queue_size=queue_size,
            replication_lag_s=self.replication_lag_s,
            rules_bundle=(min(running) or None) if running else None,
            rules_target=target,
            scanners_behind=sum(1 for v in running if target is not None and v != target),
            clamav=self.clamav_rollout.status() if self.clamav_rollout is not None else None,
        )

    async def report_status(self) -> bool:
        """Send the tower's state to the GOC once; False if skipped or failed (and logged)."""
        s, m = self.settings, self.metrics
        assert s.goc is not None
        relay, port = str(s.hosts.relay), s.ports.relay_exporter
        try:
            queued = await goc_status.read_queue_size(relay, port, RELAY_QUEUE_TIMEOUT_S)
        except RelayQueueError as exc:
            # queue_size is NOT NULL and a 0 would be a lie: no row this round; VirusEye
            # sees the row's updated_at age instead.
            m.goc_status_skipped.inc()
            if self._relay_queue_log.failed():
                log.error(
                    "event=goc_status_skipped reason=relay_queue_unreadable relay=%s:%d "
                    "failures=%d error=%r",
                    relay,
                    port,
                    self._relay_queue_log.failures,
                    str(exc),
                )
            return False
        if failures := self._relay_queue_log.recovered():
            log.info(
                "event=relay_queue_readable relay=%s:%d after_failures=%d", relay, port, failures
            )
        try:
            await self._write_goc(self.tower_status(queued))
        except Exception as exc:  # psycopg errors, DNS, timeouts: a metric and a log line
            m.goc_status_up.set(0)
            m.goc_status_failures.inc()
            if self._goc_log.failed():
                log.error(
                    "event=goc_status_failed host=%s port=%d failures=%d error=%r",
                    s.goc.address,
                    s.goc.port,
                    self._goc_log.failures,
                    str(exc) or type(exc).__name__,
                )
            return False
        m.goc_status_up.set(1)
        m.goc_status_last_success.set(time.time())
        if failures := self._goc_log.recovered():
            log.info(
                "event=goc_status_ok host=%s port=%d after_failures=%d",
                s.goc.address,
                s.goc.port,
                failures,
            )
        return True

    async def _write_goc(self, status: TowerStatus) -> None:
        writer = self.goc_writer
        assert writer is not None
        pending = self._goc_write
        if pending is not None and not pending.done():
            raise TimeoutError("the previous report is still waiting for the GOC")
        write = asyncio.ensure_future(asyncio.to_thread(writer.write, status))
        # Retrieved here even when nobody awaits it any more (timed out, or stopping).
        write.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._goc_write = write
        try:
            await asyncio.wait_for(asyncio.shield(write), GOC_WRITE_TIMEOUT_S)
        except TimeoutError:
            writer.abort()
            raise TimeoutError(f"no answer within {GOC_WRITE_TIMEOUT_S:g}s") from None

    # -- HTTP ------------------------------------------------------------------------------

    def pool_state(self) -> dict:
        return {
            "scanners": [
                {
                    "name": s.name,
                    "address": s.address,
                    "healthy": s.healthy,
                    "enabled": s.enabled,
                    "since": s.since,
                    "rules_bundle": s.rules_bundle,
                    "clamav": s.clamav,
                    "held": s.held,
                    "stack": s.stack,
                    "stack_installed": s.stack_installed,
                }
                for s in self.pool.scanners
            ],
            "rules": self.rollout.snapshot() if self.rollout is not None else None,
            "clamav": (self.clamav_rollout.snapshot() if self.clamav_rollout is not None else None),
            "upgrade": self.upgrade.snapshot() if self.upgrade is not None else None,
        }

    async def _handle_http(self, path: str) -> http.Response | None:
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, self.metrics.render()
        if path == "/pool":
            return 200, "application/json", json.dumps(self.pool_state()).encode() + b"\n"
        return None
