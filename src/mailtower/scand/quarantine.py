"""scand's quarantine stores: SQL (a deployed tower) or a directory (a standalone scand).

``SqlQuarantineStore`` (``quarantine_store = "sql"``, docs/quarantine.md): a quarantined
message is a row of the tower's ``verdict_events`` with its bytes (``mailtower.quarantine``),
INSERTed on the primary and committed before ``write`` returns, so before scand answers the
relay 250; the row is also the message's verdict event (scand spools none for it). Any failure
(SQL down, the connect or statement timeout, a standby that answered) is a QuarantineError:
the message gets a 451 and stays with the relay; nothing is quarantined on the scanner alone.

``QuarantineStore`` (``quarantine_store = "directory"``): ``<root>/<id>.eml`` + ``<id>.json``,
ids sortable by time. The message is written first and its metadata second, each durably; the
metadata file is the commit mark, so a listed entry always has its message.

Both take the same ``meta`` (what scand knows of the message, see ``Scanner._quarantine_meta``)
and give the same quarantine ids; ``delete`` undoes a copy this scand wrote for a message it
then answered 451 (the retry quarantines it again).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from mailtower import quarantine as rows
from mailtower._fsio import fsync_dir, write_durable
from mailtower.customers.policy import DEFAULT as DEFAULT_POLICY
from mailtower.scand.errors import QuarantineError
from mailtower.settings import TowerSettings

log = logging.getLogger(__name__)

ID_RE = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{12}$")
# A message set aside (scand.server): the quarantine's verdict. verdict_events admits only the
# scan verdicts, so its row says "tempfail" with the quarantine id and this finding.
UNPROCESSABLE = "unprocessable"
UNPROCESSABLE_FINDING = {"engine": "scand", "name": "scand.unprocessable", "part": "message"}
# The SQL store's bounds: a write that cannot commit in about this long is a 451.
STATEMENT_TIMEOUT_MS = 5000
# What quarantine_meta keeps of scand's meta (the rest has columns of its own).
META_KEYS = ("reason", "anomalies", "relay_queue_id", "relay_arrival", "mail_options", "error")


def new_id(now: datetime | None = None) -> str:
    """A quarantine id such as ``20261126T190501Z-3f9a0c1b2d4e``; sorts by time."""
    now = now or datetime.now(UTC)
    return f"{now.astimezone(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(6)}"


@dataclass(frozen=True)
class Entry:
    """One quarantined message: its id, metadata and where its raw bytes are."""

    id: str
    meta: dict[str, Any]
    message_path: Path


class AnyQuarantineStore(Protocol):
    """What scand's Scanner needs of a quarantine store."""

    # True: a written copy is the message's verdict event (no event is spooled for it).
    records_events: bool

    def write(self, raw: bytes, meta: dict[str, Any]) -> str:
        """Store ``raw`` durably; its quarantine id. Raises OSError or QuarantineError."""
        ...

    def delete(self, qid: str) -> None:
        """Undo the copy ``qid`` this scand just wrote."""
        ...

    def close(self) -> None: ...


def from_settings(settings: TowerSettings) -> AnyQuarantineStore:
    """The store ``settings.quarantine_store`` names."""
    if settings.quarantine_store == "sql":
        return SqlQuarantineStore(sql_dsn(settings))
    return QuarantineStore(Path(settings.spool_dir) / "quarantine")


def sql_dsn(settings: TowerSettings) -> str:
    """The scanner's writable DSN (both SQL hosts, the read-write one chosen)."""
    return settings.sql_dsn("mailtower_scanner", settings.secret("sql_scanner"), writable=True)


class QuarantineStore:
    """Quarantined messages under one directory."""

    records_events = False

    def __init__(self, root: Path):
        self.root = Path(root)

    def close(self) -> None:
        pass

    def write(self, raw: bytes, meta: dict[str, Any], *, now: datetime | None = None) -> str:
        """Store ``raw`` and ``meta`` durably; return the new id."""
        self.root.mkdir(parents=True, exist_ok=True)
        now = now or datetime.now(UTC)
        qid = new_id(now)
        record = {
            "id": qid,
            "quarantined_at": now.astimezone(UTC).isoformat(),
            "size_bytes": len(raw),
            **meta,
        }
        write_durable(self.root / f"{qid}.eml", raw)
        write_durable(self.root / f"{qid}.json", json.dumps(record, indent=2).encode() + b"\n")
        return qid

    def list(self) -> list[Entry]:
        """Every complete entry, oldest first."""
        if not self.root.is_dir():
            return []
        ids = sorted(p.stem for p in self.root.glob("*.json") if ID_RE.match(p.stem))
        return [self.get(qid) for qid in ids]

    def get(self, qid: str) -> Entry:
        """The entry ``qid``; raise QuarantineError if it is malformed or absent."""
        if not ID_RE.match(qid):
            raise QuarantineError(f"{qid!r} is not a quarantine id (e.g. 20261126T190501Z-…)")
        meta_path = self.root / f"{qid}.json"
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError as exc:
            raise QuarantineError(f"no quarantined message {qid} in {self.root}") from exc
        return Entry(qid, meta, self.root / f"{qid}.eml")

    def mark_released(self, qid: str, *, at: datetime, by: str, relay_answer: str) -> Entry:
        """Record in ``qid``'s metadata that it was released; the message stays."""
        entry = self.get(qid)
        meta = {
            **entry.meta,
            "released_at": at.astimezone(UTC).isoformat(),
            "released_by": by,
            "release_relay_answer": relay_answer,
        }
        write_durable(self.root / f"{qid}.json", json.dumps(meta, indent=2).encode() + b"\n")
        return Entry(qid, meta, entry.message_path)

    def delete(self, qid: str) -> None:
        """Remove an entry (metadata first, so it never lists without its message)."""
        entry = self.get(qid)
        (self.root / f"{qid}.json").unlink()
        entry.message_path.unlink(missing_ok=True)
        fsync_dir(self.root)


def row_of(raw: bytes, meta: dict[str, Any], qid: str, now: datetime) -> rows.Quarantined:
    """The ``verdict_events`` row of a message scand quarantines as ``qid`` at ``now``."""
    envelope = meta.get("envelope") or {}
    verdict = str(meta.get("verdict", ""))
    findings = list(meta.get("findings") or [])
    quarantine_meta = {k: meta[k] for k in META_KEYS if meta.get(k) is not None}
    if verdict == UNPROCESSABLE:
        verdict, findings = "tempfail", [*findings, UNPROCESSABLE_FINDING]
        quarantine_meta["unprocessable"] = True
    days = int(meta.get("quarantine_days") or DEFAULT_POLICY.quarantine_days)
    return rows.Quarantined(
        event_id=uuid.uuid4(),
        quarantine_id=qid,
        tower=str(meta.get("tower", "")),
        scanner=str(meta.get("scanner", "")),
        scanned_at=now,
        verdict=verdict,
        sender=envelope.get("mail_from"),
        recipients=tuple(envelope.get("rcpt_tos") or ()),
        findings=tuple(findings),
        size_bytes=len(raw),
        message_id=meta.get("message_id"),
        customer_id=None,  # INSERT finds it by the customer's name
        subject=rows.subject_of(raw),
        expires_at=now + timedelta(days=days),
        quarantine_meta=quarantine_meta,
        message=raw,
    )


class SqlQuarantineStore:
    """Quarantined messages as rows of the tower's ``verdict_events`` (see the module's doc).

    One connection per process (a worker's scan threads take turns on it: quarantines are a
    small share of the mail and one INSERT each), opened on first use and again after any
    failure; the DSN names both SQL hosts and asks for the read-write one, so after a failover
    the next connection finds the new primary. A kept connection that turns out broken or
    read-only (the old primary, now a standby) is replaced once within the same write: the
    INSERT is idempotent (``ON CONFLICT (event_id) DO NOTHING``), so a commit whose answer was
    lost is not written twice."""

    records_events = True

    def __init__(self, dsn: str, *, statement_timeout_ms: int = STATEMENT_TIMEOUT_MS) -> None:
        self.dsn = dsn  # Scanner.reload sets the new one (used from the next connection)
        self.statement_timeout_ms = statement_timeout_ms
        self._conn: Any = None
        self._lock = threading.Lock()
        # What this process wrote lately: quarantine id → event id (``delete`` undoes by it).
        self._written: OrderedDict[str, uuid.UUID] = OrderedDict()

    def _connect(self) -> Any:
        import psycopg

        return psycopg.connect(
            self.dsn,
            autocommit=True,  # each statement commits before execute returns
            options=f"-c statement_timeout={self.statement_timeout_ms}",
            application_name="mailtower-scand-quarantine",
        )

    def _run(self, what: str, statement: Any) -> Any:
        """``statement(conn)`` on the kept connection (or a new one); QuarantineError if it
        cannot be done."""
        import psycopg

        with self._lock:
            for attempt in (0, 1):
                kept = self._conn is not None and not self._conn.closed
                try:
                    if not kept:
                        self._conn = self._connect()
                    return statement(self._conn)
                except psycopg.Error as exc:
                    stale = kept and (
                        self._conn.broken or isinstance(exc, psycopg.errors.ReadOnlySqlTransaction)
                    )
                    self._drop()
                    if stale and attempt == 0:
                        log.warning("event=quarantine_sql_reconnect what=%s error=%r", what, exc)
                        continue
                    raise QuarantineError(f"quarantine in SQL: {what} failed: {exc}") from exc
            raise AssertionError("unreachable")

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception as exc:  # closing a broken connection: nothing more to do
                log.debug("event=quarantine_sql_close_failed error=%r", exc)
            self._conn = None

    def write(self, raw: bytes, meta: dict[str, Any], *, now: datetime | None = None) -> str:
        """INSERT the message's row and commit it; its quarantine id. QuarantineError if the
        row is not committed (the caller answers 451)."""
        now = now or datetime.now(UTC)
        qid = new_id(now)
        row = row_of(raw, meta, qid, now)
        customer = meta.get("customer")
        self._run("insert", lambda conn: rows.insert(conn, row, customer=customer))
        with self._lock:
            self._written[qid] = row.event_id
            while len(self._written) > 10_000:
                self._written.popitem(last=False)
        return qid

    def delete(self, qid: str) -> None:
        """Undo ``qid``, written by this process for a message it then answered 451, by the
        tower's ``mt_quarantine_undo`` (the scanner role may delete nothing else: only a
        quarantine row younger than an hour). The row may already have reached the GOC (its
        publication is INSERT only): there it stays, a copy of a message that was retried."""
        with self._lock:
            event_id = self._written.pop(qid, None)
        if event_id is None:
            raise QuarantineError(f"quarantine id {qid} was not written by this scand lately")

        def undo(conn: Any) -> bool:
            return bool(conn.execute("SELECT mt_quarantine_undo(%s)", (event_id,)).fetchone()[0])

        if not self._run("undo", undo):
            raise QuarantineError(f"quarantine row {event_id} ({qid}) was not there to undo")

    def close(self) -> None:
        with self._lock:
            self._drop()
