"""The pure scanning decision."""

from __future__ import annotations

import pytest

from mailtower.scanning import testdata
from mailtower.scanning.engines import Finding
from mailtower.scanning.engines.testing import PatternEngine
from mailtower.scanning.scan import Kind, message_id, scan_message

CLEAN = b"From: a@example.org\r\nMessage-ID: <m1@example.org>\r\n\r\nhello\r\n"
INFECTED = b"From: a@example.org\r\n\r\nbefore " + testdata.marker() + b" after\r\n"


def test_clean() -> None:
    verdict = scan_message(CLEAN, [PatternEngine()])
    assert verdict.kind is Kind.CLEAN
    assert verdict.findings == ()


def test_virus() -> None:
    verdict = scan_message(INFECTED, [PatternEngine()])
    assert verdict.kind is Kind.VIRUS
    assert verdict.findings == (Finding("test", "Mailtower.Test.Marker"),)
    assert "Mailtower.Test.Marker" in verdict.reason


@pytest.mark.parametrize("mode", ["fail", "hang"])
def test_engine_failure_is_tempfail(mode: str) -> None:
    engine = PatternEngine(timeout_s=0.05)
    engine.mode = mode
    verdict = scan_message(CLEAN, [engine])
    assert verdict.kind is Kind.TEMPFAIL
    assert "test" in verdict.reason
    assert verdict.runs[0].error in ("EngineUnavailable", "EngineTimeout")


def test_one_failing_engine_of_two_is_tempfail_for_clean_mail() -> None:
    broken = PatternEngine(name="broken")
    broken.mode = "fail"
    verdict = scan_message(CLEAN, [PatternEngine(), broken])
    assert verdict.kind is Kind.TEMPFAIL


def test_finding_outranks_failure_and_all_engines_run() -> None:
    broken = PatternEngine(name="broken")
    broken.mode = "fail"
    second = PatternEngine(name="second")
    verdict = scan_message(INFECTED, [PatternEngine(), broken, second])
    assert verdict.kind is Kind.VIRUS
    assert [f.engine for f in verdict.findings] == ["test", "second"]
    assert second.calls == 1


def test_no_engine_never_passes() -> None:
    assert scan_message(CLEAN, []).kind is Kind.TEMPFAIL


def test_message_id() -> None:
    assert message_id(CLEAN) == "<m1@example.org>"
    assert message_id(b"Subject: x\r\n\r\nMessage-ID: <in-body@x>\r\n") is None
    assert message_id(b"Subject: x\n\nbody") is None
