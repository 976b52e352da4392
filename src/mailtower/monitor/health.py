"""Health probes of the scanners: a minimal asyncio HTTP/1.0 client."""

from __future__ import annotations

import asyncio
import contextlib
import json
from contextvars import ContextVar

HEALTH_PATH = "/health"
# check_detail's note of whether request() got a connection (the task wait_for runs it in
# shares the list)
_CONNECTED: ContextVar[list[bool] | None] = ContextVar("_CONNECTED", default=None)


async def probe(host: str, port: int, timeout_s: float) -> bool:
    """GET /health; True only for a 200 within ``timeout_s`` (refused, timeout, other: False)."""
    return (await check(host, port, timeout_s))[0]


async def check(host: str, port: int, timeout_s: float) -> tuple[bool, dict]:
    """GET /health: (True only for a 200 within ``timeout_s``, the JSON answer or {})."""
    ok, doc, _ = await check_detail(host, port, timeout_s)
    return ok, doc


async def check_detail(host: str, port: int, timeout_s: float) -> tuple[bool, dict, bool]:
    """As ``check``, and whether the scanner was *silent*: it accepted the connection but gave
    no answer within ``timeout_s`` (scand's process is there, its loop busy or stuck), unlike
    refused, unreachable or an answer saying it is not healthy."""
    connected: list[bool] = []
    token = _CONNECTED.set(connected)  # request() notes its connection there
    try:
        status, doc = await request(host, port, "GET", HEALTH_PATH, timeout_s=timeout_s)
    except TimeoutError:
        return False, {}, bool(connected)
    except (OSError, ValueError, asyncio.IncompleteReadError):
        return False, {}, False
    finally:
        _CONNECTED.reset(token)
    return status == 200, doc, False


async def request(
    host: str,
    port: int,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    timeout_s: float = 5.0,
) -> tuple[int, dict]:
    """One HTTP/1.0 request to scand; (status, JSON body or {}). Raises OSError, TimeoutError,
    ValueError on no answer or a broken one."""

    async def exchange() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(host, port)
        noted = _CONNECTED.get()
        if noted is not None:
            noted.append(True)
        try:
            head = f"{method} {path} HTTP/1.0\r\nHost: {host}:{port}\r\n"
            for name, value in (headers or {}).items():
                head += f"{name}: {value}\r\n"
            if method == "POST":
                head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            writer.write(head.encode() + b"\r\n" + body)
            await writer.drain()
            answer = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        status_line, _, rest = answer.partition(b"\r\n")
        parts = status_line.split()
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
            raise ValueError(f"not an HTTP status line: {status_line[:80]!r}")
        return int(parts[1]), rest.partition(b"\r\n\r\n")[2]

    status, payload = await asyncio.wait_for(exchange(), timeout_s)
    try:
        doc = json.loads(payload) if payload.strip() else {}
    except ValueError:
        doc = {"body": payload[:200].decode(errors="replace")}
    return status, doc if isinstance(doc, dict) else {"body": doc}
