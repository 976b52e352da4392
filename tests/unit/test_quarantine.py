"""The durable quarantine store."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailtower.scand.errors import QuarantineError
from mailtower.scand.quarantine import ID_RE, QuarantineStore, new_id


def test_write_then_get(tmp_path: Path) -> None:
    store = QuarantineStore(tmp_path / "q")
    raw = b"Subject: bad\r\n\r\npayload\r\n"
    qid = store.write(raw, {"findings": [{"engine": "test", "name": "X"}]})
    assert ID_RE.match(qid)
    entry = store.get(qid)
    assert entry.message_path.read_bytes() == raw
    assert entry.meta["size_bytes"] == len(raw)
    assert entry.meta["findings"] == [{"engine": "test", "name": "X"}]
    assert entry.meta["id"] == qid
    # No temp files left behind.
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == [f"{qid}.eml", f"{qid}.json"]


def test_ids_sort_by_time() -> None:
    early = new_id(datetime(2026, 11, 26, 19, 5, 1, tzinfo=UTC))
    late = new_id(datetime(2026, 11, 26, 19, 5, 2, tzinfo=UTC))
    assert early.startswith("20261126T190501Z-")
    assert sorted([late, early]) == [early, late]
    assert new_id() != new_id()


def test_list_oldest_first_and_ignores_incomplete(tmp_path: Path) -> None:
    store = QuarantineStore(tmp_path)
    second = store.write(b"2", {}, now=datetime(2026, 1, 2, tzinfo=UTC))
    first = store.write(b"1", {}, now=datetime(2026, 1, 1, tzinfo=UTC))
    # A crash between the message and its metadata leaves an .eml alone: not listed.
    (tmp_path / "20260103T000000Z-aaaaaaaaaaaa.eml").write_bytes(b"3")
    assert [e.id for e in store.list()] == [first, second]


def test_get_rejects_bad_and_unknown_ids(tmp_path: Path) -> None:
    store = QuarantineStore(tmp_path)
    with pytest.raises(QuarantineError, match="not a quarantine id"):
        store.get("../../etc/passwd")
    with pytest.raises(QuarantineError, match="no quarantined message"):
        store.get("20260101T000000Z-000000000000")


def test_list_of_missing_dir_is_empty(tmp_path: Path) -> None:
    assert QuarantineStore(tmp_path / "absent").list() == []


def test_write_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    QuarantineStore(tmp_path).write(b"x", {})
    assert len(synced) == 4  # message, its directory, metadata, its directory


def test_delete(tmp_path: Path) -> None:
    store = QuarantineStore(tmp_path)
    qid = store.write(b"x", {})
    store.delete(qid)
    assert store.list() == []
    assert list(tmp_path.iterdir()) == []
