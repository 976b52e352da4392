"""scand's re-injection over kept-open connections (``reinject.Reinjector``), against a real
SMTP server (aiosmtpd) standing in for the relay's re-injection listener."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from hypothesis import given, settings
from hypothesis import strategies as st
from scand_fakes import SinkHandler, free_port, make_settings, wait_until

from mailtower.reinject import ReinjectError, Reinjector, dot_stuffed
from mailtower.settings import TowerSettings

RAW = b"From: a@example.org\r\nTo: b@example.com\r\nSubject: s\r\n\r\nbody\r\n"
HEADER = b"X-Mailtower-Verdict: clean\r\n"


@dataclass
class CountingSink(SinkHandler):
    """Also records which SMTP session carried each message."""

    sessions: list[int] = field(default_factory=list)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        answer = await super().handle_DATA(server, session, envelope)
        self.sessions.append(id(session))
        return answer


class Relay:
    def __init__(self) -> None:
        self.port = free_port()
        self.handler = CountingSink()
        self.controller: Controller | None = None
        self.start()

    def start(self) -> None:
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def restart(self) -> None:
        """Stop (closing every connection, as a relay restart or idle timeout does), start."""
        assert self.controller is not None
        self.controller.stop()
        self.start()


@pytest.fixture
def relay() -> Iterator[Relay]:
    r = Relay()
    try:
        yield r
    finally:
        assert r.controller is not None
        r.controller.stop()


def _settings(tmp_path: Path, relay: Relay) -> TowerSettings:
    return make_settings(tmp_path / "spool", reinject_port=relay.port)


def _send(pool: Reinjector, settings: TowerSettings, n: int) -> str:
    return pool.send(
        settings, RAW, "a@example.org", [f"r{n}@example.com"], header=HEADER, local_hostname="s1"
    )


def test_messages_share_one_connection(tmp_path: Path, relay: Relay) -> None:
    settings = _settings(tmp_path, relay)
    pool = Reinjector(keep=2)
    for n in range(5):
        assert "queued as" in _send(pool, settings, n)
    assert len(relay.handler.received) == 5
    assert len(set(relay.handler.sessions)) == 1 and pool.connects == 1
    assert relay.handler.received[0].content == HEADER + RAW
    pool.close()
    assert pool.idle() == 0


def test_a_connection_the_relay_closed_is_replaced_without_duplicate(
    tmp_path: Path, relay: Relay
) -> None:
    settings = _settings(tmp_path, relay)
    pool = Reinjector(keep=2)
    _send(pool, settings, 1)
    relay.restart()  # the kept connection is dead now
    _send(pool, settings, 2)
    assert [r.rcpt_tos for r in relay.handler.received] == [
        ["r1@example.com"],
        ["r2@example.com"],
    ]
    assert pool.connects == 2
    pool.close()


def test_a_refused_message_raises_and_its_connection_is_not_kept(
    tmp_path: Path, relay: Relay
) -> None:
    settings = _settings(tmp_path, relay)
    pool = Reinjector(keep=2)
    relay.handler.refuse = "452 4.3.1 Insufficient system storage"
    with pytest.raises(ReinjectError, match="DATA answered 452"):
        _send(pool, settings, 1)
    assert pool.idle() == 0
    relay.handler.refuse = None
    _send(pool, settings, 2)
    assert pool.connects == 2 and len(relay.handler.received) == 1
    pool.close()


def test_relay_down_is_a_reinject_error(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "spool", reinject_port=free_port())  # nothing listens
    with pytest.raises(ReinjectError, match="127.0.0.1"):
        _send(Reinjector(keep=1), settings, 1)


def test_idle_connections_are_closed(tmp_path: Path, relay: Relay) -> None:
    settings = _settings(tmp_path, relay)
    pool = Reinjector(keep=2, idle_s=0.2)
    _send(pool, settings, 1)
    assert pool.idle() == 1
    wait_until(lambda: pool.idle() == 0, 5, "the idle connection closed")
    _send(pool, settings, 2)
    assert pool.connects == 2
    pool.close()


def test_no_more_than_keep_stay_open(tmp_path: Path, relay: Relay) -> None:
    settings = _settings(tmp_path, relay)
    pool = Reinjector(keep=0)
    for n in range(3):
        _send(pool, settings, n)
    assert pool.connects == 3 and pool.idle() == 0
    closed = Reinjector(keep=4)
    closed.close()
    _send(closed, settings, 9)
    assert closed.idle() == 0  # a closed pool keeps nothing


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from([b".", b"..", b"\r\n", b"\n", b"\r", b"a", b"\r\n.\r\n", b" "])))
def test_dot_stuffing_sends_what_smtplib_sends(pieces: list[bytes]) -> None:
    data = b"".join(pieces)
    expected = smtplib._quote_periods(data)  # type: ignore[attr-defined]
    if expected[-2:] != b"\r\n":
        expected += b"\r\n"
    assert dot_stuffed(data) == expected + b".\r\n"


def test_lines_with_dots_arrive_unchanged(tmp_path: Path, relay: Relay) -> None:
    body = b"Subject: dots\r\n\r\n.\r\n..leading\r\nmiddle . dot\r\n.\r\n"
    pool = Reinjector(keep=1)
    pool.send(_settings(tmp_path, relay), body, "a@example.org", ["b@example.com"], header=b"")
    assert relay.handler.received[0].content == body
    pool.close()
