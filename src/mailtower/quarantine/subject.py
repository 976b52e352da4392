"""A quarantined message's Subject as the ``subject`` column holds it: decoded, bounded, clean.

The Subject is the attacker's text. ``subject_of`` reads only the header block, decodes RFC 2047
encoded words (an unknown charset or a broken encoded word is read as well as it can be),
unfolds it, removes control characters (and anything PostgreSQL's ``text`` cannot hold: NUL,
lone surrogates) and keeps at most ``SUBJECT_MAX`` characters (RFC 5322's line limit). It never
raises: a message without a readable Subject gives ``""``. What prints or renders it still
escapes it (``mailtower._text.shown``, the portal's templates).
"""

from __future__ import annotations

import codecs
import re
import unicodedata
from email.header import decode_header

SUBJECT_MAX = 998
# A header block larger than this is read only this far (the relay caps lines and messages,
# but nothing here needs more).
_HEAD_MAX = 256 * 1024
_FIELD_RE = re.compile(rb"^subject[ \t]*:", re.IGNORECASE)


def _head(raw: bytes) -> bytes:
    head = raw[:_HEAD_MAX]
    for end in (b"\r\n\r\n", b"\n\n"):
        at = head.find(end)
        if at >= 0:
            head = head[:at]
    return head


def _field(head: bytes) -> bytes | None:
    """The first Subject field's value, unfolded (continuation lines joined)."""
    lines = head.replace(b"\r\n", b"\n").split(b"\n")
    for i, line in enumerate(lines):
        match = _FIELD_RE.match(line)
        if match is None:
            continue
        parts = [line[match.end() :]]
        for more in lines[i + 1 :]:
            if more[:1] not in (b" ", b"\t"):
                break
            parts.append(more)
        return b"".join(parts)
    return None


def _decode_words(text: str) -> str:
    """``text`` with its RFC 2047 encoded words decoded; the text as it is when it cannot be."""
    try:
        chunks = decode_header(text)
    except Exception:  # a malformed encoded word: the raw text is still something to show
        return text
    out = []
    for chunk, charset in chunks:
        if isinstance(chunk, str):
            out.append(chunk)
            continue
        name = charset or "ascii"
        try:
            codecs.lookup(name)
        except LookupError:
            name = "utf-8"
        try:
            out.append(chunk.decode(name, errors="replace"))
        except Exception:  # a codec that fails in its own way
            out.append(chunk.decode("utf-8", errors="replace"))
    return "".join(out)


def _clean(text: str) -> str:
    kept = []
    for char in text:
        category = unicodedata.category(char)
        if category == "Cc" or category == "Cs":  # controls (NUL, ESC, CR, LF, …), surrogates
            if char in "\t\r\n":
                kept.append(" ")
            continue
        kept.append(char)
    return " ".join("".join(kept).split())


def subject_of(raw: bytes) -> str:
    """The decoded Subject of the message ``raw`` (at most ``SUBJECT_MAX`` characters, no
    control characters), or ``""``; never raises."""
    try:
        value = _field(_head(raw))
        if value is None:
            return ""
        # Raw 8-bit headers (RFC 6532, or a sender ignoring the rules): UTF-8, else Latin-1.
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            text = value.decode("latin-1")
        return _clean(_decode_words(text))[:SUBJECT_MAX]
    except Exception:  # never a reason not to quarantine
        return ""
