"""The YARA engine: shipped rules, reload that swaps only a compiled set, timeouts."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

from mailtower.scanning import testdata
from mailtower.scanning.engines import Finding
from mailtower.scanning.engines.yara import YaraEngine, rule_files
from mailtower.scanning.errors import EngineTimeout, YaraRuleError
from mailtower.scanning.objects import ScanObject
from mailtower.scanning.rules import YARA_DIR


@pytest.fixture(scope="module")
def shipped() -> YaraEngine:
    return YaraEngine()


def names(findings: list[Finding]) -> set[str]:
    return {f.name for f in findings}


def pe_file(e_lfanew: int = 0x80) -> bytes:
    header = bytearray(512)
    header[0:2] = b"MZ"
    struct.pack_into("<I", header, 0x3C, e_lfanew)
    header[e_lfanew : e_lfanew + 4] = b"PE\0\0"
    header[e_lfanew + 4 : e_lfanew + 6] = b"\x4c\x01"  # i386
    return bytes(header)


def macro_document(auto: str = "AutoOpen", action: str = 'Shell "cmd /c calc"') -> bytes:
    """An OLE file with a VBA project the way the compressed source leaves words visible."""
    return (
        bytes.fromhex("D0CF11E0A1B11AE1")
        + bytes(504)
        + "_VBA_PROJECT".encode("utf-16-le")
        + bytes(64)
        + f'Attribute VB_Name = "ThisDocument"\r\nSub {auto}()\r\n'.encode()
        + f"  {action}\r\nEnd Sub\r\n".encode()
    )


# -- the shipped rules ---------------------------------------------------------------------------


def test_shipped_rules_never_hold_the_eicar_string() -> None:
    for path in rule_files([YARA_DIR]):
        assert testdata.eicar() not in path.read_bytes()
        assert testdata.eicar()[28:52] not in path.read_bytes()  # the skipped middle


@pytest.mark.parametrize(
    ("data", "rule"),
    [
        (testdata.eicar(), "Mailtower_EICAR_Test_File"),
        (b"prefix " + testdata.eicar() + b"\r\n", "Mailtower_EICAR_Test_File"),
        (pe_file(), "Mailtower_PE_Executable"),
        (pe_file(0x40), "Mailtower_PE_Executable"),
        (b"\x7fELF\x02\x01\x01" + bytes(9) + b"\x02\x00" + bytes(64), "Mailtower_ELF_Executable"),
        (macro_document(), "Mailtower_Office_AutoExec_Shell_Macro"),
        (
            macro_document("Workbook_Open", 'Set o = CreateObject("MSXML2.XMLHTTP")'),
            "Mailtower_Office_AutoExec_Shell_Macro",
        ),
        (
            b'var s = new ActiveXObject("WScript.Shell");\ns.Run("cmd /c del *", 0);',
            "Mailtower_Script_Shell_Dropper",
        ),
        (
            b'Set sh = CreateObject("wscript.shell")\r\nsh.run "powershell -enc AAAA", 0\r\n',
            "Mailtower_Script_Shell_Dropper",
        ),
        (
            b'var x = new ActiveXObject("MSXML2.XMLHTTP"); x.open("GET", u, false); x.send();'
            b'var s = new ActiveXObject("ADODB.Stream"); s.write(x.responseBody);'
            b"s.SaveToFile(p, 2);",
            "Mailtower_Script_Downloader",
        ),
        (b"<script>eval (unescape('%64%6f%63'))</script>", "Mailtower_Script_Eval_Decoded"),
        (b"eval(String.fromCharCode(100,111,99))", "Mailtower_Script_Eval_Decoded"),
    ],
)
def test_shipped_rule_matches(shipped: YaraEngine, data: bytes, rule: str) -> None:
    assert rule in names(shipped.scan(data))


@pytest.mark.parametrize(
    "data",
    [
        b"Dear customer,\r\nplease find the invoice attached.\r\n",
        b"MZ is where our office is. PE teachers meet on Friday." + bytes(200),
        pe_file()[:0x80] + b"NE\0\0" + bytes(100),  # a 16-bit NE header is not PE
        # A document about macros, without a VBA project in it.
        b"How to write an AutoOpen macro that calls Shell safely, in plain text.",
        # An OLE document without a VBA project.
        bytes.fromhex("D0CF11E0A1B11AE1") + bytes(504) + "WordDocument".encode("utf-16-le"),
        b"<html><body><script>document.write('hello'); eval(x);</script></body></html>",
        b"new ActiveXObject('Microsoft.XMLDOM')",  # ActiveX without shell or saving
    ],
)
def test_shipped_rules_stay_quiet_on_ordinary_content(shipped: YaraEngine, data: bytes) -> None:
    assert shipped.scan(data) == []


def test_severity_meta_on_every_shipped_rule(shipped: YaraEngine) -> None:
    assert shipped.rule_set.meta
    for rule, meta in shipped.rule_set.meta.items():
        assert meta.get("severity") in {"virus", "suspicious", "info"}, rule
    assert shipped.meta("Mailtower_PE_Executable")["severity"] == "info"


def test_scan_objects_names_each_part(shipped: YaraEngine) -> None:
    objects = [
        ScanObject(data=b"clean", path="1"),
        ScanObject(data=testdata.eicar(), path="2/a.zip!eicar.com", depth=1),
        ScanObject(data=pe_file(), path="3"),
    ]
    assert shipped.scan_objects(objects) == [
        Finding("yara", "Mailtower_EICAR_Test_File", part="2/a.zip!eicar.com"),
        Finding("yara", "Mailtower_PE_Executable", part="3"),
    ]


def test_health_reports_rule_count(shipped: YaraEngine) -> None:
    assert shipped.health(5).startswith("yara 4.")
    assert f"({len(shipped.rule_set.meta)} rules)" in shipped.health(5)


# -- loading and reloading -------------------------------------------------------------------------


def write_rule(path: Path, name: str, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'rule {name} {{ strings: $a = "{text}" condition: $a }}\n')


def test_rules_are_found_recursively_and_may_share_names(tmp_path: Path) -> None:
    write_rule(tmp_path / "a.yar", "Alpha", "alpha-marker")
    write_rule(tmp_path / "sub" / "deeper" / "b.yara", "Beta", "beta-marker")
    write_rule(tmp_path / "sub" / "c.yar", "Alpha", "other-alpha")  # same name, other file
    (tmp_path / "notes.txt").write_text("rule broken {")  # not a rule file: ignored

    engine = YaraEngine([tmp_path])

    assert names(engine.scan(b"x beta-marker x other-alpha")) == {"Beta", "Alpha"}


def test_several_directories_are_one_engine(tmp_path: Path) -> None:
    write_rule(tmp_path / "local.yar", "Local_Rule", "local-marker")
    engine = YaraEngine([YARA_DIR, tmp_path])
    assert names(engine.scan(testdata.eicar() + b" local-marker")) == {
        "Mailtower_EICAR_Test_File",
        "Local_Rule",
    }


def test_reload_swaps_in_new_rules(tmp_path: Path) -> None:
    write_rule(tmp_path / "r.yar", "Old_Rule", "old-marker")
    engine = YaraEngine([tmp_path])
    assert names(engine.scan(b"old-marker new-marker")) == {"Old_Rule"}

    write_rule(tmp_path / "r.yar", "New_Rule", "new-marker")
    engine.reload()

    assert names(engine.scan(b"old-marker new-marker")) == {"New_Rule"}


def test_broken_rule_keeps_the_old_set_and_names_file_and_line(tmp_path: Path) -> None:
    write_rule(tmp_path / "good.yar", "Good_Rule", "good-marker")
    engine = YaraEngine([tmp_path])
    old = engine.rule_set
    bad = tmp_path / "nested" / "bad.yar"
    bad.parent.mkdir()
    bad.write_text('rule Bad {\n  strings: $a = "x"\n  condition: $a and\n}\n')

    with pytest.raises(YaraRuleError) as excinfo:
        engine.reload()

    assert f"{bad}(4)" in str(excinfo.value)
    assert engine.rule_set is old
    assert names(engine.scan(b"good-marker")) == {"Good_Rule"}


def test_unknown_identifier_is_a_rule_error(tmp_path: Path) -> None:
    (tmp_path / "x.yar").write_text("rule X { condition: no_such_thing }\n")
    with pytest.raises(YaraRuleError, match=r"x\.yar\(1\)"):
        YaraEngine([tmp_path])


def test_no_rules_or_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(YaraRuleError, match="no .yar/.yara files"):
        YaraEngine([tmp_path])
    with pytest.raises(YaraRuleError, match="does not exist"):
        YaraEngine([tmp_path / "missing"])


# -- timeouts ------------------------------------------------------------------------------------

SLOW_RULE = """
rule Slow {
  condition:
    for all i in (0..filesize - 1) : (
      for all j in (0..filesize - 1) : ( uint8(i) != 0x41 or uint8(j) != 0x42 )
    )
}
"""


def test_scan_times_out(tmp_path: Path) -> None:
    (tmp_path / "slow.yar").write_text(SLOW_RULE)
    engine = YaraEngine([tmp_path], timeout_s=1)
    started = time.monotonic()
    with pytest.raises(EngineTimeout):
        engine.scan(bytes(100_000))
    assert time.monotonic() - started < 3


def test_scan_objects_shares_one_deadline(tmp_path: Path) -> None:
    (tmp_path / "slow.yar").write_text(SLOW_RULE)
    engine = YaraEngine([tmp_path], timeout_s=1)
    objects = [ScanObject(data=bytes(3_000), path=str(i)) for i in range(100)]
    started = time.monotonic()
    with pytest.raises(EngineTimeout):
        engine.scan_objects(objects)  # each object alone takes ~0.3 s; all, ~30 s
    assert time.monotonic() - started < 3
