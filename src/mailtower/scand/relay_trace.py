"""What the relay tells scand about a message besides its envelope: its queue id and arrival.

The relay's scan transport sends Postfix's XFORWARD (``smtp_send_xforward_command=yes``) when
scand announces it; ``IDENT`` is the relay's queue id of the message. :class:`RelaySMTP` keeps
those attributes for one transaction (DATA, RSET and EHLO forget them), as Postfix's own smtpd
does.

:func:`relay_arrival` finds when the relay took the message in: the relay's smtpd puts its
``Received:`` header above everything the sender wrote (``by <its hostname> (Postfix) with
ESMTP id <queue id> …; <date>``). Only that topmost field counts, and only when it names the
relay's hostname and the queue id XFORWARD gave: a header a sender wrote is never topmost, and
cannot know the queue id its message will get. Anything else is "unknown" (None), never a
guess::

    arrival = relay_arrival(raw, settings.hostname, envelope.xforward.get("IDENT"))
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, AnyStr

from aiosmtpd.smtp import Envelope, syntax

from mailtower.scand.smtp_data import FilterSMTP

# Postfix's XFORWARD attributes (XFORWARD_README); scand announces and keeps them all.
XFORWARD_ATTRIBUTES = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
_XTEXT_HEX = re.compile(r"\+([0-9A-Fa-f]{2})")
# A header field starts at the start of a line with a name and a colon; continuation lines
# start with white space.
_FIRST_FIELD = re.compile(rb"\A([!-9;-~]+)[ \t]*:(.*?)(?=\r?\n[^ \t]|\Z)", re.DOTALL)
_QUEUE_ID = re.compile(r"\A[0-9A-Za-z]{5,32}\Z")


class RelayEnvelope(Envelope):
    """aiosmtpd's envelope plus the XFORWARD attributes sent for this transaction."""

    def __init__(self) -> None:
        super().__init__()
        self.xforward: dict[str, str] = {}


def xtext_decoded(value: str) -> str:
    """An RFC 3461 xtext value (``+XX`` hex escapes) as text."""
    return _XTEXT_HEX.sub(lambda m: chr(int(m.group(1), 16)), value)


class RelaySMTP(FilterSMTP):
    """scand's SMTP server: FilterSMTP plus Postfix's XFORWARD command."""

    _in_ehlo = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A client's HELO name goes into XFORWARD in xtext (up to three bytes a character):
        # past aiosmtpd's 512 a command, the 500 would make Postfix bounce the message. The
        # line limit (what aiosmtpd reads at all) bounds it instead.
        self.command_size_limits["XFORWARD"] = self.line_length_limit

    def _create_envelope(self) -> Envelope:
        return RelayEnvelope()

    async def smtp_EHLO(self, hostname: str) -> None:
        self._in_ehlo = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_ehlo = False

    async def push(self, status: AnyStr) -> None:
        # aiosmtpd's EHLO answer ends with "250 HELP"; the extension goes in before it (a
        # handle_EHLO hook would put the same line in from the handler, away from the command).
        if self._in_ehlo and status == "250 HELP":
            await super().push("250-XFORWARD " + " ".join(XFORWARD_ATTRIBUTES))
        await super().push(status)

    @syntax("XFORWARD attribute=value ...")
    async def smtp_XFORWARD(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        envelope = self.envelope
        assert isinstance(envelope, RelayEnvelope)
        if envelope.mail_from:
            await self.push("503 5.5.1 Error: MAIL transaction in progress")
            return
        if not arg:
            await self.push("501 5.5.4 Syntax: XFORWARD attribute=value...")
            return
        given: dict[str, str] = {}
        for item in arg.split():
            name, sep, value = item.partition("=")
            if not sep or name.upper() not in XFORWARD_ATTRIBUTES:
                await self.push("501 5.5.4 Bad XFORWARD attribute name")
                return
            given[name.upper()] = xtext_decoded(value)
        envelope.xforward.update(given)
        await self.push("250 2.0.0 Ok")


def relay_arrival(raw: bytes, relay_hostname: str, queue_id: str | None) -> datetime | None:
    """When the relay took ``raw`` in, from the relay's own topmost ``Received:`` field; None
    unless that field names ``relay_hostname`` and ``queue_id`` (XFORWARD's IDENT)."""
    if not queue_id or not _QUEUE_ID.match(queue_id):
        return None  # "[UNAVAILABLE]", or no XFORWARD at all
    match = _FIRST_FIELD.match(raw)
    if match is None or match.group(1).lower() != b"received":
        return None
    value = re.sub(r"\s+", " ", match.group(2).decode("ascii", errors="replace"))
    clause, semicolon, date_text = value.rpartition(";")
    # A client's HELO name (in "from …") is one word, so " by <relay> " is the relay's clause.
    host = re.escape(relay_hostname.rstrip("."))
    by = re.search(rf"(?:^| )by {host}\.? .*?\bid (\S+)", clause, re.IGNORECASE)
    if not semicolon or by is None or by.group(1) != queue_id:
        return None
    try:
        arrival = parsedate_to_datetime(date_text.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if arrival.tzinfo is None:  # "-0000": UTC, its zone unknown
        arrival = arrival.replace(tzinfo=UTC)
    return arrival
