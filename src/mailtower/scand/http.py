"""scand's tiny HTTP/1.0 server: GET /health for the monitor, GET /metrics for Prometheus.

It serves a :class:`Source`: one in-process :class:`Scanner` (tests, a single process), or
the supervisor of scand's worker processes (mailtower.scand.workers), which answers for all.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mailtower.engines import Engine, EngineError

if TYPE_CHECKING:
    from mailtower.scand.server import Scanner

log = logging.getLogger(__name__)

_REQUEST_TIMEOUT_S = 5.0
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


class Source:
    """What /health and /metrics report (a base class, not a protocol: a Scanner has a
    ``health`` method of another kind)."""

    async def health(self) -> tuple[int, dict[str, object]]:
        raise NotImplementedError

    def metrics(self) -> bytes:
        raise NotImplementedError


class ScannerSource(Source):
    """One in-process scanner."""

    def __init__(self, scanner: Scanner) -> None:
        self.scanner = scanner

    async def health(self) -> tuple[int, dict[str, object]]:
        return await health(self.scanner)

    def metrics(self) -> bytes:
        return generate_latest(self.scanner.metrics.registry)


async def engine_versions(engines: Sequence[Engine], timeout: float) -> dict[str, str]:
    """Each engine's version (``health``); raises EngineError or TimeoutError."""

    def versions() -> dict[str, str]:
        return {e.name: e.health(timeout) for e in engines}

    # A thread of its own: a busy scan pool must not make a healthy scanner look dead.
    # Engines enforce the timeout themselves; the margin only guards against a stuck one.
    return await asyncio.wait_for(asyncio.to_thread(versions), timeout + 1.0)


async def health(scanner: Scanner) -> tuple[int, dict[str, object]]:
    """200 + engine versions when every engine answers within ``health_timeout_s``, else 503.
    Every answer names the rule bundle version in use (``rules_bundle``; null: shipped rules)."""
    bundle = scanner.rules_version
    if scanner.draining:
        return 503, {
            "status": "draining",
            "reason": "scand is shutting down",
            "rules_bundle": bundle,
            "in_flight": scanner.in_flight,
        }
    timeout = scanner.settings.limits.health_timeout_s
    try:
        # A thread of its own: a busy scan pool must not make a healthy scanner look dead.
        # Engines enforce the timeout themselves; the margin only guards against a stuck one.
        versions = await asyncio.wait_for(asyncio.to_thread(scanner.health), timeout + 1.0)
    except TimeoutError:
        return 503, {
            "status": "fail",
            "reason": f"engine did not answer within {timeout}s",
            "rules_bundle": bundle,
            "in_flight": scanner.in_flight,
        }
    except EngineError as exc:
        return 503, {
            "status": "fail",
            "reason": str(exc),
            "rules_bundle": bundle,
            "in_flight": scanner.in_flight,
        }
    return 200, {"status": "ok", **versions, "rules_bundle": bundle, "in_flight": scanner.in_flight}


async def _handle(
    source: Source, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        request = await asyncio.wait_for(reader.readline(), _REQUEST_TIMEOUT_S)
        while True:  # headers are not needed; read past them
            line = await asyncio.wait_for(reader.readline(), _REQUEST_TIMEOUT_S)
            if line in (b"\r\n", b"\n", b""):
                break
        parts = request.decode("latin-1").split()
        if len(parts) < 2:
            status, ctype, body = 400, "text/plain", b"bad request\n"
        elif parts[0] != "GET":
            status, ctype, body = 405, "text/plain", b"only GET\n"
        elif parts[1] == "/health":
            status, doc = await source.health()
            ctype, body = "application/json", json.dumps(doc).encode() + b"\n"
        elif parts[1] == "/metrics":
            status, ctype = 200, CONTENT_TYPE_LATEST
            body = source.metrics()
        else:
            status, ctype, body = 404, "text/plain", b"not found\n"
        head = (
            f"HTTP/1.0 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()
    except (TimeoutError, ConnectionError) as exc:
        log.debug("event=http_client_error error=%r", exc)
    finally:
        writer.close()


async def start_http(
    scanner: Scanner | Source, host: str, port: int, *, sock: socket.socket | None = None
) -> asyncio.Server:
    """Serve /health and /metrics of ``scanner`` (a Scanner or any Source) on ``host:port``,
    or on the bound socket ``sock``."""
    source = scanner if isinstance(scanner, Source) else ScannerSource(scanner)
    if sock is not None:
        return await asyncio.start_server(lambda r, w: _handle(source, r, w), sock=sock)
    return await asyncio.start_server(
        lambda r, w: _handle(source, r, w), host=host, port=port, reuse_address=True
    )
