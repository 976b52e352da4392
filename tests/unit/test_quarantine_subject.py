"""mailtower.quarantine.subject_of: the Subject as the quarantine row holds it."""

from __future__ import annotations

import pytest

from mailtower.quarantine import SUBJECT_MAX, subject_of


def test_encoded_words_are_decoded_and_folding_undone() -> None:
    raw = b"From: a@b\r\nSubject: =?utf-8?b?SGVsbG8g4pyT?=\r\n world\r\n\r\nSubject: body"
    assert subject_of(raw) == "Hello \u2713 world"


def test_first_subject_of_the_header_block_only() -> None:
    assert subject_of(b"To: x\n\nSubject: in the body\n") == ""
    assert subject_of(b"subject:  one \nSUBJECT: two\n\n") == "one"


@pytest.mark.parametrize(
    "raw",
    [
        b"Subject: =?x-no-such-charset?q?caf=E9?=\r\n\r\n",
        b"Subject: =?utf-8?b?!!!not base64?=\r\n\r\n",
        b"Subject: =?utf-8?q?unterminated\r\n\r\n",
        b"Subject: \xff\xfe raw bytes \xc3\r\n\r\n",
        b"Subject:\r\n\r\n",
        b"\x00\x01\x02",
        b"",
    ],
)
def test_malformed_subjects_never_raise(raw: bytes) -> None:
    text = subject_of(raw)
    assert isinstance(text, str)
    assert all(c.isprintable() or c == " " for c in text)
    text.encode("utf-8")  # PostgreSQL text: no lone surrogates


def test_control_characters_and_nul_are_removed() -> None:
    raw = b"Subject: =?utf-8?q?a=00b=1B[31mc=07?=\x1b]0;x\x07\r\n\r\n"
    text = subject_of(raw)
    assert "\x00" not in text and "\x1b" not in text and "\x07" not in text
    assert text.startswith("ab[31mc")


def test_bounded_to_998_characters() -> None:
    assert len(subject_of(b"Subject: " + b"a" * 5000 + b"\r\n\r\n")) == SUBJECT_MAX
    encoded = b"=?utf-8?b?" + b"4pyT" * 400 + b"?="
    assert len(subject_of(b"Subject: " + b" ".join([encoded] * 4) + b"\r\n\r\n")) <= SUBJECT_MAX


def test_latin1_header_bytes_are_read() -> None:
    assert subject_of(b"Subject: caf\xe9\n\n") == "caf\xe9"
