"""Content-Transfer-Encoding decoding as a lenient mail client does it, with every variant.

Strict decoders disagree with lenient ones exactly where attackers hide payloads: junk in
base64, padding in the middle, lines that are not multiples of four, a misspelt or missing CTE.
Each decoder returns the reading a lenient client most likely shows (``primary``) plus the other
plausible readings (``alternatives``), so the union can be scanned.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass, field

from mailtower.scanning.mime import _anomalies as A

_B64_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_WHITESPACE = b" \t\r\n\x0b\x0c"
_NOT_B64 = bytes(b for b in range(256) if b not in _B64_CHARS + b"=")
# Every byte but the whitespace ``bytes.strip`` removes, apart from the line feed.
_NOT_LINE_WHITESPACE = bytes(b for b in range(256) if b not in b" \t\r\x0b\x0c")
_URLSAFE = bytes.maketrans(b"-_", b"+/")
_PADDING_RUNS = re.compile(rb"=+")
_INNER_SPACE = re.compile(rb"[^\s][ \t\x0b\x0c]+[^\s]")
_MIXED = (re.compile(rb"[A-Z]"), re.compile(rb"[a-z]"), re.compile(rb"[0-9+/]"))
_EOL = re.compile(rb"\r\n|\r|\n")

# Shortest body that is decoded as base64 without a base64 CTE: short tokens are ordinary words.
_MIN_BARE_BASE64 = 32

IDENTITY = "identity"
BASE64 = "base64"
QUOTED_PRINTABLE = "quoted-printable"
UUENCODE = "uuencode"

_EXACT = {
    "base64": BASE64,
    "quoted-printable": QUOTED_PRINTABLE,
    "7bit": IDENTITY,
    "8bit": IDENTITY,
    "binary": IDENTITY,
    "x-uuencode": UUENCODE,
    "uuencode": UUENCODE,
    "x-uue": UUENCODE,
    "uue": UUENCODE,
}


@dataclass
class Decoded:
    """The readings of one encoded body."""

    primary: bytes
    alternatives: list[bytes] = field(default_factory=list)
    anomalies: set[str] = field(default_factory=set)

    def add_alternative(self, data: bytes) -> None:
        if data and data != self.primary and data not in self.alternatives:
            self.alternatives.append(data)


def classify_cte(value: str | None) -> tuple[str, bool]:
    """The encoding a lenient client applies for a CTE header value, and whether it was exact."""
    if value is None:
        return IDENTITY, True
    exact = value.strip().lower()
    if exact in _EXACT:
        return _EXACT[exact], True
    squeezed = re.sub(r"\([^)]*\)|[^a-z0-9]", "", exact)  # comments, quotes, dashes, spaces
    if "base64" in squeezed or squeezed == "b64":
        return BASE64, False
    if "quotedprintable" in squeezed or squeezed == "qp":
        return QUOTED_PRINTABLE, False
    if squeezed in ("xuuencode", "uuencode", "xuue", "uue"):
        return UUENCODE, False
    return IDENTITY, squeezed in ("7bit", "8bit", "binary", "")


def _b64_chunk(chunk: bytes) -> bytes:
    """Decode alphabet-only ``chunk``, fixing its padding; a lone trailing sextet is dropped."""
    extra = len(chunk) % 4
    if extra == 1:
        chunk = chunk[:-1]
    elif extra:
        chunk += b"=" * (4 - extra)
    try:
        return binascii.a2b_base64(chunk)
    except binascii.Error:
        return b""


def _b64_chunks(clean: bytes) -> list[bytes]:
    """The streams of ``clean`` (alphabet and "=" only): each run of padding ends one."""
    body = clean.rstrip(b"=")
    if b"=" not in body:  # the usual case: padding at the end only (no regex over the body)
        return [body] if body else []
    return [c for c in _PADDING_RUNS.split(body) if c]


def _b64_stream(clean: bytes, chunks: list[bytes] | None = None) -> bytes:
    """Concatenated base64 streams: each run of padding ends one stream, the next one follows."""
    return b"".join(_b64_chunk(c) for c in (_b64_chunks(clean) if chunks is None else chunks))


def _odd_lines(body: bytes, has_junk: bool) -> bool:
    """Whether some line but the last holds a number of base64 characters not divisible by 4."""
    if not has_junk:  # only whitespace besides the alphabet: line lengths tell (fast)
        plain = body.replace(b"\r\n", b"\n")
        if not plain.translate(None, _NOT_LINE_WHITESPACE):
            # No whitespace but the line ends: each line's length is its stripped length,
            # taken without a Python-level step per line (a 1 MB body has 17,000 lines).
            lengths = set(map(len, plain.rstrip().split(b"\n")[:-1]))
        else:
            lengths = {len(ln.strip()) for ln in body.rstrip().split(b"\n")[:-1]}
        return any(n % 4 for n in lengths)
    return any(len(ln.translate(None, _NOT_B64)) % 4 for ln in body.rstrip().split(b"\n")[:-1])


def decode_base64(body: bytes) -> Decoded:
    """Base64 as a lenient client decodes it, and the other plausible readings."""
    compact = body.translate(None, _WHITESPACE)
    clean = compact.translate(None, _NOT_B64)
    chunks = _b64_chunks(clean)
    result = Decoded(_b64_stream(clean, chunks))
    if len(clean) != len(compact):
        result.anomalies.add(A.BASE64_JUNK)
    if len(chunks) > 1:
        result.anomalies.add(A.BASE64_JUNK)  # data after padding: decoders part ways here
        result.add_alternative(_b64_chunk(chunks[0]))  # decoders that stop at the first "="
        result.add_alternative(_b64_chunk(clean.replace(b"=", b"")))  # ones that skip "="
    elif clean and len(clean) % 4:
        result.anomalies.add(A.BASE64_PADDING)
    if _odd_lines(body, len(clean) != len(compact)):
        # Odd line lengths: a decoder working line by line reads something else.
        lines = (ln.translate(None, _NOT_B64) for ln in _EOL.split(body))
        result.add_alternative(b"".join(_b64_stream(ln) for ln in lines if ln))
    if b"-" in compact or b"_" in compact:
        urlsafe = compact.translate(_URLSAFE).translate(None, _NOT_B64)
        result.add_alternative(_b64_stream(urlsafe))
    return result


def looks_like_base64(body: bytes) -> bool:
    """Whether a body declared as plain text is most likely base64 (as a client may guess)."""
    body = body.strip()
    if len(body) < _MIN_BARE_BASE64 or body.translate(None, _B64_CHARS + b"=" + _WHITESPACE):
        return False
    if _INNER_SPACE.search(body):
        return False  # words, not encoded lines
    compact = body.translate(None, _WHITESPACE)
    if len(compact) < _MIN_BARE_BASE64 or len(compact.rstrip(b"=")) % 4 == 1:
        return False
    if b"=" in compact.rstrip(b"="):
        return False
    return mixed_alphabet(compact)


def mixed_alphabet(data: bytes) -> bool:
    """Whether ``data`` mixes cases and digits, as base64 of anything but a few bytes does."""
    return all(r.search(data) for r in _MIXED)


def decode_uu_lines(lines: list[bytes]) -> bytes:
    """Decode uuencoded data lines (between ``begin`` and ``end``), tolerating damage."""
    out = []
    for line in lines:
        line = line.rstrip(b"\r\n")
        if not line or line == b"end":
            if line == b"end":
                break
            continue
        count = (line[0] - 32) & 63
        if count == 0:
            continue
        chars = (count + 2) // 3 * 4
        if max(line) > 96 or min(line) < 32 or len(line) - 1 < chars - 4:
            break  # not a uuencoded line: the block ended (or never began)
        data = line[1 : 1 + chars].ljust(chars, b" ")
        try:
            out.append(binascii.a2b_uu(bytes([line[0]]) + data)[:count])
        except binascii.Error:
            break
    return b"".join(out)


def decode_body(body: bytes, cte: str | None) -> Decoded:
    """Every plausible reading of ``body`` under the CTE header value ``cte`` (None = missing)."""
    kind, exact = classify_cte(cte)
    if kind == BASE64:
        result = decode_base64(body)
    elif kind == QUOTED_PRINTABLE:
        result = Decoded(binascii.a2b_qp(body))
    elif kind == UUENCODE:
        lines = body.splitlines()
        start = next((i + 1 for i, ln in enumerate(lines) if ln.startswith(b"begin ")), 0)
        result = Decoded(decode_uu_lines(lines[start:]))
    else:
        result = Decoded(body)
        if looks_like_base64(body):
            result.add_alternative(decode_base64(body).primary)
            result.anomalies.add(A.CTE_MISMATCH)
    if not exact and kind != IDENTITY:
        result.anomalies.add(A.CTE_MISMATCH)
        result.add_alternative(body)  # a strict reader takes it as it stands
    return result
