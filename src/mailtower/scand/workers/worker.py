"""What runs in each scand worker process, and scand as one process (``scan_workers`` = 1).

A worker is a fresh interpreter (``python -m mailtower.scand --worker …``) with its own event
loop, pipeline and scan threads (its share of ``limits.scan_concurrency``), answering the relay
exactly as a single scand does (server.py): 250 only after re-injection or a durable quarantine
copy (in SQL, each worker with its own connection: scand.quarantine). It tells the supervisor
on its status pipe when it is ready and which rule bundle it runs after each reload
(protocol.py), and asks the kernel to kill it when the supervisor dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mailtower import settings as settings_mod
from mailtower.scand.events import Flusher, PostgresSink
from mailtower.scand.http import ScannerSource, start_http
from mailtower.scand.workers.protocol import WorkerSpec, status_line
from mailtower.settings import TowerSettings

if TYPE_CHECKING:
    from mailtower.scand.server import Handler, Scanner

log = logging.getLogger("mailtower.scand")

_PR_SET_PDEATHSIG = 1


def reload(scanner: Scanner, settings_path: Path) -> bool:
    """SIGHUP: load the settings again and rebuild the pipeline, with the rules the rule bundle
    ``current`` names now; messages in flight finish with the old one. On any error the old
    pipeline stays (False). Blocking: runs in a thread."""
    with scanner.reload_lock:  # two quick SIGHUPs run one after the other; the last sees the newest
        try:
            new = settings_mod.load(settings_path)
            scanner.reload(new)  # builds the new pipeline (rules compiled) before swapping
        except Exception as exc:  # bad settings or rules: keep scanning with the old pipeline
            log.error("event=reload_failed settings=%s error=%r keeping=old", settings_path, exc)
            return False
    log.info(
        "event=reloaded settings=%s engines=%s rules_bundle=%s",
        settings_path,
        ",".join(e.name for e in scanner.pipeline.engines),
        scanner.rules_version or "shipped",
    )
    return True


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies; exit now if it died already."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


class _Status:
    """The worker's end of its status pipe to the supervisor."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send(self, **status: object) -> None:
        try:
            os.write(self.fd, status_line(**status))  # one short write: atomic
        except OSError as exc:  # the supervisor is gone; PR_SET_PDEATHSIG ends this worker
            log.warning("event=worker_status_failed error=%r", exc)


async def serve_worker(
    settings_path: Path,
    settings: TowerSettings,
    *,
    host_address: str,
    listen_fd: int,
    status_fd: int,
    concurrency: int,
) -> int:
    """One worker: scan what arrives on the inherited socket until SIGTERM, then finish the
    messages in flight; the exit status."""
    from mailtower.scand.server import Handler, Metrics, Scanner, start_smtp

    status = _Status(status_fd)
    scanner = Scanner(
        settings,
        host_address=host_address,
        metrics=Metrics(spool_gauge=False),
        concurrency=concurrency,
    )
    handler = Handler(scanner)
    sock = socket.socket(fileno=listen_fd)
    smtp_server = await start_smtp(handler, None, None, sock=sock)

    def reloaded() -> None:
        status.send(rules_bundle=scanner.rules_version)

    status.send(ready=True, rules_bundle=scanner.rules_version)
    log.info(
        "event=worker_started pid=%d concurrency=%d engines=%s rules_bundle=%s",
        os.getpid(),
        concurrency,
        ",".join(e.name for e in scanner.pipeline.engines),
        scanner.rules_version or "shipped",
    )
    await _scan_until_stopped(scanner, handler, smtp_server, settings_path, reloaded)
    log.info("event=worker_stopped pid=%d", os.getpid())
    return 0


async def _scan_until_stopped(
    scanner: Scanner,
    handler: Handler,
    smtp_server: asyncio.Server,
    settings_path: Path,
    reloaded: Callable[[], None] = lambda: None,
) -> None:
    """Serve until SIGTERM/SIGINT (SIGHUP: reload, then ``reloaded()``), then answer 451 to
    new messages and let those in flight finish."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    async def on_sighup() -> None:
        # Compiling the rules takes a while: in a thread, so SMTP keeps answering.
        await loop.run_in_executor(None, reload, scanner, settings_path)
        reloaded()

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(on_sighup()))
    await stop.wait()
    log.info("event=stopping in_flight=%d", scanner.in_flight)
    scanner.draining = True  # new DATA gets 451
    smtp_server.close()  # stop accepting (other workers may still)
    limits = scanner.settings.limits
    # A scan ends by the pipeline's deadline, or one engine timeout after it at the latest.
    grace = scanner.pipeline.deadline_s + limits.engine_timeout_s + limits.reinject_timeout_s + 5
    try:
        await asyncio.wait_for(handler.idle.wait(), grace)
    except TimeoutError:
        # Unanswered messages stay with the relay, which retries them: nothing is lost.
        log.error("event=stop_grace_expired in_flight=%d grace_s=%.0f", scanner.in_flight, grace)
    scanner.executor.shutdown(wait=False, cancel_futures=True)
    await asyncio.to_thread(scanner.reinjector.close)  # QUIT to the relay's kept connections
    if scanner.in_flight == 0:  # else a scan thread may still be writing its quarantine row
        await asyncio.to_thread(scanner.quarantine.close)


async def serve_single(
    settings_path: Path, settings: TowerSettings, *, host_address: str, listen: str
) -> int:
    """scand as one process (``limits.scan_workers`` = 1): no supervisor, its own metrics,
    /health and event flusher — the smallest footprint, for scanners with one core or little
    memory. Runs until SIGTERM/SIGINT and finishes the messages in flight."""
    from mailtower.scand.policies import Poller, PollerCollector
    from mailtower.scand.server import Handler, Scanner, start_smtp

    scanner = Scanner(settings, host_address=host_address)
    # The customers' policies: the first round before the first message (no snapshot yet
    # and SQL down: 451 until it answers).
    poller = Poller(settings)
    scanner.metrics.registry.register(PollerCollector(poller))
    await asyncio.to_thread(poller.poll_once)
    poller.start()
    sink = PostgresSink(
        settings.sql_dsn("mailtower_scanner", settings.secret("sql_scanner"), writable=True)
    )
    flusher = Flusher(scanner.events, sink)
    flusher.start()
    handler = Handler(scanner)
    smtp_server = await start_smtp(handler, listen, settings.ports.filter)
    http_server = await start_http(
        ScannerSource(scanner, settings_path), listen, settings.ports.scanner_http
    )
    log.info(
        "event=started tower=%s scanner=%s smtp=%s:%d http=%s:%d workers=1 engines=%s "
        "relay=%s:%d rules_bundle=%s",
        settings.name,
        host_address,
        listen,
        settings.ports.filter,
        listen,
        settings.ports.scanner_http,
        ",".join(e.name for e in scanner.pipeline.engines),
        settings.hosts.relay,
        settings.ports.reinject,
        scanner.rules_version or "shipped",
    )
    await _scan_until_stopped(scanner, handler, smtp_server, settings_path)
    http_server.close()
    await asyncio.to_thread(flusher.stop)  # joins the thread: not on the event loop
    await asyncio.to_thread(poller.stop)
    sink.close()
    log.info("event=stopped")
    return 0


def worker_main(settings_path: Path, host_address: str, spec: str) -> int:
    """``--worker LISTEN_FD,STATUS_FD,PARENT_PID,CONCURRENCY`` (set by the supervisor)."""
    worker = WorkerSpec.parse(spec)
    die_with_parent(worker.parent_pid)
    settings = settings_mod.load(settings_path)
    return asyncio.run(
        serve_worker(
            settings_path,
            settings,
            host_address=host_address,
            listen_fd=worker.listen_fd,
            status_fd=worker.status_fd,
            concurrency=worker.concurrency,
        )
    )
