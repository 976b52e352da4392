"""The floor of the scanner bench: a content filter that scans nothing (bench only).

It does what mailtower-scand must do for every message besides scanning, with scand's own
code: receive SMTP with scand's ``FilterSMTP`` (aiosmtpd), optionally send the raw message to
clamd with scand's ``ClamdEngine`` (one INSTREAM on a pooled session), and re-inject it with
scand's ``Reinjector`` (kept connections). Its workers and threads are scand's defaults. What
it costs per message is the least any filter of this design costs, before its first scan;
``scanner_vs_amavis.py --floor`` runs it beside the two filters.

    python tests/bench/floor_filter.py SETTINGS.json PORT [--clamd SOCKET]

Never deployed, never a product path: it answers 250 to everything it could re-inject.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

from mailtower.scand.errors import ReinjectError
from mailtower.scand.reinject import Reinjector
from mailtower.scand.smtp_data import FilterSMTP
from mailtower.scanning.engines.clamd import ClamdEngine
from mailtower.settings import TowerSettings


class FloorHandler:
    def __init__(self, settings: TowerSettings, clamd: ClamdEngine | None, threads: int):
        self.settings = settings
        self.clamd = clamd
        self.executor = ThreadPoolExecutor(threads)
        self.reinjector = Reinjector(keep=threads)

    def _pass(self, raw: bytes, mail_from: str, rcpt_tos: list[str]) -> str:
        if self.clamd is not None:
            self.clamd.scan(raw)
        try:
            self.reinjector.send(
                self.settings, raw, mail_from, rcpt_tos, header=b"X-Floor: not scanned\r\n"
            )
        except ReinjectError as exc:
            return f"451 4.3.0 {exc}"
        return "250 2.0.0 Ok: passed"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        loop = asyncio.get_running_loop()
        call = functools.partial(
            self._pass,
            envelope.original_content or b"",
            envelope.mail_from or "<>",
            list(envelope.rcpt_tos),
        )
        return await loop.run_in_executor(self.executor, call)


def serve(sock: socket.socket, handler: FloorHandler) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()

        def factory() -> SMTP:
            return FilterSMTP(
                handler,
                # scand's own limits (scand/server.py start_smtp)
                data_size_limit=handler.settings.limits.filter_message_bytes,
                line_length_limit=handler.settings.limits.filter_line_length,
                command_size_limit=handler.settings.limits.filter_command_bytes,
                enable_SMTPUTF8=True,
                hostname="floor.bench.test",
                ident="floor",
            )

        await loop.create_server(factory, sock=sock)
        await asyncio.Event().wait()

    asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("settings", type=Path)
    parser.add_argument("port", type=int)
    parser.add_argument("--clamd", help="clamd's socket: INSTREAM every message there")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)  # aiosmtpd's per-command lines off, as in scand
    settings = TowerSettings.model_validate_json(args.settings.read_text())
    limits = settings.limits
    workers = limits.scan_workers or os.cpu_count() or 1
    # IPPROTO_TCP named, as scand's workers have it: asyncio sets TCP_NODELAY on accepted
    # connections only when the listening socket says TCP (with proto 0 every multi-line
    # reply, EHLO's, waits 40 ms for a delayed ACK).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(socket.SOMAXCONN)
    for _ in range(workers - 1):
        if os.fork() == 0:
            break
    clamd = ClamdEngine(args.clamd, timeout_s=limits.engine_timeout_s) if args.clamd else None
    serve(sock, FloorHandler(settings, clamd, limits.scan_concurrency))


if __name__ == "__main__":
    main()
