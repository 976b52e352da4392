"""Verdict events: spooled on the scanner, flushed to PostgreSQL in the background.

Scanning only ever writes to the local spool (fast, always available). A flusher thread moves
spooled events into ``verdict_events`` and deletes a spool file only after the transaction that
inserted it committed; ``ON CONFLICT (event_id) DO NOTHING`` makes a re-flush harmless.

A spooled event is written atomically but not flushed to disk: it survives scand being killed
(the kernel holds it), not a power cut of the scanner before the kernel wrote it back (up to
about 30 s of events). The message itself is never at that risk: it was re-injected or its
quarantine copy fsynced before the relay got its 250. An fsync per event cost the scanner
about a tenth of its time per message (benchmark profile, docs/benchmarks.md).
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mailtower._fsio import fsync_dir, write_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """One row of ``verdict_events``."""

    tower: str
    scanner: str
    verdict: str
    sender: str | None
    recipients: list[str]
    size_bytes: int
    message_id: str | None = None
    findings: list[dict[str, Any]] = field(default_factory=list)
    quarantine_id: str | None = None
    scanned_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    event_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Event:
        return cls(**json.loads(data))


# A sink stores a batch of events and returns only once they are committed.
Sink = Callable[[Sequence[Event]], None]


class EventSpool:
    """Events waiting for SQL: ``<dir>/<event_id>.json``, each written atomically."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.added = threading.Event()  # wakes the flusher

    def add(self, event: Event) -> Path:
        path = self.directory / f"{event.event_id}.json"
        write_atomic(path, event.to_json())
        self.added.set()
        return path

    def pending(self) -> list[Path]:
        """Spooled event files, oldest first."""
        paths = [p for p in self.directory.glob("*.json") if not p.name.startswith(".")]
        return sorted(paths, key=_mtime)

    def count(self) -> int:
        return len(self.pending())


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


class Flusher:
    """Moves spooled events into a sink; on failure keeps them and retries with backoff."""

    def __init__(
        self,
        spool: EventSpool,
        sink: Sink,
        *,
        batch_size: int = 500,
        min_backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        idle_s: float = 5.0,
    ):
        self.spool = spool
        self.sink = sink
        self.batch_size = batch_size
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self.idle_s = idle_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def flush_once(self) -> int:
        """Flush one batch; return how many events were committed. Raises what the sink raises."""
        paths = self.spool.pending()[: self.batch_size]
        events: list[Event] = []
        kept: list[Path] = []
        for path in paths:
            try:
                events.append(Event.from_json(path.read_bytes()))
                kept.append(path)
            except FileNotFoundError:
                continue
            except (ValueError, TypeError) as exc:
                bad = path.with_suffix(".bad")
                log.error("event=spool_unreadable file=%s error=%r moved_to=%s", path, exc, bad)
                path.rename(bad)
        if not events:
            return 0
        self.sink(events)  # returns only after commit
        for path in kept:
            path.unlink(missing_ok=True)
        fsync_dir(self.spool.directory)
        return len(events)

    def run(self) -> None:
        """Flush until stopped; SQL down → keep spooling, back off, retry."""
        backoff = self.min_backoff_s
        while not self._stop.is_set():
            self.spool.added.clear()
            try:
                flushed = self.flush_once()
            except Exception as exc:
                log.warning(
                    "event=flush_failed spooled=%d retry_in_s=%.1f error=%r",
                    self.spool.count(),
                    backoff,
                    exc,
                )
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            backoff = self.min_backoff_s
            if flushed:
                log.debug("event=flushed count=%d", flushed)
                if flushed == self.batch_size:
                    continue  # more waiting
            # Sleep until a new event is spooled (or the idle period passes).
            self.spool.added.wait(self.idle_s)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="event-flusher", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self.spool.added.set()
        if self._thread is not None:
            self._thread.join(timeout_s)


_INSERT = """
INSERT INTO verdict_events (event_id, tower, scanner, scanned_at, verdict, message_id,
                            sender, recipients, findings, quarantine_id, size_bytes)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (event_id) DO NOTHING
"""


class PostgresSink:
    """Inserts events into ``verdict_events``; one transaction per batch."""

    def __init__(self, dsn: str):
        self.dsn = dsn
        self._conn: Any = None

    def __call__(self, events: Sequence[Event]) -> None:
        import psycopg
        from psycopg.types.json import Jsonb

        rows = [
            (
                uuid.UUID(e.event_id),
                e.tower,
                e.scanner,
                datetime.fromisoformat(e.scanned_at),
                e.verdict,
                e.message_id,
                e.sender,
                e.recipients,
                Jsonb(e.findings),
                e.quarantine_id,
                e.size_bytes,
            )
            for e in events
        ]
        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(self.dsn, autocommit=True)
            with self._conn.transaction(), self._conn.cursor() as cur:
                cur.executemany(_INSERT, rows)
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None
