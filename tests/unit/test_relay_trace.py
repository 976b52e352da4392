"""The relay's arrival time of a message, from its own topmost Received field and XFORWARD."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from mailtower.scand.relay_trace import relay_arrival, xtext_decoded

HOST = "mx.tower-a.lab"
BODY = b"From: a@example.org\r\nSubject: s\r\n\r\nbody\r\n"
WHEN = datetime(2026, 12, 6, 12, 0, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    "received",
    [
        # smtpd, one recipient, TLS
        b"Received: from client.example (client.example [192.0.2.1])\r\n"
        b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)\r\n"
        b"\t key-exchange X25519 server-signature RSA-PSS (2048 bits))\r\n"
        b"\t(No client certificate requested)\r\n"
        b"\tby mx.tower-a.lab (Postfix) with ESMTPS id 4Q1zXy2abc\r\n"
        b'\tfor <"odd;local"@customer1.lab>; Sun,  6 Dec 2026 12:00:05 +0000 (UTC)\r\n',
        # smtpd, several recipients (no "for"), bare LF, another zone
        b"Received: from by (unknown [192.0.2.1])\n"
        b"\tby MX.Tower-A.lab (Postfix) with ESMTP id 4Q1zXy2abc;\n"
        b"\tSun, 6 Dec 2026 13:00:05 +0100 (CET)\n",
        # pickup (sendmail on the relay)
        b"Received: by mx.tower-a.lab (Postfix, from userid 0)\r\n"
        b"\tid 4Q1zXy2abc; Sun,  6 Dec 2026 12:00:05 -0000 (UTC)\r\n",
    ],
)
def test_the_relays_own_received_field_gives_the_arrival(received: bytes) -> None:
    assert relay_arrival(received + BODY, HOST, "4Q1zXy2abc") == WHEN


GOOD = (
    b"Received: from c (c [192.0.2.1])\r\n\tby mx.tower-a.lab (Postfix) with ESMTP id "
    b"4Q1zXy2abc\r\n\tfor <b@customer1.lab>; Sun,  6 Dec 2026 12:00:05 +0000 (UTC)\r\n"
)


@pytest.mark.parametrize(
    ("raw", "ident"),
    [
        (GOOD + BODY, None),  # no XFORWARD
        (GOOD + BODY, "[UNAVAILABLE]"),
        (GOOD + BODY, "4Q1zXy2abd"),  # another queue file's id
        (b"X-Before: 1\r\n" + GOOD + BODY, "4Q1zXy2abc"),  # not the topmost field
        (GOOD.replace(b"mx.tower-a.lab", b"mx.tower-b.lab") + BODY, "4Q1zXy2abc"),
        (GOOD.replace(b"Sun,  6 Dec 2026", b"Someday") + BODY, "4Q1zXy2abc"),
        (GOOD.replace(b"; Sun", b" Sun") + BODY, "4Q1zXy2abc"),  # no date
        (BODY, "4Q1zXy2abc"),
        (b"", "4Q1zXy2abc"),
    ],
)
def test_anything_else_is_unknown(raw: bytes, ident: str | None) -> None:
    assert relay_arrival(raw, HOST, ident) is None


def test_a_received_field_the_sender_wrote_names_a_queue_id_it_cannot_know() -> None:
    forged = GOOD.replace(b"4Q1zXy2abc", b"4AAAAAAAAA").replace(b"2026", b"2025")
    relays = GOOD.replace(b"Sun,  6 Dec 2026 12:00:05", b"Sun,  6 Dec 2026 15:00:00")
    raw = relays + forged + BODY
    assert relay_arrival(raw, HOST, "4Q1zXy2abc") == datetime(2026, 12, 6, 15, 0, 0, tzinfo=UTC)
    assert relay_arrival(raw, HOST, "4AAAAAAAAA") is None  # only the topmost field counts


def test_xtext() -> None:
    assert xtext_decoded("a+2Bb+3Dc") == "a+b=c"
