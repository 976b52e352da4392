"""The portal's pieces without a database: escaping, previews, the link mail, the relays."""

from __future__ import annotations

import socket

import pytest

from mailtower.goc.portal import render
from mailtower.goc.portal.mail import RelayAddress, SmtpMailer, link_message
from mailtower.goc.portal.store import Cursor, Scope, normal_address


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("<script>x</script>", "&lt;script&gt;x&lt;/script&gt;"),
        ("a\"b'c&d", "a&quot;b&#x27;c&amp;d"),
        ("abc\u202etxt.exe", "abc\\u202etxt.exe"),
        ("nul\x00here", "nul\\x00here"),
        ("bell\x07esc\x1b[31m", "bell\\x07esc\\x1b[31m"),
        (None, ""),
    ],
)
def test_h_escapes_and_shows_non_printables(value: object, shown: str) -> None:
    assert render.h(value) == shown


def test_text_keeps_lines_and_shows_tabs_as_spaces() -> None:
    assert render.h_text("a\tb\n<i>\u2066") == "a       b\n&lt;i&gt;\\u2066"


def test_preview_of_garbage_never_raises() -> None:
    for raw in (b"\xff\xfe" * 10 + b"\r\n\r\n", b"Content-Type: multipart/mixed\r\n\r\n--", b""):
        view = render.preview(raw)
        assert set(view) == {"headers", "text", "attachments", "error", "cut"}
    assert render.preview(None) == {
        "headers": [],
        "text": None,
        "attachments": [],
        "error": None,
        "cut": False,
    }


def test_folded_headers_show_on_one_line_and_hostile_ones_stay_visible() -> None:
    raw = (
        b"Received: from a.example (a [192.0.2.1])\r\n\tby mx.example with ESMTP id X\r\n"
        b"\tfor <u@example.net>; Mon, 7 Dec 2026 09:13:47 +0000\r\n"
        b"Subject: =?utf-8?q?invoice_=E2=80=AEfdp.exe?=\r\n\r\nbody\r\n"
    )
    headers = dict(render.preview(raw)["headers"])
    received = headers["Received"]
    assert "\t" not in received and "\n" not in received
    assert received.startswith("from a.example (a [192.0.2.1]) by mx.example with ESMTP id X for")
    shown = render.h(headers["Subject"])
    assert "\u202e" not in shown and "202e" in shown.lower()  # the RTL override made visible


def test_html_to_text_drops_scripts_and_styles() -> None:
    text = render.html_to_text("<style>p{}</style><p>Hi<script>x()</script> there</p>")
    assert text.strip() == "Hi there"


def test_link_mail_is_plain_text_to_the_user_only() -> None:
    msg = link_message("quarantine@goc.example", "alice@acme.example", "https://p/link/T", 15)
    assert msg["To"] == "alice@acme.example" and msg["From"] == "quarantine@goc.example"
    assert msg.get_content_type() == "text/plain" and not msg.is_multipart()
    assert "https://p/link/T" in msg.get_content() and "15 minutes" in msg.get_content()
    assert msg["Auto-Submitted"] == "auto-generated"


def test_relays_parse_and_a_mailer_with_no_taker_raises() -> None:
    assert RelayAddress.parse("10.1.0.21") == RelayAddress("10.1.0.21", 25)
    assert RelayAddress.parse("relay.example:2525") == RelayAddress("relay.example", 2525)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mailer = SmtpMailer((RelayAddress("127.0.0.1", port),), timeout_s=5)
    with pytest.raises(OSError, match="no relay took the sign-in link"):
        mailer(link_message("q@goc.example", "a@acme.example", "https://p/link/T", 15))


@pytest.mark.parametrize(
    ("address", "normal"),
    [
        ("Alice@Acme.Example", "alice@acme.example"),
        (" bob@acme.example ", "bob@acme.example"),
        ("no-at-sign", None),
        ("a@b@c", None),
        ("<x>@acme.example", None),
        ("x@acme.example\nBcc: y@z", None),
    ],
)
def test_normal_address(address: str, normal: str | None) -> None:
    assert normal_address(address) == normal


def test_cursor_round_trip_and_garbage() -> None:
    import uuid
    from datetime import UTC, datetime

    cursor = Cursor(datetime(2026, 12, 7, 8, 0, tzinfo=UTC), uuid.uuid4())
    assert Cursor.parse(cursor.text()) == cursor
    for bad in ("", "x_y", "2026-12-07_not-a-uuid", "'; DROP TABLE x--_" + str(uuid.uuid4())):
        assert Cursor.parse(bad) is None


@pytest.mark.parametrize(
    "args",
    [
        {"role": "admin", "who": "a"},  # an admin without a customer
        {"role": "user", "who": "u"},  # a user without an address
        {"role": "operator", "who": "o", "customer_id": 1},
        {"role": "root", "who": "r"},
    ],
)
def test_a_scope_is_never_ambiguous(args: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Scope(**args)  # type: ignore[arg-type]


def test_preview_parses_only_the_first_bytes_of_a_big_message() -> None:
    raw = b"Subject: big\r\nContent-Type: text/plain\r\n\r\n" + b"line of text\r\n" * 1000
    whole = render.preview(raw)
    assert whole["cut"] is False and whole["text"].count("line of text") == 1000
    cut = render.preview(raw, limit=1000)
    assert cut["cut"] is True and dict(cut["headers"])["Subject"] == "big"
    assert 0 < cut["text"].count("line of text") < 1000
