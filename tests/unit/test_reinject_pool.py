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

from mailtower.scand import reinject as reinject_mod
from mailtower.scand.errors import ReinjectDeferred, ReinjectError, ReinjectRefused
from mailtower.scand.reinject import Reinjector, dot_stuffed
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


# -- internationalised addresses and the kinds of failure (issue 15) -------------------------


@dataclass
class EnvelopeSink(SinkHandler):
    """Also records whether each transaction asked for SMTPUTF8."""

    smtputf8: list[bool] = field(default_factory=list)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.smtputf8.append(envelope.smtp_utf8)
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def utf8_relay() -> Iterator[tuple[EnvelopeSink, int]]:
    """A relay listener offering SMTPUTF8, as Postfix 3.7 does by default (so does aiosmtpd's
    Controller unless told otherwise)."""
    handler = EnvelopeSink()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, enable_SMTPUTF8=True)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


def test_a_non_ascii_recipient_is_reinjected_with_smtputf8(
    tmp_path: Path, utf8_relay: tuple[EnvelopeSink, int]
) -> None:
    # The relay took it without SMTPUTF8 (Postfix does), so the scan transport did not send
    # the option: re-injection must add it, not crash in smtplib's ASCII encoding.
    handler, port = utf8_relay
    settings = make_settings(tmp_path / "spool", reinject_port=port)
    pool = Reinjector(keep=1)
    pool.send(settings, RAW, "a@example.org", ["jörg@example.com", "b@example.com"], header=b"")
    assert handler.received[0].rcpt_tos == ["jörg@example.com", "b@example.com"]
    assert handler.smtputf8 == [True]
    pool.send(settings, RAW, "ü@example.org", ["b@example.com"], ["BODY=8BITMIME"], header=b"")
    assert handler.received[1].mail_from == "ü@example.org" and handler.smtputf8[1] is True
    pool.send(settings, RAW, "a@example.org", ["b@example.com"], header=b"")  # ASCII: no option
    assert handler.smtputf8[2] is False
    assert pool.connects == 1  # every outcome above was a success on one kept connection
    pool.close()


def test_a_non_ascii_address_without_smtputf8_at_the_relay_is_refused(tmp_path: Path) -> None:
    handler = SinkHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, enable_SMTPUTF8=False)
    controller.start()
    try:
        settings = make_settings(tmp_path / "spool", reinject_port=port)
        pool = Reinjector(keep=1)
        with pytest.raises(ReinjectRefused, match="SMTPUTF8"):
            pool.send(settings, RAW, "a@example.org", ["jörg@example.com"], header=b"")
        assert handler.received == [] and pool.idle() == 0
        _send(pool, settings, 1)  # the next message is unaffected
        assert len(handler.received) == 1
        pool.close()
    finally:
        controller.stop()


@pytest.mark.parametrize(
    "rcpt",
    [
        "b\udcff@example.com",  # a byte that was not UTF-8, as aiosmtpd's surrogateescape gives
        "b@example.com>\r\nRCPT TO:<c@example.com",
        "b\0@example.com",
    ],
)
def test_an_address_that_cannot_be_sent_is_refused_not_a_crash(
    tmp_path: Path, utf8_relay: tuple[EnvelopeSink, int], rcpt: str
) -> None:
    handler, port = utf8_relay
    settings = make_settings(tmp_path / "spool", reinject_port=port)
    with pytest.raises(ReinjectRefused):
        Reinjector(keep=1).send(settings, RAW, "a@example.org", [rcpt], header=b"")
    assert handler.received == []


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        ("452 4.3.1 Insufficient system storage", ReinjectDeferred),
        ("554 5.7.1 Recipient address rejected", ReinjectRefused),
    ],
)
def test_a_4xx_is_deferred_and_a_5xx_refused(
    tmp_path: Path, relay: Relay, reply: str, error: type[ReinjectError]
) -> None:
    relay.handler.refuse = reply
    with pytest.raises(error, match=reply[:3]):
        _send(Reinjector(keep=1), _settings(tmp_path, relay), 1)


def test_relay_down_is_deferred(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "spool", reinject_port=free_port())
    with pytest.raises(ReinjectDeferred):
        _send(Reinjector(keep=1), settings, 1)


def test_an_unexpected_exception_is_a_refusal_and_closes_the_connection(
    tmp_path: Path, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(tmp_path, relay)
    pool = Reinjector(keep=1)
    _send(pool, settings, 1)
    assert pool.idle() == 1

    def broken(data: bytes) -> bytes:
        raise LookupError("a bug of ours")

    monkeypatch.setattr(reinject_mod, "dot_stuffed", broken)
    with pytest.raises(ReinjectRefused, match="LookupError"):
        _send(pool, settings, 2)
    assert pool.idle() == 0  # not put back half-way through a transaction
    pool.close()
