"""scand's tiny HTTP/1.0 server: GET /health for the monitor, GET /metrics for Prometheus."""

from __future__ import annotations

import asyncio
import json
import logging

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mailtower.engines import EngineError
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
    scanner: Scanner, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
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
            status, doc = await health(scanner)
            ctype, body = "application/json", json.dumps(doc).encode() + b"\n"
        elif parts[1] == "/metrics":
            status, ctype = 200, CONTENT_TYPE_LATEST
            body = generate_latest(scanner.metrics.registry)
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


async def start_http(scanner: Scanner, host: str, port: int) -> asyncio.Server:
    """Serve /health and /metrics on ``host:port``."""
    return await asyncio.start_server(
        lambda r, w: _handle(scanner, r, w), host=host, port=port, reuse_address=True
    )
