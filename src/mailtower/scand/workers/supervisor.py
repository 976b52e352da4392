"""The supervisor: the parent of scand's worker processes (see mailtower.scand.workers).

It binds the filter port once and starts the workers (``python -m mailtower.scand --worker
…``), which inherit the listening socket. It

- restarts a worker that dies (with a growing delay if it keeps dying);
- forwards SIGHUP (reload) to every worker, and SIGTERM/SIGINT as a graceful stop: each
  worker answers 451 to new messages and finishes those in flight, then exits;
- serves /health (engines, every worker, the oldest rule bundle any worker runs) and /metrics
  (the workers' metrics summed, with prometheus_client's multiprocess mode);
- flushes the shared event spool to SQL;
- polls SQL for the customers' policies and writes the snapshot file the workers read
  (mailtower.scand.policies).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from mailtower import settings as settings_mod
from mailtower.scand.errors import ApplyError
from mailtower.scand.events import EventSpool, Flusher, PostgresSink
from mailtower.scand.http import Source, engine_versions, start_http
from mailtower.scand.policies import Poller, PollerCollector
from mailtower.scand.workers.protocol import (
    MULTIPROC_ENV,
    WorkerSpec,
    parse_status,
    worker_concurrency,
)
from mailtower.scanning import engines as engines_mod
from mailtower.scanning.errors import EngineError
from mailtower.settings import TowerSettings

log = logging.getLogger("mailtower.scand")

# A worker that dies sooner than this after its start is "crash-looping": wait longer each time.
_STABLE_S = 10.0
_RESTART_MIN_S = 0.5
_RESTART_MAX_S = 30.0
# How long a restarted supervisor retries binding the port a dying worker may still hold.
_BIND_RETRY_S = 10.0


def listen_socket(host: str, port: int) -> socket.socket:
    """The filter port's listening socket, inherited by every worker. A worker of a killed
    supervisor may hold the port for a moment: retry for a while before giving up."""
    deadline = time.monotonic() + _BIND_RETRY_S
    while True:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(socket.SOMAXCONN)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@dataclass
class _Worker:
    """One worker slot: the process running in it now, and what it reported."""

    slot: int
    pid: int | None = None
    ready: bool = False
    rules_bundle: int | None = None
    started: float = 0.0
    restarts: int = 0
    # A SIGHUP came while the worker was starting (before its handler was in place, where
    # SIGHUP would kill it): sent once it is ready.
    reload_pending: bool = False
    process: asyncio.subprocess.Process | None = field(default=None, repr=False)


class _WorkerMetrics(Collector):
    """The workers' metrics, summed (prometheus_client's multiprocess files), skipping a file
    a worker is creating this very moment (empty: prometheus_client would fail on it)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def collect(self) -> Any:
        files = []
        for file in self.path.glob("*.db"):
            with contextlib.suppress(FileNotFoundError):
                if file.stat().st_size >= 8:
                    files.append(str(file))
        return multiprocess.MultiProcessCollector.merge(files, accumulate=True)


class _SupervisorCollector(Collector):
    """What only the supervisor knows: the shared event spool and its workers."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Any:
        sup = self.supervisor
        yield GaugeMetricFamily(
            "mailtower_events_spooled", "Verdict events waiting for SQL", value=sup.spool.count()
        )
        yield GaugeMetricFamily(
            "mailtower_scand_workers_ready",
            "scand worker processes ready to scan",
            value=sum(1 for w in sup.workers if w.ready),
        )
        yield GaugeMetricFamily(
            "mailtower_scand_workers_configured",
            "scand worker processes configured",
            value=len(sup.workers),
        )
        yield CounterMetricFamily(
            "mailtower_scand_worker_restarts",
            "Times a worker process died and was started again, since scand started",
            value=sum(w.restarts for w in sup.workers),
        )


class Supervisor(Source):
    """The parent of scand's worker processes (see the module's doc)."""

    def __init__(
        self,
        settings_path: Path,
        settings: TowerSettings,
        *,
        host_address: str,
        listen: str,
        workers: int,
        log_level: str,
    ) -> None:
        super().__init__()
        self.settings_path = settings_path
        self.settings = settings
        self.host_address = host_address
        self.listen = listen
        self.log_level = log_level
        self.workers = [_Worker(slot) for slot in range(workers)]
        self.concurrency = worker_concurrency(settings, workers)
        self.engines = engines_mod.from_settings(settings)  # for /health
        self.spool = EventSpool(Path(settings.spool_dir) / "events")
        self.draining = False
        self.stopping = asyncio.Event()
        self.metrics_dir = Path(os.environ[MULTIPROC_ENV])
        self.registry = CollectorRegistry()
        self.registry.register(_WorkerMetrics(self.metrics_dir))
        self.registry.register(_SupervisorCollector(self))
        self.poller = Poller(settings)
        self.registry.register(PollerCollector(self.poller))
        self._reload_lock = threading.Lock()
        self.sock: socket.socket | None = None

    # -- the Source of /health, /metrics and /rules

    def current_settings(self) -> TowerSettings:
        return self.settings

    async def reload_rules(self, version: int | None) -> None:
        """Reload every worker (as SIGHUP does) and wait until each ready one reports
        ``version``; ApplyError after ``bundles.apply_timeout_s``."""
        await self.reload()
        bundles = self.settings.bundles
        timeout = bundles.apply_timeout_s if bundles else 120.0
        deadline = time.monotonic() + timeout
        while True:
            ready = [w for w in self.workers if w.ready]
            if ready and all(w.rules_bundle == version for w in ready):
                return
            if time.monotonic() > deadline:
                behind = [w.pid for w in ready if w.rules_bundle != version]
                raise ApplyError(
                    f"scand workers {behind or 'none ready'} do not scan with bundle "
                    f"{version} after {timeout:.0f} s (see their reload_failed log lines)"
                )
            await asyncio.sleep(0.1)

    def metrics(self) -> bytes:
        return generate_latest(self.registry)

    def _in_flight(self) -> int | None:
        try:
            value = self.registry.get_sample_value("mailtower_in_flight")
        except Exception as exc:  # a metrics file in a state we cannot read: not a health issue
            log.warning("event=metrics_unreadable error=%r", exc)
            return None
        return int(value or 0)

    def _rules_bundle(self) -> int | None:
        """The oldest rule bundle a ready worker runs (None: the shipped rules, or none ready)."""
        versions = [w.rules_bundle or 0 for w in self.workers if w.ready]
        oldest = min(versions, default=0)
        return oldest or None

    async def health(self) -> tuple[int, dict[str, object]]:
        """200 when at least one worker is ready and every engine answers; else 503."""
        ready = sum(1 for w in self.workers if w.ready)
        doc: dict[str, object] = {
            "rules_bundle": self._rules_bundle(),
            "in_flight": self._in_flight(),
            "workers": {
                "configured": len(self.workers),
                "ready": ready,
                "processes": [
                    {"pid": w.pid, "ready": w.ready, "rules_bundle": w.rules_bundle}
                    for w in self.workers
                ],
            },
        }
        if self.draining:
            return 503, {"status": "draining", "reason": "scand is shutting down", **doc}
        if not ready:
            return 503, {"status": "fail", "reason": "no scand worker is ready", **doc}
        timeout = self.settings.limits.health_timeout_s
        try:
            versions = await engine_versions(self.engines, timeout)
        except TimeoutError:
            reason = f"engine did not answer within {timeout}s"
            return 503, {"status": "fail", "reason": reason, **doc}
        except EngineError as exc:
            return 503, {"status": "fail", "reason": str(exc), **doc}
        return 200, {"status": "ok", **versions, **doc}

    # -- running

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT, then stop the workers gracefully; the exit status."""
        settings = self.settings
        self.sock = listen_socket(self.listen, settings.ports.filter)
        sink = PostgresSink(
            settings.sql_dsn("mailtower_scanner", settings.secret("sql_scanner"), writable=True)
        )
        flusher = Flusher(self.spool, sink)
        flusher.start()
        self.poller.start()
        http_server = await start_http(self, self.listen, settings.ports.scanner_http)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        log.info(
            "event=started tower=%s scanner=%s smtp=%s:%d http=%s:%d workers=%d "
            "concurrency_per_worker=%d relay=%s:%d",
            settings.name,
            self.host_address,
            self.listen,
            settings.ports.filter,
            self.listen,
            settings.ports.scanner_http,
            len(self.workers),
            self.concurrency,
            settings.hosts.relay,
            settings.ports.reinject,
        )
        tasks = [asyncio.create_task(self._keep_running(w)) for w in self.workers]
        await self.stopping.wait()
        log.info("event=stopping in_flight=%s", self._in_flight())
        self.draining = True  # /health says draining; each worker answers 451 to new DATA
        for worker in self.workers:
            self._signal(worker, signal.SIGTERM)
        limits = self.settings.limits
        # A worker's own grace (its scans end by the pipeline deadline, one more engine
        # timeout, then re-injection: serve_worker) and a margin; systemd's TimeoutStopSec
        # (mailtower-scand.service.j2) is 5 s longer.
        grace = limits.engine_timeout_s * 2 + 30 + limits.reinject_timeout_s + 10
        done, pending = await asyncio.wait(tasks, timeout=grace)
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                # Unanswered messages stay with the relay, which retries them.
                log.error("event=worker_stop_grace_expired pid=%s", worker.pid)
                self._signal(worker, signal.SIGKILL)
        if pending:
            await asyncio.wait(pending, timeout=5)
        self.sock.close()
        http_server.close()
        await asyncio.to_thread(flusher.stop)
        await asyncio.to_thread(self.poller.stop)
        sink.close()
        log.info("event=stopped")
        return 0

    def _signal(self, worker: _Worker, signum: int) -> None:
        process = worker.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)

    async def _keep_running(self, worker: _Worker) -> None:
        """Run a worker in this slot until scand stops; start it again when it dies."""
        delay = _RESTART_MIN_S
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                code = await self._run_once(worker)
            except Exception as exc:  # e.g. out of file descriptors: try again later
                log.error("event=worker_start_failed slot=%d error=%r", worker.slot, exc)
                code = None
            if self.stopping.is_set():
                return
            lived = time.monotonic() - started
            delay = _RESTART_MIN_S if lived > _STABLE_S else min(delay * 2, _RESTART_MAX_S)
            worker.restarts += 1
            log.error(
                "event=worker_died slot=%d pid=%s exit=%s lived_s=%.1f restart_in_s=%.1f",
                worker.slot,
                worker.pid,
                code,
                lived,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)

    async def _run_once(self, worker: _Worker) -> int | None:
        assert self.sock is not None
        status_read, status_write = os.pipe()
        listen_fd = self.sock.fileno()
        argv = [
            sys.executable,
            "-m",
            "mailtower.scand",
            "--settings",
            str(self.settings_path),
            "--host-address",
            self.host_address,
            "--log-level",
            self.log_level,
            "--worker",
            WorkerSpec(listen_fd, status_write, os.getpid(), self.concurrency).arg(),
        ]
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, pass_fds=(listen_fd, status_write)
            )
        except BaseException:
            os.close(status_read)
            raise
        finally:
            os.close(status_write)
        worker.process, worker.pid, worker.ready = process, process.pid, False
        worker.reload_pending = False  # a new worker loads the settings and rules of now
        worker.rules_bundle, worker.started = None, time.monotonic()
        reader = await self._status_reader(status_read)
        status_task = asyncio.create_task(self._read_status(worker, reader))
        code = await process.wait()
        worker.ready = False
        await asyncio.wait([status_task], timeout=1)
        status_task.cancel()
        # Its live gauges (in flight, rule bundle) must no longer count; its counters still do.
        multiprocess.mark_process_dead(process.pid, str(self.metrics_dir))
        return code

    async def _status_reader(self, fd: int) -> asyncio.StreamReader:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        pipe = os.fdopen(fd, "rb", buffering=0)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
        return reader

    async def _read_status(self, worker: _Worker, reader: asyncio.StreamReader) -> None:
        """A worker's status lines (JSON): ready, and the rule bundle after each reload."""
        while line := await reader.readline():
            try:
                status = parse_status(line)
            except ValueError:
                log.warning("event=worker_status_unreadable pid=%s line=%r", worker.pid, line)
                continue
            if "rules_bundle" in status:
                worker.rules_bundle = status["rules_bundle"]
            if status.get("ready"):
                worker.ready = True
                if worker.reload_pending:
                    worker.reload_pending = False
                    self._signal(worker, signal.SIGHUP)

    async def reload(self) -> None:
        """SIGHUP: reload this process's settings (for /health), then every worker's."""

        def load() -> None:
            with self._reload_lock:
                try:
                    new = settings_mod.load(self.settings_path)
                    engines = engines_mod.from_settings(new)
                except Exception as exc:  # the workers keep their pipelines too (they check)
                    log.error("event=reload_failed process=supervisor error=%r", exc)
                    return
                if (new.limits.scan_workers, new.limits.scan_concurrency) != (
                    self.settings.limits.scan_workers,
                    self.settings.limits.scan_concurrency,
                ):
                    log.warning(
                        "event=reload_workers_changed action='restart scand to apply new "
                        "scan_workers or scan_concurrency'"
                    )
                self.settings, self.engines = new, engines

        await asyncio.to_thread(load)
        for worker in self.workers:
            if worker.ready:
                self._signal(worker, signal.SIGHUP)
            else:
                worker.reload_pending = True


def supervise(
    settings_path: Path,
    settings: TowerSettings,
    *,
    host_address: str,
    listen: str,
    workers: int,
    log_level: str,
) -> int:
    """Run scand as a supervisor of ``workers`` worker processes (blocking); exit status."""
    _remove_stale_metrics_dirs()
    metrics_dir = tempfile.mkdtemp(prefix=f"{_METRICS_PREFIX}{os.getpid()}-")
    os.environ[MULTIPROC_ENV] = metrics_dir  # inherited by the workers; fresh, so empty
    try:
        supervisor = Supervisor(
            settings_path,
            settings,
            host_address=host_address,
            listen=listen,
            workers=workers,
            log_level=log_level,
        )
        return asyncio.run(supervisor.run())
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


_METRICS_PREFIX = "mailtower-scand-metrics-"


def _remove_stale_metrics_dirs() -> None:
    """Remove the metrics directories of supervisors that are gone (killed with SIGKILL, they
    could not clean up; under systemd PrivateTmp does it anyway)."""
    for path in Path(tempfile.gettempdir()).glob(f"{_METRICS_PREFIX}*-*"):
        pid = path.name[len(_METRICS_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(path, ignore_errors=True)
