"""scand's DATA reader against stock aiosmtpd: the same streams give the same content to the
handler and the same replies, byte for byte (dot-unstuffing, the end line, bare CR/LF, line
and size limits, data after an early end line read as commands)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scand_fakes import free_port

from mailtower.scand.smtp_data import FilterSMTP

SIZE_LIMIT = 4000


class _Recorder:
    def __init__(self) -> None:
        self.contents: list[bytes] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        self.contents.append(data)
        return f"250 2.0.0 got {len(data)} bytes"


class _Server(Controller):
    def __init__(self, smtp_class: type[SMTP]) -> None:
        self.recorder = _Recorder()
        self.smtp_class = smtp_class
        super().__init__(self.recorder, hostname="127.0.0.1", port=free_port())

    def factory(self) -> SMTP:
        return self.smtp_class(
            self.handler,
            data_size_limit=SIZE_LIMIT,
            enable_SMTPUTF8=True,
            hostname="filter.test",
            ident="test",
        )


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[_Server, _Server]]:
    stock, ours = _Server(SMTP), _Server(FilterSMTP)
    stock.start()
    ours.start()
    yield stock, ours
    stock.stop()
    ours.stop()


def _session(server: _Server, data: bytes) -> tuple[bytes, list[bytes]]:
    """Every byte the server answers to a transaction carrying ``data`` (sent at once, then
    the end line and QUIT), and what its handler got."""
    server.recorder.contents = []
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"EHLO relay.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n")
        sock.sendall(b"DATA\r\n" + data + b"\r\n.\r\nQUIT\r\n")
        sock.shutdown(socket.SHUT_WR)
        replies = b""
        while chunk := sock.recv(65536):
            replies += chunk
    return replies, list(server.recorder.contents)


_pieces = st.sampled_from(
    [b"\r\n", b"\n", b"\r", b".", b"..", b"\r\n.", b"\n.\n", b"\r\n..\r\n", b"\r\n.\r\n"]
    + [b"a", b"hello world", b"x" * 300, b"y" * 997, b"z" * 999, b"w" * 1000, b"v" * 1010]
    + [b"MAIL FROM:<evil@example.org>\r\n", b"RCPT TO:<victim@example.com>\r\n", b"DATA\r\n"]
)
streams = st.lists(_pieces, max_size=14).map(b"".join)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(streams)
def test_same_content_and_replies_as_aiosmtpd(servers: Any, data: bytes) -> None:
    stock, ours = servers
    assert _session(ours, data) == _session(stock, data)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b".",
        b"..leading dot\r\n.\r\n..\r\n",
        b"Subject: t\r\n\r\nbody\n.\nMAIL FROM:<evil@example.org>\r\n",  # bare LF: not an end
        b"Subject: t\r\n\r\nbody\r.\rmore",  # bare CR: not an end
        b"line.\r\n.\r\nNOOP\r\n",  # an early end line: the rest are commands
        b"a" * 999 + b"\r\n",  # the longest line aiosmtpd takes
        b"a" * 1000 + b"\r\n",  # one more: 500
        b"b" * 990 + b"\r\n" + b"c" * 990 + b"\r\n" + b"d" * 990 + b"\r\n" + b"e" * 990,  # 552
        (b"f" * 990 + b"\r\n") * 4 + b"g" * 1200,  # over the size first, then a long line
    ],
)
def test_known_cases(servers: Any, data: bytes) -> None:
    stock, ours = servers
    got = _session(ours, data)
    assert got == _session(stock, data)
    assert got[0].count(b"\r\n354 ") == 1


def test_content_is_unstuffed_and_ends_before_the_end_line(servers: Any) -> None:
    _stock, ours = servers
    replies, contents = _session(ours, b"..x\r\nplain\r\n...y\r\n.")
    assert contents == [b".x\r\nplain\r\n..y\r\n"]  # the "." line ended it
    assert b"250 2.0.0 got" in replies
