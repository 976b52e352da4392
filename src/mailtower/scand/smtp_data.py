"""Reading DATA in large pieces instead of aiosmtpd's line at a time.

aiosmtpd 1.4.6 reads DATA with one ``readuntil(b"\\r\\n")`` per line: about a thousand awaits
and list appends for a 75 KB message, 17 % of scand's CPU in the benchmark. :func:`read_data`
reads up to each ``.\\r\\n`` instead (base64 lines never end with a dot, so a large attachment
comes in one piece) and gives exactly what aiosmtpd gives:

- the end of data is a line that is exactly ``.`` — ``\\r\\n.\\r\\n``, or ``.\\r\\n`` first — and
  nothing else: a bare LF or CR does not end a line (no SMTP smuggling through ``\\n.\\n``);
- dot-unstuffing removes the first character of every line that starts with ``.``, a line
  being what ends with CRLF;
- a line longer than ``line_length_limit`` (CRLF included) gets ``500 Line too long``, data
  over ``data_size_limit`` gets ``552``, whichever comes first in the stream, after the data
  was read to its end (so the session goes on in step with the client).

tests/unit/test_scand_data.py sends the same random streams to stock aiosmtpd and to
:class:`FilterSMTP` and compares what the handlers get and every reply.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP

log = logging.getLogger(__name__)

_END = b".\r\n"
# A chunk of this much more than the size limit without an end is over the limit for sure.
_SLACK = 4096
# readuntil's limit when the server has no size limit.
_NO_LIMIT = 1 << 40


class DataState(enum.Enum):
    NOMINAL = "nominal"
    TOO_LONG = "too long"  # a line over line_length_limit
    TOO_MUCH = "too much"  # over data_size_limit


class _Reading:
    """The state of one DATA transfer, fed CRLF-aligned chunks in stream order."""

    def __init__(self, size_limit: int | None, line_limit: int) -> None:
        self.size_limit = size_limit or 0
        self.line_limit = line_limit
        self.state = DataState.NOMINAL
        self.size = 0
        self.chunks: list[bytes] = []

    def feed(self, chunk: bytes) -> None:
        """Account for ``chunk`` (whole lines, as read; the end line excluded) and keep it."""
        if self.state is DataState.NOMINAL:
            over_size = bool(self.size_limit) and self.size + len(chunk) > self.size_limit
            long_line = len(chunk) > self.line_limit - 2 and (
                max(map(len, chunk.split(b"\r\n"))) > self.line_limit - 2
            )
            if over_size or long_line:
                self._per_line(chunk)  # which comes first decides the answer
            else:
                self.size += len(chunk)
        else:
            self.size += len(chunk)
        if self.state is DataState.NOMINAL:
            self.chunks.append(chunk)
        else:
            self.chunks.clear()  # discarded at once, as aiosmtpd does (memory)

    def _per_line(self, chunk: bytes) -> None:
        """aiosmtpd's order for each line: a line longer than the reader's limit is too long
        as it is read; else its bytes are counted against the size limit, then its length
        (CRLF included) checked against the line limit."""
        limit = self.line_limit
        for line in chunk.split(b"\r\n")[:-1] if chunk.endswith(b"\r\n") else chunk.split(b"\r\n"):
            n = len(line) + 2
            if self.state is not DataState.NOMINAL:
                self.size += n
                continue
            if n - 2 > limit:  # beyond the StreamReader's limit: refused while reading
                self.state = DataState.TOO_LONG
                self.size += n
                continue
            self.size += n
            if self.size_limit and self.size > self.size_limit:
                self.state = DataState.TOO_MUCH
            elif n > limit:
                self.state = DataState.TOO_LONG

    def content(self) -> bytes:
        """The data, dot-unstuffed."""
        data = b"".join(self.chunks)
        if data.startswith(b"."):
            data = data[1:]
        # "\r\n." cannot overlap itself, so one replace unstuffs every other line.
        return data.replace(b"\r\n.", b"\r\n")


async def read_data(
    reader: asyncio.StreamReader, *, size_limit: int | None, line_limit: int
) -> tuple[DataState, bytes]:
    """Read DATA from ``reader`` up to and including its end line; return the state and,
    when nominal, the dot-unstuffed content (else b"")."""
    reading = _Reading(size_limit, line_limit)
    tail = b"\r\n"  # the last two bytes read: DATA starts at the start of a line
    # The StreamReader's line limit (aiosmtpd's line_length_limit) would refuse a piece longer
    # than a line; for the transfer it is raised to the size limit, then restored for the
    # commands that follow. (A private attribute, stable since Python 3.4.) Memory: the reader
    # pauses the socket only past twice its limit, so one client can have up to about twice
    # the size limit buffered (aiosmtpd: the size limit in its list of lines); scand's port
    # is open to the relay only.
    saved_limit: int = reader._limit  # type: ignore[attr-defined]
    reader._limit = (size_limit + _SLACK) if size_limit else _NO_LIMIT  # type: ignore[attr-defined]
    try:
        while True:
            try:
                # Every call starts at the start of a line, so the first ".\r\n" is either
                # the end line (when CRLF comes before it) or the end of a line ending in ".".
                chunk = await reader.readuntil(_END)
            except asyncio.LimitOverrunError as exc:
                # No ".\r\n" within the size limit and more: take what is there, go on.
                part = await reader.readexactly(exc.consumed)
                reading.feed(part)
                reading.state = (
                    DataState.TOO_MUCH if reading.state is DataState.NOMINAL else reading.state
                )
                tail = (tail + part)[-2:]
                continue
            if (tail + chunk[-5:])[-5:] == b"\r\n.\r\n":
                reading.feed(chunk[:-3])
                break
            reading.feed(chunk)
            tail = chunk[-2:]
    finally:
        reader._limit = saved_limit  # type: ignore[attr-defined]
    if reading.state is not DataState.NOMINAL:
        return reading.state, b""
    return reading.state, reading.content()


class FilterSMTP(SMTP):
    """aiosmtpd's SMTP with DATA read by :func:`read_data`; everything else is aiosmtpd's.

    ``line_length_limit`` (DATA lines, CRLF included) and ``command_size_limit`` replace
    aiosmtpd's class-wide 1001 and 512 for this session, so scand takes every line and command
    the relay can send it (settings.Limits.filter_line_length, filter_command_bytes)."""

    def __init__(
        self,
        handler: Any,
        *,
        line_length_limit: int | None = None,
        command_size_limit: int | None = None,
        **kwargs: Any,
    ) -> None:
        if line_length_limit is not None:
            self.line_length_limit = line_length_limit  # read by SMTP.__init__ for its reader
        super().__init__(handler, **kwargs)
        if command_size_limit is not None:
            self.command_size_limit = command_size_limit
        # aiosmtpd keeps the per-command limits in one dict shared by every session (its EHLO
        # raises MAIL's there); this session's own, from its own base limit.
        self.command_size_limits = collections.defaultdict(lambda: self.command_size_limit)

    def _cb_client_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        super()._cb_client_connected(reader, writer)
        # aiosmtpd reads a command with the StreamReader's limit, its line_length_limit: the
        # limit must also let the longest command (with MAIL's extension allowances) through,
        # for the command size check to answer it. (read_data sets its own for DATA.)
        longest = self.command_size_limit + 64
        if longest > reader._limit:  # type: ignore[attr-defined]
            reader._limit = longest  # type: ignore[attr-defined]

    async def smtp_DATA(self, arg: str) -> None:
        # The checks and replies of aiosmtpd 1.4.6's smtp_DATA, in its order.
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            state, content = await read_data(
                self._reader, size_limit=self.data_size_limit, line_limit=self.line_length_limit
            )
        except asyncio.CancelledError:
            # The connection was reset or closed during DATA (aiosmtpd cancels this task).
            log.info("Connection lost during DATA")
            self._writer.close()
            raise
        except asyncio.IncompleteReadError:
            log.info("Connection closed during DATA")
            self._writer.close()
            return
        if state is DataState.TOO_LONG:
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
            self._set_post_data_state()
            return
        if state is DataState.TOO_MUCH:
            await self.push("552 Error: Too much mail data")
            self._set_post_data_state()
            return
        if self._decode_data:  # as aiosmtpd does it (scand itself keeps bytes)
            if self.enable_SMTPUTF8:
                self.envelope.content = content.decode("utf-8", errors="surrogateescape")
            else:
                try:
                    self.envelope.content = content.decode("ascii", errors="strict")
                except UnicodeDecodeError:
                    await self.push("500 Error: strict ASCII mode")
                    return
        else:
            self.envelope.content = content
        self.envelope.original_content = content
        status = await self._call_handler_hook("DATA") if "DATA" in self._handle_hooks else MISSING
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)
