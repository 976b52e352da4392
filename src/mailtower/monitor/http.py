"""A tiny asyncio HTTP/1.0 server: GET only, one request per connection."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

Response = tuple[int, str, bytes]  # status, content type, body
Handler = Callable[[str], Awaitable[Response | None]]  # path → response, None = 404

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
_READ_TIMEOUT_S = 5.0


async def serve(handler: Handler, host: str, port: int) -> asyncio.Server:
    """Start serving; the caller closes the returned server."""

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            response = await asyncio.wait_for(_respond(reader, handler), _READ_TIMEOUT_S)
            status, ctype, body = response
            head = (
                f"HTTP/1.0 {status} {_REASONS.get(status, '')}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            log.debug("event=http_client_error error=%r", exc)
        except Exception:
            log.exception("event=http_handler_error")
        finally:
            writer.close()

    return await asyncio.start_server(on_connection, host, port)


async def _respond(reader: asyncio.StreamReader, handler: Handler) -> Response:
    request_line = (await reader.readline()).decode("latin-1")
    while (await reader.readline()).strip():  # skip the headers
        pass
    parts = request_line.split()
    if len(parts) < 2:
        return 400, "text/plain", b"bad request\n"
    method, target = parts[0], parts[1]
    if method != "GET":
        return 405, "text/plain", b"only GET\n"
    response = await handler(target.split("?", 1)[0])
    return response if response is not None else (404, "text/plain", b"not found\n")
