"""Skeptic: disguised executables and known-vulnerability tricks, each with a near miss."""

from __future__ import annotations

import pytest
import skeptic_fixtures as fx

from mailtower.scanning.engines import Finding
from mailtower.scanning.skeptic import Severity, Skeptic


@pytest.fixture(scope="module")
def skeptic() -> Skeptic:
    return Skeptic.from_rules()


def names(skeptic: Skeptic, *objects, anomalies=()) -> set[str]:
    findings = skeptic.examine(fx.analysis(*objects, anomalies=anomalies))
    assert all(f.engine == "skeptic" for f in findings)
    return {f.name for f in findings}


def hostile(skeptic: Skeptic, *objects, anomalies=()) -> set[str]:
    findings = skeptic.examine(fx.analysis(*objects, anomalies=anomalies))
    return {f.name for f in skeptic.hostile(findings)}


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("invoice.pdf.exe", "skeptic.disguised-exe.double-extension"),
        ("invoice.pdf      .scr", "skeptic.disguised-exe.double-extension"),
        ("photo.jpg......exe", "skeptic.disguised-exe.double-extension"),
        ("Rechnung.PDF.Exe", "skeptic.disguised-exe.double-extension"),
        (
            "scan.doc                                   .pif",
            "skeptic.disguised-exe.whitespace-padding",
        ),
        ("report\u3000\u3000\u3000\u3000\u3000.js", "skeptic.disguised-exe.whitespace-padding"),
        ("invoice\u202efdp.exe", "skeptic.disguised-exe.bidi-override"),
        ("photo\u202egpj.scr", "skeptic.disguised-exe.bidi-override"),
        ("readme.txt\u0000.vbs", "skeptic.disguised-exe.hidden-characters"),
        ("notes.exe\u200b", "skeptic.disguised-exe.hidden-characters"),
        ("folder.{3050F4D8-98B5-11CF-BB82-00AA00BDCE0B}", "skeptic.disguised-exe.clsid-extension"),
    ],
)
def test_disguised_names_are_hostile(skeptic: Skeptic, name: str, rule: str) -> None:
    found = hostile(skeptic, fx.obj("x = 1\n", names=(name,)))
    assert rule in found


@pytest.mark.parametrize(
    "name",
    [
        "report.pdf",
        "jquery.min.js.map",
        "archive.tar.gz",
        "Quarterly   report   2024.pdf",  # sloppy spaces, but not a program
        "setup.x64.msi",
        "libfoo.so.1",
        "\u05d3\u05d5\u05d7\u200f.pdf",  # Hebrew name with a right-to-left mark
        "Übersicht März.xlsx",
        "meeting.ics",
        "photo 2024.06.01.jpg",
    ],
)
def test_ordinary_names_pass(skeptic: Skeptic, name: str) -> None:
    assert hostile(skeptic, fx.obj(fx.pdf(), names=(name,), types=("application/pdf",))) == set()


def test_executable_attachment_is_informational(skeptic: Skeptic) -> None:
    found = names(
        skeptic, fx.obj(fx.pe(), names=("setup.exe",), types=("application/octet-stream",))
    )
    assert found == {"skeptic.executable-attachment"}
    assert skeptic.severity("skeptic.executable-attachment") is Severity.INFO
    assert names(skeptic, fx.obj("WScript.Echo 1", names=("run.vbs",))) >= {
        "skeptic.executable-attachment"
    }


@pytest.mark.parametrize("content", [fx.pe(), fx.elf(), fx.macho()])
def test_native_code_under_a_document_name_is_hostile(skeptic: Skeptic, content: bytes) -> None:
    found = hostile(skeptic, fx.obj(content, names=("report.pdf",), types=("application/pdf",)))
    assert "skeptic.disguised-exe.content-mismatch" in found
    assert "skeptic.disguised-exe.declared-type" in found


def test_native_code_declared_as_text_without_a_name_is_hostile(skeptic: Skeptic) -> None:
    found = hostile(skeptic, fx.obj(fx.pe(), types=("text/plain",)))
    assert found == {"skeptic.disguised-exe.declared-type"}


def test_a_real_pdf_named_pdf_is_clean(skeptic: Skeptic) -> None:
    assert (
        names(skeptic, fx.obj(fx.pdf(), names=("report.pdf",), types=("application/pdf",))) == set()
    )


def test_mz_text_is_not_an_executable(skeptic: Skeptic) -> None:
    # A text file that happens to start with "MZ" has no PE header behind it.
    text = b"MZ-Verkehrsbetriebe timetable\n" * 10
    assert names(skeptic, fx.obj(text, names=("fahrplan.txt",), types=("text/plain",))) == set()


def test_disagreeing_readings_name_a_program_and_a_document(skeptic: Skeptic) -> None:
    # One MIME reading says setup.exe, another says photo.jpg: the union is examined.
    found = hostile(skeptic, fx.obj(fx.pe(), names=("setup.exe", "photo.jpg")))
    assert "skeptic.disguised-exe.content-mismatch" in found


def test_audio_part_carrying_a_program_is_the_nimda_trick(skeptic: Skeptic) -> None:
    nimda = fx.obj(fx.pe(), names=("readme.exe",), types=("audio/x-wav",))
    assert "skeptic.vuln.media-type-executable" in hostile(skeptic, nimda)
    by_name = fx.obj(b"not even a binary", names=("song.scr",), types=("image/jpeg",))
    assert "skeptic.vuln.media-type-executable" in hostile(skeptic, by_name)


def test_real_wav_and_png_pass(skeptic: Skeptic) -> None:
    song = fx.obj(fx.wav(), names=("song.wav",), types=("audio/x-wav",))
    image = fx.obj(fx.png(), names=("logo.png",), types=("image/png",))
    assert names(skeptic, song, image) == set()


def test_findings_name_the_part(skeptic: Skeptic) -> None:
    findings = skeptic.examine(
        fx.analysis(fx.obj(fx.pe(), path="1.3/a.zip!b/c.pdf.exe", names=("b/c.pdf.exe",)))
    )
    assert (
        Finding("skeptic", "skeptic.disguised-exe.double-extension", "1.3/a.zip!b/c.pdf.exe")
        in findings
    )


# --- HTML auto-run ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tag",
    [
        '<iframe src=3D"cid:EA4DMGBP9p" height=3D"0" width=3D"0"></iframe>'.replace("3D", ""),
        "<IFRAME SRC='  c&#105;d:payload@x' width=0></IFRAME>",
        '<object data="readme.exe" type="application/x-msdownload"></object>',
        '<embed src="mhtml:file://C:/x.mht!x.exe">',
        '<meta http-equiv="refresh" content="0;url=cid:part1">',
    ],
)
def test_html_that_runs_an_attachment_is_hostile(skeptic: Skeptic, tag: str) -> None:
    page = fx.obj(f"<html><body><p>Hello</p>{tag}</body></html>", types=("text/html",))
    attachment = fx.obj(fx.pe(), path="1.3", names=("readme.exe",), types=("audio/x-wav",))
    assert "skeptic.vuln.html-autorun" in hostile(skeptic, page, attachment)


def test_newsletter_with_https_iframes_and_cid_images_passes(skeptic: Skeptic) -> None:
    page = fx.obj(fx.newsletter_html(), types=("text/html",))
    logo = fx.obj(fx.png(), path="1.3", names=("product1.png",), types=("image/png",))
    assert hostile(skeptic, page, logo) == set()


def test_object_classid_is_hostile(skeptic: Skeptic) -> None:
    page = '<html><object classid="clsid:D27CDB6E-AE6D-11cf-96B8-444553540000"></object></html>'
    assert "skeptic.vuln.html-object-classid" in hostile(
        skeptic, fx.obj(page, types=("text/html",))
    )


# --- RTF --------------------------------------------------------------------------------------


def test_rtf_embedding_a_program_is_hostile(skeptic: Skeptic) -> None:
    found = hostile(skeptic, fx.obj(fx.rtf_with_object(fx.pe()), names=("order.rtf",)))
    assert "skeptic.vuln.rtf-embedded-executable" in found
    assert "skeptic.vuln.rtf-dangerous-object" in found  # class Package


def test_rtf_package_naming_a_script_is_hostile(skeptic: Skeptic) -> None:
    package = b"\x02\x00invoice.vbs\x00C:\\Users\\x\\invoice.vbs\x00\x00\x00\x03\x00WScript.Echo 1"
    found = hostile(skeptic, fx.obj(fx.rtf_with_object(package), names=("order.rtf",)))
    assert "skeptic.vuln.rtf-embedded-executable" in found


def test_rtf_equation_editor_and_autoupdate_are_hostile(skeptic: Skeptic) -> None:
    doc = fx.rtf_with_object(b"\x1c\x00" + b"A" * 60, "Equation.3", update=True)
    found = hostile(skeptic, fx.obj(doc, names=("cv.doc",)))
    assert {"skeptic.vuln.rtf-dangerous-object", "skeptic.vuln.rtf-autoupdate"} <= found


def test_rtf_with_an_embedded_spreadsheet_passes(skeptic: Skeptic) -> None:
    doc = fx.rtf_with_object(b"\x01\x02" * 500, "Excel.Sheet.12")
    assert hostile(skeptic, fx.obj(doc, names=("budget.rtf",), types=("application/rtf",))) == set()


def test_plain_rtf_passes(skeptic: Skeptic) -> None:
    doc = b"{\\rtf1\\ansi{\\fonttbl{\\f0 Arial;}}\\pard Dear customer, {\\b thank you}.\\par}"
    assert names(skeptic, fx.obj(doc, names=("letter.rtf",))) == set()


# --- anomalies --------------------------------------------------------------------------------


def test_only_listed_anomalies_pass_through(skeptic: Skeptic) -> None:
    found = skeptic.examine(
        fx.analysis(anomalies=("mime.boundary-collision", "mime.views-disagree", "other.thing"))
    )
    assert found == [Finding("skeptic", "skeptic.anomaly.mime.boundary-collision", None)]
    assert skeptic.severity("skeptic.anomaly.mime.boundary-collision") is Severity.HOSTILE
