"""One scan, several policies: a customer's bans and size limit, decided per policy while the
message is parsed and scanned once."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from archive_builders import with_encrypted_flag as encrypted
from archive_builders import zip_of
from pipeline_fixtures import message, with_attachment

from mailtower.scanning.engines import Finding
from mailtower.scanning.engines.testing import PatternEngine
from mailtower.scanning.objects import ScanObject
from mailtower.scanning.pipeline import Pipeline, Policy, in_process
from mailtower.scanning.scan import Kind


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return in_process()


class CountingObjects:
    """An object engine that counts its calls."""

    name = "count-objects"

    def __init__(self) -> None:
        self.calls = 0

    def scan_objects(self, objects: Iterable[ScanObject]) -> list[Finding]:
        self.calls += 1
        list(objects)
        return []

    def scan(self, data: bytes) -> list[Finding]:
        return []

    def health(self, timeout: float) -> str:
        return "count 1"


def test_a_banned_name_glob_matches_any_case_and_windows_trailing_dots(
    pipeline: Pipeline,
) -> None:
    raw = with_attachment(b"figures", "Invoice_2024.PDF. .", "application/pdf")
    policy = Policy(banned_names=("invoice_*.pdf",))
    verdict = pipeline.scan_for(raw, [policy])[0]
    assert verdict.kind is Kind.BANNED
    assert Finding("policy", "policy.banned-name", "2") in verdict.findings
    assert pipeline.scan(raw).kind is Kind.CLEAN


def test_a_banned_name_inside_an_archive_and_behind_a_nul(pipeline: Pipeline) -> None:
    archive = zip_of({"docs/payroll.xlsx": b"numbers"})
    raw = with_attachment(archive, "a.zip", "application/zip")
    policy = Policy(banned_names=("payroll.*",))
    assert Finding("policy", "policy.banned-name", "2!docs/payroll.xlsx") in (
        pipeline.scan_for(raw, [policy])[0].findings
    )
    hidden = with_attachment(b"x", "payroll.xlsx\x00.txt", "text/plain")
    assert pipeline.scan_for(hidden, [policy])[0].kind is Kind.BANNED


def test_a_name_that_does_not_match_is_not_banned(pipeline: Pipeline) -> None:
    raw = with_attachment(b"figures", "report.pdf", "application/pdf")
    assert pipeline.scan_for(raw, [Policy(banned_names=("invoice*",))])[0].kind is Kind.CLEAN


def test_a_message_over_the_policys_size_is_banned(pipeline: Pipeline) -> None:
    raw = message(body="x" * 5000 + "\n").as_bytes()
    small, large = Policy(max_message_bytes=2048), Policy(max_message_bytes=len(raw))
    verdicts = pipeline.scan_for(raw, [small, large, Policy()])
    assert [v.kind for v in verdicts] == [Kind.BANNED, Kind.CLEAN, Kind.CLEAN]
    assert Finding("policy", "policy.max-size", "message") in verdicts[0].findings
    assert "policy.max-size" not in {f.name for f in verdicts[1].findings}


def test_encrypted_archives_are_decided_per_policy(pipeline: Pipeline) -> None:
    raw = with_attachment(encrypted(zip_of({"a.txt": b"secret"})), "s.zip", "application/zip")
    strict, lenient = Policy(), Policy(encrypted_archives="pass")
    verdicts = pipeline.scan_for(raw, [strict, lenient, strict])
    assert [v.kind for v in verdicts] == [Kind.SUSPICIOUS, Kind.CLEAN, Kind.SUSPICIOUS]
    # Recorded either way.
    assert all(Finding("container", "container.encrypted", "2") in v.findings for v in verdicts)


def test_n_policies_cost_one_scan(pipeline: Pipeline) -> None:
    whole, objects = PatternEngine(timeout_s=5.0), CountingObjects()  # both count calls
    counted = Pipeline([whole, objects, *pipeline.engines], skeptic=pipeline.skeptic)
    raw = with_attachment(b"figures", "report.pdf", "application/pdf")
    policies = [Policy(banned_names=(f"x{i}*",)) for i in range(5)] + [
        Policy(banned_names=("report.*",))
    ]
    verdicts = counted.scan_for(raw, policies)
    assert (whole.calls, objects.calls) == (1, 1)
    assert [v.kind for v in verdicts] == [Kind.CLEAN] * 5 + [Kind.BANNED]


def test_scan_is_scan_for_its_own_policy(pipeline: Pipeline) -> None:
    raw = with_attachment(b"MZ" + b"\0" * 100, "tool.exe", "application/octet-stream")
    one, other = pipeline.scan(raw), pipeline.scan_for(raw, [pipeline.policy])[0]
    assert (one.kind, one.findings, one.reason) == (other.kind, other.findings, other.reason)
    assert one.kind is Kind.BANNED
    assert pipeline.scan_for(raw, []) == []


def test_no_engine_tempfails_under_every_policy() -> None:
    verdicts = Pipeline([]).scan_for(message().as_bytes(), [Policy(), Policy(max_message_bytes=1)])
    assert [v.kind for v in verdicts] == [Kind.TEMPFAIL, Kind.TEMPFAIL]
