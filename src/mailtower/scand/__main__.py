"""``mailtower-scand``: run the scanner daemon (a supervisor and its worker processes, see
mailtower.scand.workers)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
from pathlib import Path

from mailtower import settings as settings_mod
from mailtower.errors import SettingsError
from mailtower.scand import workers
from mailtower.scand.workers import reload
from mailtower.settings import TowerSettings

__all__ = ["default_host_address", "main", "reload"]

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
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (default: the settings' limits.scan_workers; 0: one per CPU; "
        "1: a single process, no supervisor)",
    )
    # Set by the supervisor when it starts a worker (LISTEN_FD,STATUS_FD,PARENT_PID,CONCURRENCY).
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def default_host_address(settings: TowerSettings) -> str:
    """The local address that routes to the relay (no packet is sent: UDP connect)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((str(settings.hosts.relay), settings.ports.reinject))
            return str(sock.getsockname()[0])
        except OSError:
            return socket.gethostname()


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s level=%(levelname)s pid=%(process)d logger=%(name)s %(message)s",
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
    if args.worker is not None:
        return workers.worker_main(args.settings, host_address, args.worker)
    if args.workers is not None and args.workers < 0:
        log.error("event=usage error='--workers must be 0 (one per CPU) or more'")
        return 2
    count = workers.worker_count(settings, args.workers)
    if count == 1:  # one process does it all: no supervisor to pay for
        return asyncio.run(
            workers.serve_single(
                args.settings, settings, host_address=host_address, listen=args.listen
            )
        )
    return workers.supervise(
        args.settings,
        settings,
        host_address=host_address,
        listen=args.listen,
        workers=count,
        log_level=args.log_level,
    )


if __name__ == "__main__":
    sys.exit(main())
