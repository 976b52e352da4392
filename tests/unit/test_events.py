"""The verdict event spool and its flusher (with in-memory sinks)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
from scand_fakes import wait_until

from mailtower.scand.events import Event, EventSpool, Flusher


def _event(n: int = 0) -> Event:
    return Event(
        tower="tower-t",
        scanner="10.0.0.5",
        verdict="clean",
        sender="a@example.org",
        recipients=[f"r{n}@example.com"],
        size_bytes=100 + n,
        message_id=f"<m{n}@x>",
    )


class MemorySink:
    """Commits by appending; checks that spool files still exist while it runs."""

    def __init__(self, spool: EventSpool):
        self.spool = spool
        self.rows: list[Event] = []
        self.fail = False
        self.files_during_call: list[int] = []

    def __call__(self, events: Sequence[Event]) -> None:
        self.files_during_call.append(self.spool.count())
        if self.fail:
            raise ConnectionError("sql down")
        self.rows.extend(events)


def test_event_round_trips(tmp_path: Path) -> None:
    spool = EventSpool(tmp_path)
    event = _event()
    path = spool.add(event)
    assert path.name == f"{event.event_id}.json"
    assert Event.from_json(path.read_bytes()) == event


def test_flush_deletes_only_after_commit(tmp_path: Path) -> None:
    spool = EventSpool(tmp_path)
    events = [_event(n) for n in range(3)]
    for e in events:
        spool.add(e)
    sink = MemorySink(spool)
    assert Flusher(spool, sink).flush_once() == 3
    assert sink.files_during_call == [3]  # nothing deleted before the sink returned
    assert sorted(e.event_id for e in sink.rows) == sorted(e.event_id for e in events)
    assert spool.count() == 0


def test_sql_down_keeps_spool_and_it_survives_a_restart(tmp_path: Path) -> None:
    spool = EventSpool(tmp_path)
    event = _event()
    spool.add(event)
    sink = MemorySink(spool)
    sink.fail = True
    with pytest.raises(ConnectionError):
        Flusher(spool, sink).flush_once()
    assert spool.count() == 1
    # A new process (new spool object on the same directory) finds and flushes it.
    reborn = EventSpool(tmp_path)
    sink2 = MemorySink(reborn)
    assert Flusher(reborn, sink2).flush_once() == 1
    assert [e.event_id for e in sink2.rows] == [event.event_id]
    assert reborn.count() == 0


def test_unreadable_file_is_set_aside(tmp_path: Path) -> None:
    spool = EventSpool(tmp_path)
    (tmp_path / "broken.json").write_text("{not json")
    spool.add(_event())
    sink = MemorySink(spool)
    assert Flusher(spool, sink).flush_once() == 1
    assert (tmp_path / "broken.bad").exists()
    assert spool.count() == 0


def test_background_flusher_retries_until_sql_is_back(tmp_path: Path) -> None:
    spool = EventSpool(tmp_path)
    sink = MemorySink(spool)
    sink.fail = True
    flusher = Flusher(spool, sink, min_backoff_s=0.01, max_backoff_s=0.05, idle_s=0.05)
    flusher.start()
    try:
        spool.add(_event(1))
        wait_until(lambda: len(sink.files_during_call) >= 3, 5, "three failed flushes")
        assert spool.count() == 1 and sink.rows == []
        sink.fail = False
        wait_until(lambda: spool.count() == 0, 5, "the spool to drain")
        assert len(sink.rows) == 1
        spool.add(_event(2))  # new events are picked up promptly
        wait_until(lambda: len(sink.rows) == 2, 5, "the second event")
    finally:
        flusher.stop()


def test_reflush_after_crash_between_commit_and_delete_is_harmless(tmp_path: Path) -> None:
    """A crash after commit but before unlink re-sends the event; the sink sees one id twice.

    PostgresSink's ON CONFLICT (event_id) DO NOTHING turns that into one row; here the
    in-memory stand-in for that is a dict keyed by event_id.
    """
    spool = EventSpool(tmp_path)
    spool.add(_event())
    table: dict[str, Event] = {}
    crash = threading.Event()

    def sink(events: Sequence[Event]) -> None:
        for e in events:
            table.setdefault(e.event_id, e)
        if not crash.is_set():
            crash.set()
            raise RuntimeError("killed after commit")

    flusher = Flusher(spool, sink)
    with pytest.raises(RuntimeError):
        flusher.flush_once()
    assert spool.count() == 1
    assert flusher.flush_once() == 1
    assert len(table) == 1 and spool.count() == 0
