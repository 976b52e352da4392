"""The MIME readers' fast scanning (bytes.find, fast paths) finds exactly what the regular
expressions and loops it replaced found.

The references below are the code the readers used before (kept here, not in the readers):
the fast scanning must give the same positions, matches and pieces on any input.
"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st
from mime_builders import EICAR, attachment_message
from mime_mutations import Base, chunk, mutated

from mailtower.scanning.mime import _email_reader, _transfer
from mailtower.scanning.mime._boundary_reader import (
    _BOUNDARY_PARAM,
    _DIGEST_HEADER,
    declared_boundaries,
    delimiter_starts,
    digest_boundaries,
    match_delimiter,
)
from mailtower.scanning.mime._collect import Collector
from mailtower.scanning.mime._encoded_blocks import _segments
from mailtower.scanning.mime._limits import Budget, MimeLimits
from mailtower.scanning.mime._transfer import _b64_chunks

REFERENCE_DELIMITER_START = re.compile(rb"(?:^|(?<=[\r\n]))--")
BASE = Base(attachment_message(eol="\r\n"), EICAR)
DIGEST = Base(
    b"Content-Type: multipart/mixed; boundary=outer\r\n\r\n--outer\r\n"
    b'Content-Type: Multipart/Digest;\r\n BOUNDARY="d1"; x=y\r\n\r\n--d1\r\n\r\n'
    b"Subject: inner\r\n\r\nhi\r\n--d1--\r\n--outer--\r\n"
)
# Inputs rich in what the scanning looks for: line ends, dashes, "boundary" in any case.
_parts = st.one_of(
    chunk,
    st.sampled_from(
        [b"-", b"---", b"\r\n--", b"\n--", b"\r--", b"BoUnDaRy", b"boundary*0*=", b"\n\t"]
        + [b"multipart/digest", b"content-type:", b"'", b"\r\n "]
    ),
)
hostile_bytes = st.lists(_parts, max_size=40).map(b"".join)
inputs = st.one_of(
    hostile_bytes,
    st.binary(max_size=400),
    mutated(BASE, protect_body=False).map(lambda case: case[0]),
    mutated(DIGEST, protect_body=False).map(lambda case: case[0]),
)


def reference_declared(raw: bytes) -> set[bytes]:
    found: set[bytes] = set()
    for m in _BOUNDARY_PARAM.finditer(raw):
        value = next(g for g in m.groups() if g is not None).rstrip()
        for cand in (value, value.split(b"'", 2)[-1] if value.count(b"'") >= 2 else value):
            if 0 < len(cand) <= 200:
                found.add(cand)
    return found


def reference_digest(raw: bytes) -> set[bytes]:
    found: set[bytes] = set()
    for m in _DIGEST_HEADER.finditer(raw):
        found |= {b.lower() for b in reference_declared(m.group(1))}
    return found


@settings(max_examples=400, deadline=None)
@given(inputs)
def test_delimiter_starts_are_the_regex_positions(raw: bytes) -> None:
    expected = [m.start() for m in REFERENCE_DELIMITER_START.finditer(raw)]
    assert delimiter_starts(raw) == expected


@settings(max_examples=400, deadline=None)
@given(inputs)
def test_declared_boundaries_are_the_regex_ones(raw: bytes) -> None:
    assert declared_boundaries(raw) == reference_declared(raw)
    assert declared_boundaries(raw, raw.lower()) == reference_declared(raw)


@settings(max_examples=300, deadline=None)
@given(inputs)
def test_digest_boundaries_are_the_regex_ones(raw: bytes) -> None:
    assert digest_boundaries(raw) == reference_digest(raw)


def reference_delimiter_ends(raw: bytes, boundaries: set[bytes]) -> list[int]:
    """Where the delimiter regex the boundary reader compiled per message ended its matches."""
    lowers = sorted({b.lower() for b in boundaries}, key=len, reverse=True)
    pattern = re.compile(b"--(" + b"|".join(re.escape(b) for b in lowers) + b")", re.IGNORECASE)
    return [m.end() if (m := pattern.match(raw, s)) else -1 for s in delimiter_starts(raw)]


_boundary = st.sampled_from([b"a", b"A", b"ab", b"aB-", b"=_x", b"b'c", b"a.b", b"Ab", b"-"])


@settings(max_examples=400, deadline=None)
@given(inputs, st.sets(_boundary, min_size=1, max_size=4))
def test_delimiter_matches_are_the_regex_ones(raw: bytes, extra: set[bytes]) -> None:
    for boundaries in (declared_boundaries(raw) or extra, extra):
        lowers = sorted({b.lower() for b in boundaries}, key=len, reverse=True)
        starts = delimiter_starts(raw)
        found = [match_delimiter(raw, raw.lower(), s, lowers) for s in starts]
        assert found == reference_delimiter_ends(raw, boundaries)


def test_examples_where_the_scans_could_part_ways() -> None:
    # A declaration inside an earlier one's quoted value is not a declaration of its own.
    nested = b'Content-Type: multipart/mixed; boundary="a; boundary=b"\r\n'
    assert declared_boundaries(nested) == reference_declared(nested) == {b"a; boundary=b"}
    # At the very start, and right after a separator in any case.
    start = b"boundary=x;BOUNDARY=y\tBoundary = z"
    assert declared_boundaries(start) == reference_declared(start) == {b"x", b"y", b"z"}
    # Mixed line ends: positions come back in order.
    mixed = b"--a\r--b\n--c\r\n--d---e\n-x\r\n--"
    assert delimiter_starts(mixed) == [0, 4, 8, 13, 25]
    assert delimiter_starts(mixed) == [m.start() for m in REFERENCE_DELIMITER_START.finditer(mixed)]
    assert digest_boundaries(DIGEST.raw) == reference_digest(DIGEST.raw) == {b"d1"}
    # A boundary that is a prefix of another, in another case: the longer one wins.
    colliding = b"--AB--\r\n--a\r\n--Abc\r\n--x"
    lowers = [b"abc", b"ab", b"a"]
    found = [match_delimiter(colliding, colliding.lower(), s, lowers) for s in (0, 8, 13, 20)]
    assert found == reference_delimiter_ends(colliding, {b"a", b"ab", b"abc"}) == [4, 11, 18, -1]


def reference_segments(lines: list[bytes]) -> list[list[bytes]]:
    out: list[list[bytes]] = []
    for line in lines:
        seg = out[-1] if out else None
        if seg and len(line) <= len(seg[0]) and len(seg[-1]) == len(seg[0]):
            seg.append(line)
        else:
            out.append([line])
    return out


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from([b"A" * 76, b"A" * 76, b"A" * 40, b"A" * 4, b"A" * 80]), max_size=8)
)
def test_base64_run_segments_are_the_loop_ones(lines: list[bytes]) -> None:
    assert _segments(lines) == reference_segments(lines)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"QUJD", b"=", b"==", b"RA", b"x"]), max_size=12).map(b"".join))
def test_base64_streams_split_as_the_regex_splits(clean: bytes) -> None:
    assert _b64_chunks(clean) == [c for c in re.split(rb"=+", clean) if c]


# Headers on which the two email policies read a part's type or boundary differently (RFC 2047
# words, RFC 2231 continuations, comments, odd quoting): the shared parse must notice them.
_POLICY_SPLITTERS = Base(
    # The default policy decodes the RFC 2047 word in the boundary ("b") and reads a part;
    # compat32 takes the boundary literally and reads none.
    b'Content-Type: multipart/mixed; boundary="=?utf-8?q?b?="\r\n\r\n'
    b"--b\r\nContent-Type: =?utf-8?q?text/html?=\r\n\r\nx\r\n--b\r\n"
    b'Content-Type: application/octet-stream; name="f.exe"\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAAAAAAAAAAA\r\n"
    b"--b--\r\n"
)
email_inputs = st.one_of(
    inputs, mutated(_POLICY_SPLITTERS, protect_body=False).map(lambda case: case[0])
)


def _email_readings(raw: bytes, shared: bool) -> tuple[list[object], list[str]]:
    col = Collector(Budget(MimeLimits()))
    parse = _email_reader.SharedParse(raw) if shared else None
    for view in ("email-default", "email-compat32"):
        try:
            _email_reader.read(view, raw, col, prefix="", depth=0, shared=parse)
        except Exception as exc:
            col.anomaly(f"raised:{view}:{type(exc).__name__}")
    objects = [
        (e.data, e.path, sorted(e.filenames), sorted(e.content_types), sorted(e.views))
        for e in col.entries.values()
    ]
    return objects, list(col.anomalies) + sorted(f"{v}:{n}" for v, n in col.names.items())


@settings(max_examples=400, deadline=None)
@given(email_inputs)
def test_one_shared_parse_reads_as_two_parses(raw: bytes) -> None:
    assert _email_readings(raw, shared=True) == _email_readings(raw, shared=False)


def test_policies_that_cut_differently_parse_twice() -> None:
    parse = _email_reader.SharedParse(_POLICY_SPLITTERS.raw)
    default_tree = parse.tree("email-default")
    compat_tree = parse.tree("email-compat32")
    assert default_tree is not compat_tree  # the policies cut it differently
    assert _email_readings(_POLICY_SPLITTERS.raw, True) == _email_readings(
        _POLICY_SPLITTERS.raw, False
    )


def reference_odd_lines(body: bytes, has_junk: bool) -> bool:
    lines = body.rstrip().split(b"\n")[:-1]
    if not has_junk:
        return any(n % 4 for n in {len(ln.strip()) for ln in lines})
    return any(len(ln.translate(None, _transfer._NOT_B64)) % 4 for ln in lines)


_LINE_PIECES = st.lists(
    st.sampled_from(
        [b"QUJD", b"QUI", b"=", b"==", b"\r\n", b"\n", b"\r", b" ", b"\t", b"\x0b", b"A", b"*"]
    ),
    max_size=40,
)


@settings(max_examples=2000, deadline=None)
@given(_LINE_PIECES, st.booleans())
def test_odd_lines_finds_what_the_line_loop_found(pieces: list[bytes], has_junk: bool) -> None:
    body = b"".join(pieces)
    assert _transfer._odd_lines(body, has_junk) == reference_odd_lines(body, has_junk)


def test_odd_lines_on_encoder_shaped_bodies() -> None:
    even = b"QUJD" * 19 + b"\r\n"
    assert not _transfer._odd_lines(even * 50 + b"QUI=\r\n", False)
    assert _transfer._odd_lines(even * 5 + b"QUJDQ\r\n" + even * 5, False)
    assert _transfer._odd_lines(even * 5 + b"QUJDQ \r\n" + even * 5, False)  # strip, then 5
