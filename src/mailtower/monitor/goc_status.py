"""The tower's state for VirusEye: the relay's queue size (read from the relay exporter) and
the blocking writer of ``tower_status`` rows at the GOC (the monitor runs it in a thread)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import Any

import psycopg
from prometheus_client.parser import text_string_to_metric_families

from mailtower.goc.eye.status import TowerStatus, upsert_tower_status
from mailtower.monitor.errors import RelayQueueError

QUEUE_METRIC = "mailtower_relay_queue_messages"  # mailtower.relay.exporter.QueueCollector
# Mail the relay accepted and has not delivered yet: being delivered, waiting for a retry, or
# held by the relay orderer for a customer whose server is down. incoming and maildrop are
# transient (seconds), so they are left out, as TowerStatus.queue_size documents.
COUNTED_QUEUES = ("active", "deferred", "hold")
REQUIRED_QUEUES = ("active", "deferred")  # without these the number would be a false low
MAX_METRICS_BYTES = 1 << 20

# libpq settings of the GOC connection, on top of settings.goc_conninfo (keywords win).
GOC_CONNECT: dict[str, Any] = {
    "connect_timeout": 3,  # a GOC that is down costs one round, not the next ones
    "options": "-c statement_timeout=3000",  # a GOC that is up but stuck (locks)
    # A vanished GOC host or network: unacknowledged data, or silence, ends the connection.
    "tcp_user_timeout": 10_000,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 3,
    "keepalives_count": 3,
}


def queue_size(metrics_text: str) -> int:
    """Messages waiting in the relay (COUNTED_QUEUES) in the relay exporter's metrics text."""
    counts: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(metrics_text):
            if family.name != QUEUE_METRIC:
                continue
            for sample in family.samples:
                if sample.name == QUEUE_METRIC and "queue" in sample.labels:
                    counts[sample.labels["queue"]] = sample.value
    except ValueError as exc:
        raise RelayQueueError(f"unparseable metrics: {exc}") from exc
    missing = [q for q in REQUIRED_QUEUES if q not in counts]
    if missing:
        raise RelayQueueError(f"no {QUEUE_METRIC} for queue {', '.join(missing)}")
    return int(sum(counts.get(q, 0.0) for q in COUNTED_QUEUES))


async def read_queue_size(host: str, port: int, timeout_s: float) -> int:
    """GET the relay exporter's /metrics and count the queued messages."""
    try:
        body = await asyncio.wait_for(_get_metrics(host, port), timeout_s)
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        raise RelayQueueError(f"{type(exc).__name__}: {exc}") from exc
    return queue_size(body.decode("utf-8", errors="replace"))


async def _get_metrics(host: str, port: int) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET /metrics HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
        await writer.drain()
        response = b""
        while chunk := await reader.read(65536):  # HTTP/1.0: the body ends at EOF
            response += chunk
            if len(response) > MAX_METRICS_BYTES:
                raise RelayQueueError(f"metrics larger than {MAX_METRICS_BYTES} bytes")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0]
    parts = status_line.split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        raise RelayQueueError(f"not an HTTP response: {status_line[:80]!r}")
    if parts[1] != b"200":
        raise RelayQueueError(f"HTTP {parts[1].decode(errors='replace')} from /metrics")
    return body


class GocStatusWriter:
    """Upserts the tower's row at the GOC over one kept connection. Blocking; one thread at
    a time; after any error the connection is dropped and the next ``write`` reconnects."""

    def __init__(self, conninfo: str) -> None:
        self.conninfo = conninfo
        self._conn: psycopg.Connection[Any] | None = None

    def write(self, status: TowerStatus) -> None:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(self.conninfo, autocommit=True, **GOC_CONNECT)
            upsert_tower_status(self._conn, status)
        except BaseException:
            self.close()
            raise

    def abort(self) -> None:
        """Unblock a ``write`` waiting on a GOC that does not answer; callable from any thread.

        A frozen GOC host still acknowledges TCP, so no libpq timeout ends the wait: shutting
        the socket down does (through a duplicate descriptor, so libpq's own is never closed
        under it). The write then fails and the next one reconnects.
        """
        conn = self._conn
        if conn is None or conn.closed:
            return  # not connected, or connecting (bounded by connect_timeout)
        # suppress: the connection may be going away meanwhile
        with (
            contextlib.suppress(Exception),
            socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock,
        ):
            sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
