"""Malformed legitimate mail is clean; readings that disagree about risky content are not.

Issue 20: an anomaly alone must not quarantine mail from a broken mailer; an anomaly that makes
readings disagree about an executable, script, archive or macro document must. The rule is in
``mailtower.scanning.mime._anomalies`` and ``mailtower.scanning.risk``.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from name_evasions import _zip, _zip_entry

from mailtower.scanning import containers
from mailtower.scanning.engines import Finding
from mailtower.scanning.mime import analyse, is_hostile
from mailtower.scanning.objects import ScanObject
from mailtower.scanning.pipeline import Pipeline, in_process
from mailtower.scanning.risk import names_disagree_about_risk, risky_content
from mailtower.scanning.scan import Kind

DATA = Path(__file__).resolve().parents[1] / "data" / "malformed-legitimate"
SAMPLES = sorted(DATA.glob("*.txt"))


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return in_process()


def test_the_samples_are_there() -> None:
    assert len(SAMPLES) == 4


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_malformed_legitimate_mail_is_clean(pipeline: Pipeline, path: Path) -> None:
    verdict = pipeline.scan(path.read_bytes())
    assert verdict.kind is Kind.CLEAN, verdict.reason
    # The disagreement is recorded all the same, beside the verdict.
    assert any(a in verdict.anomalies for a in ("mime.views-disagree", "mime.filename-mismatch"))


def _text_html_with_parts(hidden_type: str, hidden: bytes) -> bytes:
    """msg_40's construction: a boundary on a text/html body; only some readings split it."""
    encoded = base64.b64encode(hidden).decode()
    return (
        "From: a@example.com\r\nTo: b@example.net\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
        'Content-Type: text/html; boundary="--961284236552522269"\r\n\r\n'
        "----961284236552522269\r\nContent-Type: text/html;\r\n\r\n<html></html>\r\n"
        f"----961284236552522269\r\nContent-Type: {hidden_type}\r\n"
        f"Content-Transfer-Encoding: base64\r\n\r\n{encoded}\r\n"
        "----961284236552522269--\r\n"
    ).encode()


PE = b"MZ" + bytes(0x3A) + (0x40).to_bytes(4, "little") + b"PE\0\0" + bytes(64)
SCRIPT = b'Set s = CreateObject("WScript.Shell")\r\ns.Run "calc"\r\n'


@pytest.mark.parametrize(
    ("hidden", "kind"),
    [(PE, "executable"), (SCRIPT, "script"), (_zip([_zip_entry(b"a.txt", b"hi")]), "archive")],
)
def test_readings_that_disagree_about_risky_content_are_hostile(
    pipeline: Pipeline, hidden: bytes, kind: str
) -> None:
    assert risky_content(hidden) == kind
    analysis = analyse(_text_html_with_parts("application/octet-stream", hidden))
    assert "mime.views-disagree" in analysis.anomalies
    assert "mime.risky-disagreement:views-disagree" in analysis.anomalies
    assert is_hostile("mime.risky-disagreement:views-disagree")
    verdict = pipeline.scan(_text_html_with_parts("application/octet-stream", hidden))
    assert verdict.kind is not Kind.CLEAN


def test_the_same_disagreement_about_harmless_content_is_informational(
    pipeline: Pipeline,
) -> None:
    raw = _text_html_with_parts("image/gif", b"GIF89a\x01\x00\x01\x00 not much of a picture")
    verdict = pipeline.scan(raw)
    assert verdict.kind is Kind.CLEAN, verdict.reason
    assert Finding("mime", "mime.views-disagree", "message") in verdict.findings


@pytest.mark.parametrize(
    ("names", "risky"),
    [
        ({"clock.bmp,69c", "clock.bmp"}, False),
        ({"report.xls", "report.xlsx"}, False),  # no macro in a name: only in content
        ({"a.pdf", "a.zip"}, False),
        ({"a.pdf", "a.exe"}, True),
        ({"notes.txt", "notes.vbs"}, True),
        ({"a.pdf", "a.pdf\x00.js"}, True),
        ({"a.exe", "b.exe"}, False),  # both readings see a program (the policy bans it)
        ({"setup", "setup.scr"}, True),
    ],
)
def test_names_disagree_about_risk_when_their_extensions_differ_and_one_runs(
    names: set[str], risky: bool
) -> None:
    assert names_disagree_about_risk(names) is risky


def _mismatch(ct_name: str, cd_name: str) -> bytes:
    return (
        "From: a@example.com\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
        f'Content-Type: application/octet-stream; name="{ct_name}"\r\n'
        f'Content-Disposition: attachment; filename="{cd_name}"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\naGVsbG8gdGhlcmUK\r\n--b--\r\n"
    ).encode()


def test_a_file_name_mismatch_is_hostile_only_about_a_risky_extension() -> None:
    harmless = analyse(_mismatch("clock.bmp,69c", "clock.bmp")).anomalies
    assert "mime.filename-mismatch" in harmless
    assert not [a for a in harmless if is_hostile(a)]
    risky = analyse(_mismatch("song.wav", "song.exe")).anomalies
    assert "mime.risky-disagreement:filename-mismatch" in risky


def test_base64_junk_is_hostile_only_when_a_decoding_is_risky() -> None:
    junk = "!".join(base64.b64encode(PE).decode()[i : i + 8] for i in range(0, 120, 8))
    raw = (
        "From: a@example.com\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
        "Content-Type: image/gif\r\nContent-Transfer-Encoding: base64\r\n\r\n{}\r\n--b--\r\n"
    )
    assert "mime.risky-disagreement:base64-junk" in analyse(raw.format(junk).encode()).anomalies
    harmless = analyse(raw.format("Some removed base64 encoded chars.").encode()).anomalies
    assert "mime.base64-junk" in harmless
    assert not [a for a in harmless if is_hostile(a)]


@pytest.mark.parametrize(
    ("central", "local", "anomaly"),
    [
        (b"report.pdf", b"report.txt", containers.ANOMALY_NAMES_DIFFER),
        (b"report.pdf", b"report.exe", containers.ANOMALY_CORRUPT),
    ],
)
def test_zip_names_that_differ_are_corrupt_only_about_a_risky_extension(
    central: bytes, local: bytes, anomaly: str
) -> None:
    archive = _zip([_zip_entry(central, b"hello\n", local_name=local)])
    _members, found = containers.expand(ScanObject(archive, "1"), containers.ContainerLimits())
    assert found == [anomaly]
    assert (anomaly in containers.INFORMATIONAL_ANOMALIES) is (anomaly != "container.corrupt")
