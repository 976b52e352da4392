"""Property tests: mutated MIME never crashes the parser nor loses an intact payload."""

from __future__ import annotations

import base64
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mime_builders import EICAR, attachment_message, decoded_objects

from mailtower.mime import MimeLimits, analyse
from mailtower.mime._transfer import decode_base64

LIMITS = MimeLimits(max_time_s=5.0)
BASE = attachment_message(eol="\r\n")
BASE_LINES = BASE.splitlines(keepends=True)
B64 = base64.b64encode(EICAR)
BODY = {i for i, line in enumerate(BASE_LINES) if line.strip() and line.strip() in B64}
BODY_START, BODY_END = min(BODY), max(BODY)
assert set(range(BODY_START, BODY_END + 1)) == BODY
PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

# Bytes that matter to MIME parsers, plus anything at all.
_interesting = st.sampled_from(
    [
        b"\r\n",
        b"\n",
        b"\r",
        b"--",
        b";",
        b":",
        b'"',
        b"=",
        b" ",
        b"\t",
        b"\x00",
        b"==b0undary==",
        b"boundary=",
        b"Content-Type: ",
        b"multipart/mixed",
        b"base64",
        b"=?",
        b"?=",
    ]
)
_chunk = st.one_of(_interesting, st.binary(min_size=1, max_size=8))
_insert_line = st.one_of(
    st.lists(_chunk, min_size=1, max_size=4).map(lambda parts: b"".join(parts) + b"\r\n"),
    st.sampled_from(BASE_LINES),
)


@st.composite
def mutated(draw: st.DrawFn, *, protect_body: bool) -> tuple[bytes, list[str]]:
    """The base message after 1-6 random mutations; with ``protect_body`` the base64 lines
    stay intact, whole lines (the MIME around them — headers, boundaries — changes)."""
    lines = [(line, i in BODY) for i, line in enumerate(BASE_LINES)]
    log: list[str] = []
    for _ in range(draw(st.integers(1, 6))):
        targets = [i for i, (_, body) in enumerate(lines) if not (protect_body and body)]
        op = draw(st.sampled_from(["del", "dup", "ins", "del-bytes", "ins-bytes", "case", "cut"]))
        if op == "cut":
            floor = max((i for i, (_, b) in enumerate(lines) if b), default=-1) + 1
            if protect_body and floor >= len(lines):
                continue
            at = draw(st.integers(floor if protect_body else 0, len(lines)))
            keep = lines[:at]
            if at < len(lines) and draw(st.booleans()):
                text, body = lines[at]
                keep.append((text[: draw(st.integers(0, len(text)))], body))
            lines = keep
        elif op == "ins":
            at = draw(st.integers(0, len(lines)))
            if protect_body and 0 < at < len(lines) and lines[at - 1][1] and lines[at][1]:
                continue  # not between two lines of the base64 body
            lines.insert(at, (draw(_insert_line), False))
        elif not targets:
            continue
        else:
            i = draw(st.sampled_from(targets))
            text, body = lines[i]
            if op == "del":
                del lines[i]
            elif op == "dup":
                lines.insert(i, (text, False))
            elif op == "case":
                lines[i] = (text.swapcase(), body)
            else:
                # Keeping each line's own end keeps the base64 lines whole lines.
                end = len(text.rstrip(b"\r\n")) if protect_body else len(text)
                at = draw(st.integers(0, end))
                if op == "del-bytes":
                    cut = min(at + draw(st.integers(1, 12)), end)
                    lines[i] = (text[:at] + text[cut:], body)
                else:
                    lines[i] = (text[:at] + draw(_chunk) + text[at:], body)
        log.append(op)
    return b"".join(text for text, _ in lines), log


def _analyse_timed(data: bytes):
    start = time.monotonic()
    result = analyse(data, limits=LIMITS)
    elapsed = time.monotonic() - start
    # The budget is checked between steps: allow one step's overrun on a busy machine.
    assert elapsed < LIMITS.max_time_s + 2
    assert result.objects[0].data == data
    return result


@PROPERTY_SETTINGS
@given(mutated(protect_body=True))
def test_mutated_mime_around_an_intact_body_still_yields_the_payload(case) -> None:
    data, _log = case
    result = _analyse_timed(data)
    assert decoded_objects(result, EICAR), (data, result.anomalies)


@PROPERTY_SETTINGS
@given(mutated(protect_body=False))
def test_any_mutation_never_raises(case) -> None:
    data, _log = case
    _analyse_timed(data)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=3000))
def test_random_bytes_never_raise(data: bytes) -> None:
    _analyse_timed(b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n" + data)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, len(B64)), st.binary(min_size=1, max_size=3)), max_size=6),
    st.integers(1, 80),
)
def test_base64_junk_and_line_lengths_never_lose_the_data(junk, width: int) -> None:
    text = bytearray(B64)
    for at, chunk in sorted(junk, reverse=True):
        # Junk outside the base64 alphabet and padding: a lenient client skips it.
        cleaned = bytes(
            b
            for b in chunk
            if b not in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_"
        )
        text[at:at] = cleaned
    body = b"\r\n".join(bytes(text[i : i + width]) for i in range(0, len(text), width))
    decoded = decode_base64(body)
    assert EICAR in decoded.primary or any(EICAR in alt for alt in decoded.alternatives)
