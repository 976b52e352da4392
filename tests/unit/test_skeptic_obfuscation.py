"""Skeptic: obfuscation, polymorphic padding and worm similarity, against realistic clean code."""

from __future__ import annotations

import base64
import json
import random
import string

import pytest
import skeptic_fixtures as fx

from mailtower.scanning.skeptic import Skeptic


@pytest.fixture(scope="module")
def skeptic() -> Skeptic:
    return Skeptic.from_rules()


def hostile(skeptic: Skeptic, *objects) -> set[str]:
    return {f.name for f in skeptic.hostile(skeptic.examine(fx.analysis(*objects)))}


def js(text: str, name: str = "app.js"):
    return fx.obj(text, names=(name,), types=("application/javascript",))


def page(script: str):
    return fx.obj(
        f"<html><body><p>Hi</p><script>{script}</script></body></html>", types=("text/html",)
    )


def _codes(text: str) -> str:
    return ",".join(str(ord(c)) for c in text)


PAYLOAD = 'var s=new ActiveXObject("WScript.Shell");s.Run("calc");' * 3


# --- clean code must pass ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "clean",
    [
        pytest.param(lambda: js(fx.long_business_js()), id="long-business-js"),
        pytest.param(lambda: js(fx.minified_library_js(), "tinylib.min.js"), id="minified-library"),
        pytest.param(lambda: page(fx.minified_library_js()), id="minified-library-in-page"),
        pytest.param(lambda: fx.obj(fx.newsletter_html(), types=("text/html",)), id="newsletter"),
        pytest.param(
            lambda: page(
                'var gaJsHost = (("https:" == document.location.protocol) ? '
                '"https://ssl." : "http://www.");'
                'document.write(unescape("%3Cscript src=\'" + gaJsHost + '
                "\"google-analytics.com/ga.js' "
                "type='text/javascript'%3E%3C/script%3E\"));"
            ),
            id="legacy-analytics-snippet",
        ),
        pytest.param(
            lambda: page(
                "var font='data:font/woff2;base64,"
                + base64.b64encode(random.Random(5).randbytes(20000)).decode()
                + "';document.fonts.add(new FontFace('Brand', 'url(' + font + ')'));"
            ),
            id="embedded-base64-font",
        ),
        pytest.param(
            lambda: fx.obj(
                'Set net = CreateObject("Scripting.Dictionary")\n'
                'net.Add "a", 1\nMsgBox "Drive mapped"\n',
                names=("logon.vbs",),
            ),
            id="admin-vbs",
        ),
    ],
)
def test_clean_code_passes(skeptic: Skeptic, clean) -> None:
    assert hostile(skeptic, clean()) == set()


# --- eval / decode chains ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "script",
    [
        f"eval(String.fromCharCode({_codes('alert(1)')}));",
        "var k='';eval(unescape('%61%6c%65%72%74%28%31%29'));",
        "window['eval'](atob('YWxlcnQoMSk='));",
        "new Function(x.split('').reverse().join(''))();",
        "var f = Function('a', 'return ' + String.fromCharCode(97,98));",
    ],
)
def test_eval_fed_by_a_decoder_is_hostile(skeptic: Skeptic, script: str) -> None:
    assert "skeptic.obfuscation.eval-decode-chain" in hostile(skeptic, page(script))


def test_vbscript_execute_of_chr_chain_is_hostile(skeptic: Skeptic) -> None:
    vbs = "Dim c\nc = Chr(77) & Chr(115) & Chr(103)\nExecute Chr(109) & Chr(115) & c\n"
    assert "skeptic.obfuscation.eval-decode-chain" in hostile(
        skeptic, fx.obj(vbs, names=("a.vbs",))
    )


def test_powershell_iex_of_base64_is_hostile(skeptic: Skeptic) -> None:
    ps = "$d=[Text.Encoding]::UTF8.GetString([Convert]::FromBase64String($b)); iex $d"
    assert "skeptic.obfuscation.eval-decode-chain" in hostile(skeptic, fx.obj(ps, names=("a.ps1",)))


def test_eval_of_json_and_decoder_elsewhere_pass(skeptic: Skeptic) -> None:
    script = "var o = eval('(' + text + ')');\n" + "x" * 500 + "\nvar c = s.charCodeAt(0);"
    assert hostile(skeptic, page(script)) == set()


# --- encoded payloads, concatenation, script encoder ------------------------------------------


def test_long_charcode_payload_is_hostile(skeptic: Skeptic) -> None:
    script = f"var p=String.fromCharCode({_codes(PAYLOAD)});document.body.innerHTML=p;"
    assert "skeptic.obfuscation.encoded-payload" in hostile(skeptic, page(script))


def test_heap_spray_escapes_are_hostile(skeptic: Skeptic) -> None:
    script = 'var sc=unescape("' + "%u9090" * 64 + '");'
    assert "skeptic.obfuscation.encoded-payload" in hostile(skeptic, page(script))


def test_vbs_chr_payload_is_hostile(skeptic: Skeptic) -> None:
    vbs = "x = " + " & ".join(f"Chr({ord(c)})" for c in PAYLOAD) + "\n"
    assert "skeptic.obfuscation.encoded-payload" in hostile(skeptic, fx.obj(vbs, names=("a.vbs",)))


def test_short_charcode_use_passes(skeptic: Skeptic) -> None:
    script = "var sep = String.fromCharCode(13, 10); var tab = String.fromCharCode(9);"
    assert hostile(skeptic, page(script)) == set()


def test_long_literal_concatenation_is_hostile(skeptic: Skeptic) -> None:
    pieces = " + ".join(json.dumps(c) for c in PAYLOAD[:120])
    assert "skeptic.obfuscation.concat-chain" in hostile(skeptic, page(f"var s = {pieces};"))


def test_html_building_with_variables_passes(skeptic: Skeptic) -> None:
    rows = " + ".join(f"'<td>' + row.c{n} + '</td>'" for n in range(40))
    assert (
        hostile(skeptic, page(f"function r(row) {{ return '<tr>' + {rows} + '</tr>'; }}")) == set()
    )


def test_script_encoder_output_is_hostile(skeptic: Skeptic) -> None:
    encoded = "#@~^GQAAAA==\\ko$K6,JCV^GJ*i@#@&wUAAA==^#~@"
    found = hostile(skeptic, fx.obj(encoded, names=("readme.vbe",)))
    assert "skeptic.obfuscation.encoded-script" in found


def test_html_smuggling_is_hostile(skeptic: Skeptic) -> None:
    script = (
        "var b = atob(data); var a = new Uint8Array(b.length);"
        "var blob = new Blob([a], {type: 'application/octet-stream'});"
        "var l = document.createElement('a'); l.href = URL.createObjectURL(blob);"
        "l.download = 'invoice.iso'; l.click();"
    )
    assert "skeptic.obfuscation.html-smuggling" in hostile(
        skeptic, fx.obj(f"<html><script>{script}</script></html>", names=("invoice.html",))
    )


# --- entropy, junk identifiers, junk comments -------------------------------------------------


def test_random_noise_in_a_script_is_high_entropy(skeptic: Skeptic) -> None:
    rng = random.Random(9)
    noise = "".join(
        rng.choice(string.printable[:94].replace('"', "").replace("\\", "")) for _ in range(2000)
    )
    found = hostile(skeptic, page(f'var k = "{noise}"; run(k);'))
    assert "skeptic.obfuscation.high-entropy" in found


def test_junk_identifiers_are_hostile(skeptic: Skeptic) -> None:
    found = hostile(skeptic, js(fx.junk_padded_js(), "update.js"))
    assert "skeptic.obfuscation.junk-identifiers" in found


def test_javascript_obfuscator_names_are_junk(skeptic: Skeptic) -> None:
    rng = random.Random(3)
    lines = [
        f"var _0x{rng.randrange(16**6):06x} = _0x{rng.randrange(16**6):06x}[{n}];"
        for n in range(20)
    ]
    assert "skeptic.obfuscation.junk-identifiers" in hostile(skeptic, page("\n".join(lines)))


def test_junk_comments_are_hostile(skeptic: Skeptic) -> None:
    found = hostile(skeptic, fx.obj(fx.junk_commented_vbs(), names=("a.vbs",)))
    assert "skeptic.obfuscation.junk-comments" in found


def test_licence_and_doc_comments_pass(skeptic: Skeptic) -> None:
    doc = "/**\n * Returns the total price of the basket including taxes and shipping costs.\n */\n"
    assert hostile(skeptic, js((doc + "function total(b) { return b.sum; }\n") * 20)) == set()


# --- similarity to known worms ----------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_polymorphic_massmailer_matches_its_fingerprint(skeptic: Skeptic, seed: int) -> None:
    variant = fx.polymorph_vbs(fx.MASS_MAILER_VBS, seed)
    assert variant != fx.MASS_MAILER_VBS
    found = hostile(skeptic, fx.obj(variant, names=("LOVE-LETTER.TXT.vbs",)))
    assert "skeptic.known-worm.synthetic-massmailer-vbs" in found


def test_downloader_hidden_in_padding_code_matches(skeptic: Skeptic) -> None:
    variant = fx.long_business_js() + "\n" + fx.polymorph_js(fx.DOWNLOADER_JS, 4)
    found = hostile(skeptic, js(variant, "portal.js"))
    assert "skeptic.known-worm.synthetic-downloader-js" in found


def test_ordinary_outlook_automation_is_not_the_worm(skeptic: Skeptic) -> None:
    vbs = (
        'Set app = CreateObject("Outlook.Application")\n'
        'Set item = app.CreateItem(1)\nitem.Subject = "Team meeting"\nitem.Start = Now + 1\n'
        "item.Duration = 60\nitem.Save\n"
    )
    found = {
        f.name for f in Skeptic.from_rules().examine(fx.analysis(fx.obj(vbs, names=("a.vbs",))))
    }
    assert not any(name.startswith("skeptic.known-worm") for name in found)


def test_scripts_inside_office_macros_are_examined_too(skeptic: Skeptic) -> None:
    # Macro source reaches the script rules as VBA: obfuscation is judged the same way.
    from mailtower.scanning.skeptic._kinds import Subject
    from mailtower.scanning.skeptic._office import Macros

    subject = Subject(fx.obj(b"\0binary"), frozenset())
    subject.__dict__["all_macros"] = [Macros("found", source=fx.junk_commented_vbs())]
    kind = next(r.kind for r in skeptic.rules if r.id == "skeptic.obfuscation.junk-comments")
    assert list(kind.check(subject)) == [""]
