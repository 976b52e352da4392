"""Health probes of the scanners: a minimal asyncio HTTP/1.0 client."""

from __future__ import annotations

import asyncio
import contextlib

HEALTH_PATH = "/health"


async def probe(host: str, port: int, timeout_s: float) -> bool:
    """GET /health; True only for a 200 within ``timeout_s`` (refused, timeout, other: False)."""
    try:
        return await asyncio.wait_for(_get_status(host, port), timeout_s) == 200
    except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
        return False


async def _get_status(host: str, port: int) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {HEALTH_PATH} HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
        await writer.drain()
        status_line = await reader.readline()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    parts = status_line.split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        raise ValueError(f"not an HTTP status line: {status_line[:80]!r}")
    return int(parts[1])
