"""``mailtower-scand``: run the scanner daemon."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
import threading
from pathlib import Path

from mailtower import settings as settings_mod
from mailtower.events import Flusher, PostgresSink
from mailtower.scand.http import start_http
from mailtower.scand.server import Handler, Scanner, start_smtp
from mailtower.settings import SettingsError, TowerSettings

log = logging.getLogger("mailtower.scand")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mailtower-scand", description=__doc__)
    parser.add_argument(
        "--settings",
        type=Path,
        default=settings_mod.SETTINGS_PATH,
        help="tower settings JSON (default: %(default)s)",
    )
    parser.add_argument(
        "--host-address",
        default=None,
        help="this scanner's address, used in headers and events "
        "(default: the local address that routes to the relay)",
    )
    parser.add_argument(
        "--listen",
        default="0.0.0.0",
        help="address to listen on for SMTP and HTTP (default: %(default)s)",
    )
    parser.add_argument("--log-level", default="INFO", help="(default: %(default)s)")
    return parser.parse_args(argv)


def default_host_address(settings: TowerSettings) -> str:
    """The local address that routes to the relay (no packet is sent: UDP connect)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((str(settings.hosts.relay), settings.ports.reinject))
            return str(sock.getsockname()[0])
        except OSError:
            return socket.gethostname()


_reload_lock = threading.Lock()


def reload(scanner: Scanner, settings_path: Path) -> bool:
    """SIGHUP: load the settings again and rebuild the pipeline, with the rules the rule bundle
    ``current`` names now; messages in flight finish with the old one. On any error the old
    pipeline stays (False). Blocking: runs in a thread."""
    with _reload_lock:  # two quick SIGHUPs run one after the other; the last sees the newest
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


async def serve(
    settings_path: Path, settings: TowerSettings, host_address: str, listen: str
) -> int:
    """Run until SIGTERM/SIGINT; finish the messages in flight; return the exit status."""
    scanner = Scanner(settings, host_address=host_address)
    sink = PostgresSink(
        settings.sql_dsn("mailtower_scanner", settings.secrets.sql_scanner, writable=True)
    )
    flusher = Flusher(scanner.events, sink)
    flusher.start()
    handler = Handler(scanner)
    smtp_server = await start_smtp(handler, listen, settings.ports.filter)
    http_server = await start_http(scanner, listen, settings.ports.scanner_http)
    log.info(
        "event=started tower=%s scanner=%s smtp=%s:%d http=%s:%d engines=%s relay=%s:%d "
        "rules_bundle=%s",
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

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_sighup() -> None:
        # Compiling the rules takes a while: in a thread, so SMTP and /health keep answering.
        loop.run_in_executor(None, reload, scanner, settings_path)

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_sighup)

    await stop.wait()
    log.info("event=stopping in_flight=%d", scanner.in_flight)
    scanner.draining = True  # new DATA gets 451, /health says draining
    smtp_server.close()  # stop accepting
    limits = scanner.settings.limits
    # A scan ends by the pipeline's deadline, or one engine timeout after it at the latest.
    grace = scanner.pipeline.deadline_s + limits.engine_timeout_s + limits.reinject_timeout_s + 5
    try:
        await asyncio.wait_for(handler.idle.wait(), grace)
    except TimeoutError:
        # Unanswered messages stay with the relay, which retries them: nothing is lost.
        log.error("event=stop_grace_expired in_flight=%d grace_s=%.0f", scanner.in_flight, grace)
    http_server.close()
    await asyncio.to_thread(flusher.stop)  # joins the thread: not on the event loop
    sink.close()
    scanner.executor.shutdown(wait=False, cancel_futures=True)
    log.info("event=stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )
    # aiosmtpd logs every SMTP command at INFO: several journal lines per message, which on a
    # busy scanner costs more CPU in journald than the scan. Its warnings and errors still show.
    logging.getLogger("mail.log").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        settings = settings_mod.load(args.settings)
    except SettingsError as exc:
        log.error("event=settings_invalid error=%r", str(exc))
        return 2
    host_address = args.host_address or default_host_address(settings)
    return asyncio.run(serve(args.settings, settings, host_address, args.listen))


if __name__ == "__main__":
    sys.exit(main())
