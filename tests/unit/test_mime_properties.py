"""Property tests: mutated MIME never crashes the parser nor loses an intact payload."""

from __future__ import annotations

import base64
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mime_builders import EICAR, attachment_message, decoded_objects
from mime_mutations import Base, mutated

from mailtower.scanning.mime import MimeLimits, analyse
from mailtower.scanning.mime._transfer import decode_base64

LIMITS = MimeLimits(max_time_s=5.0)
B64 = base64.b64encode(EICAR)
BASE = Base(attachment_message(eol="\r\n"), EICAR)
PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def _analyse_timed(data: bytes):
    start = time.monotonic()
    result = analyse(data, limits=LIMITS)
    elapsed = time.monotonic() - start
    # The budget is checked between steps: allow one step's overrun on a busy machine.
    assert elapsed < LIMITS.max_time_s + 2
    assert result.objects[0].data == data
    return result


@PROPERTY_SETTINGS
@given(mutated(BASE, protect_body=True))
def test_mutated_mime_around_an_intact_body_still_yields_the_payload(case) -> None:
    data, _log = case
    result = _analyse_timed(data)
    assert decoded_objects(result, EICAR), (data, result.anomalies)


@PROPERTY_SETTINGS
@given(mutated(BASE, protect_body=False))
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
