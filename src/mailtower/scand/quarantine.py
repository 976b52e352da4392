"""The durable quarantine store: ``<root>/<id>.eml`` + ``<id>.json``, ids sortable by time.

The message is written first and its metadata second, each durably; the metadata file is the
commit mark, so a listed entry always has its message.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mailtower._fsio import fsync_dir, write_durable
from mailtower.scand.errors import QuarantineError

ID_RE = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{12}$")


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


class QuarantineStore:
    """Quarantined messages under one directory."""

    def __init__(self, root: Path):
        self.root = Path(root)

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
