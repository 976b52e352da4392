"""The full scanning pipeline: MIME → containers → engines → Skeptic → policy → one verdict."""

from __future__ import annotations

import base64
import io
import os
import tarfile
import threading
import time
from collections.abc import Callable

import pytest
from archive_builders import with_encrypted_flag as encrypted
from archive_builders import zip_of
from pipeline_fixtures import (
    EICAR,
    ORDINARY,
    elf,
    message,
    pe,
    with_attachment,
)
from skeptic_fixtures import MASS_MAILER_VBS, polymorph_vbs

from mailtower.scanning import testdata
from mailtower.scanning.engines import Engine, Finding
from mailtower.scanning.engines.testing import PatternEngine
from mailtower.scanning.pipeline import Pipeline, Policy, in_process, name_extension
from mailtower.scanning.scan import Kind, Verdict

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return in_process()


def names(verdict: Verdict) -> set[str]:
    return {f.name for f in verdict.findings}


def with_engine(pipeline: Pipeline, engine: Engine, *, policy: Policy | None = None) -> Pipeline:
    """``pipeline``'s engines, Skeptic and policy, plus ``engine``."""
    return Pipeline(
        [*pipeline.engines, engine], skeptic=pipeline.skeptic, policy=policy or pipeline.policy
    )


# -- viruses ------------------------------------------------------------------------------------


def test_eicar_attachment_is_a_virus_found_in_process(pipeline: Pipeline) -> None:
    verdict = pipeline.scan(with_attachment(EICAR, "eicar.txt", "text/plain"))
    assert verdict.kind is Kind.VIRUS
    found = {(f.engine, f.part) for f in verdict.findings if f.engine in ("yara", "reputation")}
    # Both in-process engines name the attachment's MIME path, not the whole message.
    assert found == {("yara", "2"), ("reputation", "2")}
    assert "Mailtower_EICAR_Test_File" in verdict.reason


def test_eicar_in_a_zip_in_a_zip(pipeline: Pipeline) -> None:
    inner = zip_of({"readme.txt": b"read me", "docs/eicar.txt": EICAR})
    outer = zip_of({"inner.zip": inner})
    verdict = pipeline.scan(with_attachment(outer, "archive.zip", "application/zip"))
    assert verdict.kind is Kind.VIRUS
    assert Finding("yara", "Mailtower_EICAR_Test_File", "2!inner.zip!docs/eicar.txt") in (
        verdict.findings
    )


def test_eicar_in_base64_with_junk_characters(pipeline: Pipeline) -> None:
    encoded = base64.b64encode(EICAR).decode()
    # Junk outside the base64 alphabet between the quanta: decoders that skip it (as most
    # mail clients do) still get the file.
    junky = "!".join(encoded[i : i + 8] for i in range(0, len(encoded), 8))
    raw = (
        "From: a@example.com\r\nTo: b@example.net\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
        "Content-Type: text/plain\r\n\r\nsee attachment\r\n--b\r\n"
        'Content-Type: application/octet-stream; name="file.txt"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n"
        f"{junky}\r\n--b--\r\n"
    ).encode()
    verdict = pipeline.scan(raw)
    assert verdict.kind is Kind.VIRUS
    assert "Mailtower_EICAR_Test_File" in names(verdict)
    assert "mime.base64-junk" in names(verdict)  # recorded too, outranked by the virus


def test_known_worm_is_a_virus_and_outranks_the_ban(pipeline: Pipeline) -> None:
    worm = polymorph_vbs(MASS_MAILER_VBS, seed=3).encode()
    verdict = pipeline.scan(with_attachment(worm, "notes.vbs", "text/plain"))
    assert verdict.kind is Kind.VIRUS
    assert "policy.banned-extension.vbs" in names(verdict)  # banned too, but virus wins
    assert any(n.startswith("skeptic.known-worm") for n in names(verdict))


def test_eicar_named_com_is_a_virus_not_banned(pipeline: Pipeline) -> None:
    verdict = pipeline.scan(with_attachment(EICAR, "eicar.com"))
    assert verdict.kind is Kind.VIRUS
    assert "policy.banned-extension.com" in names(verdict)


# -- policy -------------------------------------------------------------------------------------


def test_double_extension_is_banned_and_the_heuristic_recorded(pipeline: Pipeline) -> None:
    verdict = pipeline.scan(with_attachment(b"not really a program", "invoice.pdf.exe"))
    assert verdict.kind is Kind.BANNED
    assert Finding("policy", "policy.banned-extension.exe", "2") in verdict.findings
    assert "skeptic.disguised-exe.double-extension" in names(verdict)


@pytest.mark.parametrize(
    ("filename", "extension"),
    [
        ("setup.exe", "exe"),
        ("SETUP.EXE", "exe"),
        ("setup.exe. . ", "exe"),  # Windows drops trailing dots and spaces
        ("C:\\Users\\x\\run.BAT", "bat"),
        ("report.pdf", "pdf"),
        ("exe", ""),
        (".js", "js"),
        ("archive.tar.gz", "gz"),
    ],
)
def test_name_extension(filename: str, extension: str) -> None:
    assert name_extension(filename) == extension


def test_banned_name_inside_an_archive(pipeline: Pipeline) -> None:
    archive = zip_of({"docs/readme.txt": b"hello", "docs/tool.scr ": b"zz"})
    verdict = pipeline.scan(with_attachment(archive, "docs.zip", "application/zip"))
    assert verdict.kind is Kind.BANNED
    assert Finding("policy", "policy.banned-extension.scr", "2!docs/tool.scr ") in (
        verdict.findings
    )


def test_windows_program_without_a_telling_name_is_banned(pipeline: Pipeline) -> None:
    archive = zip_of({"setup": pe()})
    verdict = pipeline.scan(with_attachment(archive, "files.zip", "application/zip"))
    assert verdict.kind is Kind.BANNED
    assert Finding("policy", "policy.banned-native.pe", "2!setup") in verdict.findings


def test_zip_between_random_bytes_is_not_clean(pipeline: Pipeline) -> None:
    """Issue 15: a zip with 100 random bytes before it and 70 KB after it, which unzip
    extracts, must not pass as clean: its PE member is seen."""
    data = os.urandom(100) + zip_of({"invoice.exe": pe()}) + os.urandom(70 * 1024)
    verdict = pipeline.scan(with_attachment(data, "invoice.zip", "application/zip"))
    assert verdict.kind is Kind.BANNED
    assert Finding("policy", "policy.banned-extension.exe", "2!invoice.exe") in verdict.findings
    assert Finding("policy", "policy.banned-native.pe", "2!invoice.exe") in verdict.findings


def test_zip_appended_to_an_image_is_scanned(pipeline: Pipeline) -> None:
    image = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + os.urandom(3000) + b"\xff\xd9"
    data = image + zip_of({"docs/readme.txt": EICAR}) + os.urandom(70 * 1024)
    verdict = pipeline.scan(with_attachment(data, "photo.jpg", "image/jpeg"))
    assert verdict.kind is Kind.VIRUS
    assert Finding("yara", "Mailtower_EICAR_Test_File", "2!docs/readme.txt") in verdict.findings


def test_banned_declared_type(pipeline: Pipeline) -> None:
    verdict = pipeline.scan(with_attachment(b"data", "update.bin", "application/x-msdownload"))
    assert verdict.kind is Kind.BANNED
    assert "policy.banned-type.application/x-msdownload" in names(verdict)


def test_extra_banned_extension(pipeline: Pipeline) -> None:
    raw = with_attachment(zip_of({"a.txt": b"hello"}), "files.zip", "application/zip")
    assert pipeline.scan(raw).kind is Kind.CLEAN
    policy = Policy().with_banned_extensions([".ZIP"])
    banning = Pipeline(pipeline.engines, skeptic=pipeline.skeptic, policy=policy)
    verdict = banning.scan(raw)
    assert verdict.kind is Kind.BANNED
    assert Finding("policy", "policy.banned-extension.zip", "2") in verdict.findings


# -- suspicious ---------------------------------------------------------------------------------


def test_encrypted_zip_is_suspicious(pipeline: Pipeline) -> None:
    raw = with_attachment(encrypted(zip_of({"a.txt": b"secret"})), "s.zip", "application/zip")
    verdict = pipeline.scan(raw)
    assert verdict.kind is Kind.SUSPICIOUS
    assert Finding("container", "container.encrypted", "2") in verdict.findings
    # A customer's policy may accept encrypted archives: recorded, not decisive.
    passing = Pipeline(
        pipeline.engines, skeptic=pipeline.skeptic, policy=Policy(encrypted_archives="pass")
    )
    verdict = passing.scan(raw)
    assert verdict.kind is Kind.CLEAN
    assert "container.encrypted" in names(verdict)


def test_zip_bomb_is_suspicious_and_fast(pipeline: Pipeline) -> None:
    bomb = zip_of({"zeros.bin": bytes(64 * MiB)})  # about 64 KB on the wire
    raw = with_attachment(bomb, "bomb.zip", "application/zip")
    started = time.monotonic()
    verdict = pipeline.scan(raw)
    assert time.monotonic() - started < 3.0
    assert verdict.kind is Kind.SUSPICIOUS
    assert "container.limit-exceeded:ratio" in names(verdict)


def test_hostile_mime_is_suspicious(pipeline: Pipeline) -> None:
    # Two boundaries where one is a prefix of the other: readers cut the message differently.
    raw = (
        b"From: a@example.com\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="abc"\r\n\r\n'
        b'--abc\r\nContent-Type: multipart/alternative; boundary="abcd"\r\n\r\n'
        b"--abcd\r\nContent-Type: text/plain\r\n\r\nhello\r\n--abcd--\r\n--abc--\r\n"
    )
    verdict = pipeline.scan(raw)
    assert verdict.kind is Kind.SUSPICIOUS
    assert Finding("mime", "mime.boundary-collision", "message") in verdict.findings


def test_script_dropper_is_suspicious(pipeline: Pipeline) -> None:
    script = b'var s = new ActiveXObject("WScript.Shell"); s.Run("cmd /c calc");\n'
    verdict = pipeline.scan(with_attachment(script, "notes.txt", "text/plain"))
    assert verdict.kind is Kind.SUSPICIOUS
    assert "Mailtower_Script_Shell_Dropper" in names(verdict)


def test_antivirus_heuristic_is_suspicious_not_a_virus(pipeline: Pipeline) -> None:
    heuristic = PatternEngine(
        b"Quarterly", name="clamd", finding="Heuristics.Encrypted.Zip", timeout_s=1
    )
    verdict = with_engine(pipeline, heuristic).scan(with_attachment(b"Quarterly", "a.txt"))
    assert verdict.kind is Kind.SUSPICIOUS
    assert Finding("clamd", "Heuristics.Encrypted.Zip", "message") in verdict.findings


# -- engine failures ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fail", "hang"])
def test_failing_engine_is_tempfail(pipeline: Pipeline, mode: str) -> None:
    engine = PatternEngine(timeout_s=0.2)
    engine.mode = mode
    verdict = with_engine(pipeline, engine).scan(with_attachment(b"hello", "a.txt"))
    assert verdict.kind is Kind.TEMPFAIL
    assert "test:" in verdict.reason
    assert [run.error for run in verdict.runs if run.engine == "test"] == [
        "EngineUnavailable" if mode == "fail" else "EngineTimeout"
    ]


def test_failing_engine_and_a_virus_is_a_virus(pipeline: Pipeline) -> None:
    engine = PatternEngine()
    engine.mode = "fail"
    verdict = with_engine(pipeline, engine).scan(with_attachment(EICAR, "eicar.txt"))
    assert verdict.kind is Kind.VIRUS
    assert "test: " in verdict.reason  # the failure is still reported


def test_failing_engine_and_a_ban_is_banned(pipeline: Pipeline) -> None:
    engine = PatternEngine()
    engine.mode = "fail"
    verdict = with_engine(pipeline, engine).scan(with_attachment(b"x", "run.exe"))
    assert verdict.kind is Kind.BANNED


def test_whole_message_engine_sees_the_raw_message(pipeline: Pipeline) -> None:
    engine = PatternEngine()
    verdict = with_engine(pipeline, engine).scan(
        message(body=f"text {testdata.marker().decode()} text").as_bytes()
    )
    assert engine.calls == 1
    assert verdict.kind is Kind.VIRUS
    assert Finding("test", "Mailtower.Test.Marker", "message") in verdict.findings


class _ObjectEngine:
    """An object engine (like YARA) that records what it was handed; ``gate``: wait for it."""

    name = "objects"

    def __init__(
        self, gate: threading.Event | None = None, *, name: str = "objects", busy_s: float = 0
    ) -> None:
        self.gate = gate
        self.name = name
        self.busy_s = busy_s
        self.calls = 0

    def scan_objects(self, objects: object) -> list[Finding]:
        self.calls += 1
        time.sleep(self.busy_s)
        if self.gate is not None:
            assert self.gate.wait(5), "the whole-message engine never started"
        return []

    def health(self, timeout_s: float) -> str:
        return "objects 1.0"


def test_message_deadline_stops_the_remaining_engines() -> None:
    slow = PatternEngine(name="slow", timeout_s=0.3)
    slow.mode = "hang"
    busy = _ObjectEngine(name="busy", busy_s=0.3)
    later = _ObjectEngine(name="later")
    verdict = Pipeline([slow, busy, later], deadline_s=0.2).scan(with_attachment(b"hello", "a.txt"))
    assert verdict.kind is Kind.TEMPFAIL
    assert later.calls == 0
    assert [(run.engine, run.error) for run in verdict.runs] == [
        ("slow", "EngineTimeout"),  # its own timeout
        ("busy", None),
        ("later", "EngineTimeout"),  # not started: the deadline had passed
    ]


def test_whole_message_engines_run_while_the_message_is_read() -> None:
    """clamd/ICAP get the raw message at once: a whole-message engine listed first is already
    running when the object engines get the parts (run one after the other, this deadlocks
    until the object engine gives up)."""
    started = threading.Event()
    finish = threading.Event()

    class Whole(PatternEngine):
        def scan(self, data: bytes) -> list[Finding]:
            started.set()
            assert finish.wait(5), "the object engine never ran"
            return super().scan(data)

    whole = Whole()
    objects = _ObjectEngine(gate=started)
    pipeline = Pipeline([whole, objects])
    raw = message(body=f"text {testdata.marker().decode()} text").as_bytes()
    original = objects.scan_objects

    def then_finish(objs: object) -> list[Finding]:
        found = original(objs)
        finish.set()
        return found

    objects.scan_objects = then_finish  # type: ignore[method-assign]
    verdict = pipeline.scan(raw)
    assert verdict.kind is Kind.VIRUS and objects.calls == 1 and whole.calls == 1
    assert [run.engine for run in verdict.runs] == ["test", "objects"]  # in the listed order
    assert [run.error for run in verdict.runs] == [None, None]


def test_a_crashing_whole_message_engine_tempfails() -> None:
    class Broken(PatternEngine):
        def scan(self, data: bytes) -> list[Finding]:
            raise RuntimeError("bug")

    verdict = Pipeline([Broken(name="broken")]).scan(message().as_bytes())
    assert verdict.kind is Kind.TEMPFAIL
    assert [(run.engine, run.error) for run in verdict.runs] == [("broken", "RuntimeError")]


def test_no_engine_is_tempfail() -> None:
    assert Pipeline([]).scan(message().as_bytes()).kind is Kind.TEMPFAIL


# -- clean mail ---------------------------------------------------------------------------------


@pytest.mark.parametrize("build", ORDINARY.values(), ids=ORDINARY.keys())
def test_ordinary_mail_is_clean(pipeline: Pipeline, build: Callable[[], bytes]) -> None:
    verdict = pipeline.scan(build())
    assert verdict.kind is Kind.CLEAN, verdict.reason
    assert verdict.findings == ()


def test_informational_findings_are_recorded_but_keep_mail_clean(pipeline: Pipeline) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as archive:
        info = tarfile.TarInfo("bin/tool")
        data = elf()
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    verdict = pipeline.scan(with_attachment(buf.getvalue(), "tool.tar.gz", "application/gzip"))
    assert verdict.kind is Kind.CLEAN
    assert "Mailtower_ELF_Executable" in names(verdict)
    assert "skeptic.executable-attachment" in names(verdict)
