"""A lenient raw reading: split on every boundary declared anywhere, regardless of nesting.

Parsers that follow the structure can be led astray by boundaries that collide (one a prefix of
another), differ in case or quoting from their declaration, or are never closed. This reader
collects every boundary the message declares, cuts the message at every line that starts like
a delimiter of any of them, and reads each piece's headers as leniently as Python does.
"""

from __future__ import annotations

import re

from mailtower.scanning.mime import _anomalies as A
from mailtower.scanning.mime._collect import Collector
from mailtower.scanning.mime._names import main_value
from mailtower.scanning.mime._transfer import BASE64, QUOTED_PRINTABLE, classify_cte

VIEW = "raw-boundary"

_BOUNDARY_PARAM = re.compile(
    rb"(?:^|[;\s])boundary[ \t]*(?:\*\d*\*?)?[ \t]*=(?:\r?\n)?[ \t]*"
    rb"""(?:"([^"\r\n]*)"?|'([^'\r\n]*)'?|([^\s;"']+))""",
    re.IGNORECASE,
)
_EOL = re.compile(rb"\r\n|\r|\n")
# What Python's feedparser takes for a header line (email.feedparser.headerRE), plus the
# obsolete RFC 822 form with space before the colon, which clients still accept.
_HEADER_LINE = re.compile(rb"From |[\x21-\x39\x3b-\x7e]*[ \t]*:|[\t ]")
_MAX_BOUNDARY = 200
# A multipart/digest header and the rest of that header (its folded continuation lines).
_DIGEST_HEADER = re.compile(
    rb"content-type[ \t]*:[ \t]*multipart/digest\b((?:[^\r\n]|\r?\n[ \t])*)", re.IGNORECASE
)


def _boundary_params(raw: bytes, lowered: bytes) -> list[re.Match[bytes]]:
    """What ``_BOUNDARY_PARAM.finditer(raw)`` yields, found faster.

    Every match holds the word "boundary" (case-insensitive), one character after where the
    match starts (or at 0, by "^"), so the pattern is tried only there: in ``lowered`` (``raw``
    in ASCII lower case, as IGNORECASE folds) ``bytes.find`` locates those places at a small
    fraction of the cost of a case-insensitive scan of the whole message. A place inside an
    earlier match is skipped, as finditer skips it.
    """
    out: list[re.Match[bytes]] = []
    resume = 0  # where finditer would go on searching
    at = lowered.find(b"boundary")
    while at >= 0:
        start = max(at - 1, 0)
        if start >= resume:
            m = _BOUNDARY_PARAM.match(raw, start)
            if m is not None:
                out.append(m)
                resume = m.end()
        at = lowered.find(b"boundary", at + 1)
    return out


def declared_boundaries(raw: bytes, lowered: bytes | None = None) -> set[bytes]:
    """Every boundary value declared anywhere in ``raw``, in each plausible quoting.
    ``lowered``: ``raw.lower()`` if the caller has it already."""
    found: set[bytes] = set()
    for m in _boundary_params(raw, raw.lower() if lowered is None else lowered):
        value = next(g for g in m.groups() if g is not None).rstrip()
        for cand in (value, value.split(b"'", 2)[-1] if value.count(b"'") >= 2 else value):
            if 0 < len(cand) <= _MAX_BOUNDARY:
                found.add(cand)
    return found


def digest_boundaries(raw: bytes, lowered: bytes | None = None) -> set[bytes]:
    """The boundaries (lower case) of multipart/digest parts: their parts default to
    message/rfc822 (RFC 2046 5.1.5), as every structural reading must agree (mailing list
    digests are ordinary mail). ``lowered``: ``raw.lower()`` if the caller has it already."""
    found: set[bytes] = set()
    if b"multipart/digest" not in (raw.lower() if lowered is None else lowered):
        return found  # the pattern needs it: the scan of the whole message can be skipped
    for m in _DIGEST_HEADER.finditer(raw):
        found |= {b.lower() for b in declared_boundaries(m.group(1))}
    return found


def split_headers(piece: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """Headers (lower-case name, raw value) and body of ``piece``, the way Python splits them."""
    headers: list[tuple[str, str]] = []
    pos = 0
    n = len(piece)
    while pos < n:
        m = _EOL.search(piece, pos)
        end, nxt = (m.start(), m.end()) if m else (n, n)
        line = piece[pos:end]
        if not line:
            return headers, piece[nxt:]
        if not _HEADER_LINE.match(line):
            return headers, piece[pos:]
        if line.startswith(b"From "):  # an envelope line: Python skips it, wherever it stands
            pos = nxt
            continue
        text = line.decode("ascii", "surrogateescape")
        if line[:1] in (b" ", b"\t"):
            if headers:
                name, value = headers[-1]
                headers[-1] = (name, value + "\r\n" + text)
        else:
            name, _, value = text.partition(":")
            headers.append((name.strip().lower(), value.strip()))
        pos = nxt
    return headers, b""


def _preceding_eol(raw: bytes, pos: int) -> int:
    if raw[max(pos - 2, 0) : pos] == b"\r\n":
        return pos - 2
    if pos and raw[pos - 1 : pos] in (b"\r", b"\n"):
        return pos - 1
    return pos


def delimiter_starts(raw: bytes) -> list[int]:
    """Where a line starts with "--" (at 0, or after CR or LF), in order.

    The same positions as a regular expression ``(?:^|(?<=[\r\n]))--`` would find (matches
    cannot overlap: the byte before one is CR or LF, never "-"), found with ``bytes.find``,
    some twenty times faster on a message with large encoded parts.
    """
    starts = [0] if raw.startswith(b"--") else []
    kinds = 0
    for eol in (b"\n--", b"\r--"):
        at = raw.find(eol)
        kinds += at >= 0
        while at >= 0:
            starts.append(at + 1)
            at = raw.find(eol, at + 3)
    # One kind of line end (the usual case): the positions are in order already.
    return sorted(starts) if kinds > 1 else starts


def match_delimiter(raw: bytes, lowered: bytes, start: int, lowers: list[bytes]) -> int:
    """Where the boundary of a delimiter line at ``start`` (which starts with "--") ends, or -1.

    ``lowers``: the boundaries in lower case, longest first. What the regular expression
    ``--(b1|b2|…)`` (IGNORECASE, alternatives longest first) matches, found without compiling
    one for every message (each has its own boundaries): ``lowered`` is ``raw.lower()``, which
    folds ASCII letters as IGNORECASE does for bytes; the first (longest) boundary that follows
    wins, as the alternation's first matching alternative does.
    """
    at = start + 2
    for boundary in lowers:
        if lowered.startswith(boundary, at):
            return at + len(boundary)
    return -1


def _delimiters(
    raw: bytes, boundaries: set[bytes], col: Collector, lowered: bytes
) -> list[tuple[int, int, bool, bytes]]:
    """(start, end after its EOL, is-close, boundary in lower case) of every line that delimits
    a declared boundary. ``lowered``: ``raw.lower()``."""
    by_lower: dict[bytes, set[bytes]] = {}
    for b in boundaries:
        by_lower.setdefault(b.lower(), set()).add(b)
    lowers = sorted(by_lower, key=len, reverse=True)
    prefixed = {b for b in lowers if any(o != b and b.startswith(o) for o in lowers)}
    out: list[tuple[int, int, bool, bytes]] = []
    for start in delimiter_starts(raw):
        end = match_delimiter(raw, lowered, start, lowers)
        if end < 0:
            continue
        col.budget.check_parts(len(out))
        eol = _EOL.search(raw, end)
        line_end, after = (eol.start(), eol.end()) if eol else (len(raw), len(raw))
        matched = raw[start + 2 : end]
        tail = raw[end:line_end].rstrip(b" \t")
        is_close = tail.startswith(b"--")
        if tail not in (b"", b"--"):
            col.anomaly(A.BOUNDARY_COLLISION)  # a prefix-matching client cuts here, Python not
        elif matched.lower() in prefixed:
            col.anomaly(A.BOUNDARY_COLLISION)  # also a delimiter of a shorter boundary
        if matched not in by_lower[matched.lower()]:
            col.anomaly(A.BOUNDARY_VARIANT)
        out.append((start, after, is_close, matched.lower()))
    return out


def read(raw: bytes, col: Collector, *, prefix: str, depth: int) -> None:
    """Cut ``raw`` at every delimiter line and record each piece's decoded body."""
    lowered = raw.lower()
    boundaries = declared_boundaries(raw, lowered)
    col.budget.check_parts(len(boundaries))
    delimiters = _delimiters(raw, boundaries, col, lowered) if boundaries else []
    closed = sum(1 for d in delimiters if d[2])
    if delimiters and not closed:
        col.anomaly(A.MISSING_BOUNDARY_END)
    digests = digest_boundaries(raw, lowered) if delimiters else set()
    pieces: list[tuple[bytes, bool, str]] = []  # (piece, follows a close delimiter, default type)
    prev, prev_close, prev_default = 0, False, "text/plain"
    for start, after, is_close, boundary in delimiters:
        pieces.append((raw[prev : _preceding_eol(raw, start)], prev_close, prev_default))
        prev, prev_close = after, is_close
        prev_default = "message/rfc822" if boundary in digests else "text/plain"
    pieces.append((raw[prev:], prev_close, prev_default))
    base = f"{prefix}." if prefix else ""
    for index, (piece, after_close, default_type) in enumerate(pieces):
        col.budget.check_parts(index)
        path = f"{base}raw{index}" if index else (f"{prefix}" or "raw0")
        _read_piece(
            piece,
            col,
            path=path,
            is_top=index == 0,
            after_close=after_close,
            depth=depth,
            default_type=default_type,
        )


def _read_piece(
    piece: bytes,
    col: Collector,
    *,
    path: str,
    is_top: bool,
    after_close: bool,
    depth: int,
    default_type: str = "text/plain",
) -> None:
    headers, body = split_headers(piece)
    if after_close and not any(k.startswith("content-") for k, _ in headers):
        col.outside(view=VIEW, path=path, body=piece)  # an epilogue
        return
    if not piece.strip() and not is_top:
        return
    level = depth
    while True:
        col.budget.check_depth(level)
        ct_values = [v for k, v in headers if k == "content-type"]
        ctype = main_value(ct_values[0]) if ct_values else default_type
        if "/" not in ctype:
            ctype = "text/plain"  # what Python assumes for a missing or invalid type
        if ctype == "message/partial":
            col.anomaly(A.MESSAGE_PARTIAL)
        if ctype.startswith("multipart/"):
            col.outside(view=VIEW, path=path, body=body)  # a preamble
            return
        elif ctype == "message/delivery-status":
            col.add(body, path=path, view=VIEW, content_types=[ctype])
            return
        elif ctype.startswith("message/"):
            ctes = [v for k, v in headers if k == "content-transfer-encoding"]
            if ctes and classify_cte(ctes[0])[0] in (BASE64, QUOTED_PRINTABLE):
                inner = col.decode(body, ctes[0]).primary
                col.add(inner, path=path, view=VIEW, content_types=[ctype])
                col.embed(inner, path, level + 1)
                return
            headers, body = split_headers(body)  # the enclosed message, read in place
            default_type = "text/plain"
            level += 1
            continue
        col.leaf(view=VIEW, path=path, headers=headers, body=body, content_type=ctype)
        return
