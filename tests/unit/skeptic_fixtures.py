"""Generated inputs for the Skeptic tests: executables, documents, scripts, synthetic worms.

Nothing here is real malware: the "executables" are headers that only a magic check believes,
and the "worms" are inert skeletons (no send, no self-copy) that share a real worm's shape.
"""

from __future__ import annotations

import base64
import random
import string
import struct

from archive_builders import zip_of

from mailtower.scanning.engines import Finding
from mailtower.scanning.objects import Analysis, ScanObject


class NoEngine:
    """An anti-virus engine that finds nothing: only the parsing stages, Skeptic and the policy
    can stop a message (the scanner's own figures, without a signature engine)."""

    name = "none"

    def scan(self, data: bytes) -> list[Finding]:
        return []

    def health(self, timeout_s: float) -> str:
        return "ok"


def pe() -> bytes:
    """A PE image header (MZ stub pointing at PE\\0\\0) and some section-looking padding."""
    dos = bytearray(b"MZ" + b"\x90\x00" + b"\x00" * 56)
    dos[0x3C:0x40] = struct.pack("<I", 0x80)
    stub = b"This program cannot be run in DOS mode.\r\r\n$".ljust(0x80 - 0x40, b"\0")
    return bytes(dos) + stub + b"PE\0\0" + b"\x4c\x01" + bytes(range(256)) * 4


def elf() -> bytes:
    return b"\x7fELF\x02\x01\x01" + b"\0" * 9 + b"\x02\x00\x3e\x00" + b"\0" * 200


def macho() -> bytes:
    return b"\xcf\xfa\xed\xfe\x07\x00\x00\x01" + b"\0" * 200


def pdf() -> bytes:
    body = b"1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n" * 20
    return b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n" + body + b"trailer << /Root 1 0 R >>\n%%EOF\n"


def wav() -> bytes:
    samples = bytes(random.Random(1).randrange(256) for _ in range(4000))
    fmt = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, 1, 8000, 8000, 1, 8)
    data = b"data" + struct.pack("<I", len(samples)) + samples
    return b"RIFF" + struct.pack("<I", 4 + len(fmt) + len(data)) + b"WAVE" + fmt + data


def png() -> bytes:
    return (
        b"\x89PNG\r\n\x1a\n"
        + b"\0\0\0\rIHDR"
        + bytes(random.Random(2).randrange(256) for _ in range(600))
    )


def docx(extra: dict[str, bytes] | None = None) -> bytes:
    """A minimal Word document without macros (what a business letter looks like inside)."""
    pkg = "http://schemas.openxmlformats.org/package/2006"
    rel = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
    wml = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"
    members = {
        "[Content_Types].xml": f'<?xml version="1.0"?><Types xmlns="{pkg}/content-types"/>',
        "_rels/.rels": (
            f'<?xml version="1.0"?><Relationships xmlns="{pkg}/relationships">'
            f'<Relationship Id="rId1" Type="{rel}/officeDocument" Target="word/document.xml"/>'
            "</Relationships>"
        ),
        "word/document.xml": (
            f'<?xml version="1.0"?><w:document xmlns:w="{wml}"><w:body><w:p><w:r>'
            "<w:t>Quarterly report</w:t></w:r></w:p></w:body></w:document>"
        ),
        "word/_rels/document.xml.rels": (
            f'<?xml version="1.0"?><Relationships xmlns="{pkg}/relationships">'
            f'<Relationship Id="rId9" Type="{rel}/hyperlink" Target="https://www.example.com/" '
            'TargetMode="External"/></Relationships>'
        ),
    }
    data = {name: text.encode() for name, text in members.items()}
    data.update(extra or {})
    return zip_of(data)


def rtf_with_object(payload: bytes, class_name: str = "Package", *, update: bool = False) -> bytes:
    """An RTF document embedding ``payload`` as an OLE1 object, hex split by junk like exploits."""
    name = class_name.encode() + b"\0"
    ole1 = (
        struct.pack("<II", 0x0501, 2)
        + struct.pack("<I", len(name))
        + name
        + b"\0" * 8
        + struct.pack("<I", len(payload))
        + payload
    )
    hexdata = ole1.hex()
    # Word ignores whitespace and unknown {\*…} groups inside \objdata; exploits use both.
    chunks = [hexdata[i : i + 64] for i in range(0, len(hexdata), 64)]
    body = "\n{\\*\\junk 00ff}".join(chunks)
    objupdate = "\\objupdate" if update else ""
    return (
        "{\\rtf1\\ansi\\deff0{\\fonttbl{\\f0 Calibri;}}\\pard Please see the attachment.\\par\n"
        f"{{\\object\\objemb{objupdate}{{\\*\\objclass {class_name}}}\\objw380\\objh260"
        f"{{\\*\\objdata {body}}}{{\\result{{\\pict\\wmetafile8 0a0b0c0d}}}}}}\n}}"
    ).encode()


# --- scripts -----------------------------------------------------------------------------------


def _ident(rng: random.Random, length: int = 10) -> str:
    return rng.choice(string.ascii_letters) + "".join(
        rng.choice(string.ascii_letters + string.digits) for _ in range(length - 1)
    )


def _junk_comment(rng: random.Random, words: int = 40) -> str:
    return " ".join(
        "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randrange(5, 12)))
        for _ in range(words)
    )


MASS_MAILER_VBS = """\
' Synthetic mass-mailer skeleton for Skeptic tests: inert (Display, never Send).
Option Explicit
Dim app, ns, list, entry, mail, i, j
Set app = CreateObject("Outlook.Application")
Set ns = app.GetNameSpace("MAPI")
For i = 1 To ns.AddressLists.Count
  Set list = ns.AddressLists(i)
  For j = 1 To list.AddressEntries.Count
    Set entry = list.AddressEntries(j)
    Set mail = app.CreateItem(0)
    mail.Recipients.Add entry.Address
    mail.Subject = "Important document"
    mail.Body = "Please read the attached file."
    mail.Attachments.Add "C:\\placeholder.txt"
    mail.Display
  Next
Next
Set app = Nothing
"""

DOWNLOADER_JS = """\
// Synthetic downloader skeleton for Skeptic tests: inert (fetches example.invalid, echoes).
var shell = new ActiveXObject("WScript.Shell");
var fso = new ActiveXObject("Scripting.FileSystemObject");
var temp = shell.ExpandEnvironmentStrings("%TEMP%");
var target = fso.BuildPath(temp, "update.txt");
var request = new ActiveXObject("MSXML2.XMLHTTP");
request.open("GET", "http://example.invalid/update.txt", false);
request.send();
if (request.status == 200) {
  var stream = new ActiveXObject("ADODB.Stream");
  stream.Open();
  stream.Type = 1;
  stream.Write(request.responseBody);
  stream.SaveToFile(target, 2);
  stream.Close();
  WScript.Echo(target);
}
"""


def polymorph_vbs(source: str, seed: int) -> str:
    """A polymorphic copy: variables renamed, junk comments and blank lines, case scrambled."""
    rng = random.Random(seed)
    for name in ("app", "ns", "list", "entry", "mail", "i", "j"):
        new = _ident(rng, rng.randrange(6, 12))
        source = _replace_word(source, name, new)
    lines = []
    for line in source.splitlines():
        lines.append(line.upper() if rng.random() < 0.3 else line)
        if rng.random() < 0.4:
            lines.append("' " + _junk_comment(rng, 6))
        if rng.random() < 0.2:
            lines.append("")
    return "\n".join(lines) + "\n"


def polymorph_js(source: str, seed: int) -> str:
    rng = random.Random(seed)
    for name in ("shell", "fso", "temp", "target", "request", "stream"):
        source = _replace_word(source, name, _ident(rng, rng.randrange(6, 12)))
    lines = []
    for line in source.splitlines():
        lines.append("  " * rng.randrange(3) + line)
        if rng.random() < 0.4:
            lines.append("/* " + _junk_comment(rng, 5) + " */")
    return "\n".join(lines) + "\n"


def _replace_word(text: str, word: str, new: str) -> str:
    import re

    return re.sub(rf"(?<![\w.\"]){re.escape(word)}\b(?![\"])", new, text)


def junk_padded_js(seed: int = 7) -> str:
    """Polymorphic padding: dozens of random variables and functions around a small payload."""
    rng = random.Random(seed)
    lines = []
    for _ in range(40):
        lines.append(f"var {_ident(rng, 12)} = {rng.randrange(10**6)};")
        lines.append(
            f"function {_ident(rng, 14)}({_ident(rng, 9)}) {{ return {rng.randrange(99)}; }}"
        )
    lines.append('var s = new ActiveXObject("WScript" + ".Shell");')
    return "\n".join(lines)


def junk_commented_vbs(seed: int = 8) -> str:
    rng = random.Random(seed)
    out = []
    for line in ["Dim x", "x = 1 + 2", "MsgBox x"]:
        out.append(line)
        out.append("' " + _junk_comment(rng, 30))
    return "\n".join(out)


def long_business_js() -> str:
    """Hand-written-looking application code: long, commented, meaningful names."""
    parts = [
        "// Order form helpers for the customer portal.",
        "/* Computes totals, validates input and renders the summary table. */",
    ]
    for n in range(60):
        parts.append(
            f"""
function calculateLineTotal{n}(quantity, unitPrice, discountRate) {{
  // Discounts apply before tax; rounding happens once at the end.
  var subtotal = quantity * unitPrice;
  var discount = subtotal * (discountRate || 0);
  var element = document.getElementById("line-total-{n}");
  if (element) {{
    element.textContent = (subtotal - discount).toFixed(2) + " EUR";
    element.setAttribute("data-updated", new Date().toISOString());
  }}
  return Math.round((subtotal - discount) * 100) / 100;
}}"""
        )
    return "\n".join(parts)


def minified_library_js(seed: int = 3) -> str:
    """Minified-looking library code: short names, dense punctuation, DOM APIs, a regex table."""
    rng = random.Random(seed)
    apis = [
        "addEventListener",
        "removeEventListener",
        "querySelectorAll",
        "getElementsByTagName",
        "createElement",
        "appendChild",
        "setAttribute",
        "getAttribute",
        "classList",
        "XMLHttpRequest",
        "readyState",
        "responseText",
        "innerHTML",
        "parentNode",
        "nodeType",
        "firstChild",
        "nextSibling",
        "toLowerCase",
        "hasOwnProperty",
        "prototype",
        "indexOf",
    ]
    chunks = ["/*! tinylib v3.2.1 | (c) Example Foundation | example.org/license */"]
    chunks.append(
        '!function(e,t){"use strict";var n=[],r=Object.getPrototypeOf,i=n.slice,o=n.concat;'
    )
    for n in range(400):
        a, b = rng.sample(string.ascii_lowercase, 2)
        api = rng.choice(apis)
        chunks.append(
            rng.choice(
                [
                    f"function {a}{b}({a},{b}){{return {a}.{api}({b})||{b}.{api}}}",
                    f"{a}.{api}=function({b}){{return this.{api}.call(this,{b},{n % 99})}};",
                    f'if({a}&&{a}.nodeType===1){{{b}=({a}.{api}||"").toLowerCase()}}',
                    f"for(var {a}=0,{b}=t.length;{a}<{b};{a}++)n.push(t[{a}]);",
                    f'var {a}{b}="[\\\\x20\\\\t\\\\r\\\\n\\\\f]",'
                    f'{b}{a}=new RegExp("^"+{a}{b}+"+|"+{a}{b}+"+$","g");',
                ]
            )
        )
    chunks.append("e.tinylib=n}(window);")
    # Window globals and an AJAX fallback old libraries carry for IE.
    chunks.append(
        'var X=window.ActiveXObject?new ActiveXObject("Microsoft.XMLHTTP"):new XMLHttpRequest;'
    )
    chunks.append('var G=Function("return this")();')
    return "".join(chunks)


def newsletter_html() -> str:
    """A large marketing newsletter: tables, inline base64 image, https iframes, JSON-LD."""
    image = base64.b64encode(bytes(random.Random(4).randrange(256) for _ in range(30000))).decode()
    rows = "\n".join(
        f'<tr><td class="item"><a href="https://shop.example.com/p/{n}?utm_source=news">'
        f'<img src="cid:product{n}@example.com" alt="Product {n}" width="120"></a></td>'
        f"<td>Spring offer number {n}: save {n % 40}% on garden furniture this week only.</td></tr>"
        for n in range(200)
    )
    return f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>Spring news</title>
<style>.item{{padding:4px}} td{{font-family:Arial}}</style>
<script type="application/ld+json">{{"@context":"https://schema.org","name":"Example Shop"}}
</script>
</head><body onload="void(0)">
<img src="data:image/png;base64,{image}" alt="banner">
<iframe src="https://www.youtube.com/embed/abc123" width="560" height="315"></iframe>
<table>{rows}</table>
<p><a href="https://shop.example.com/unsubscribe">Unsubscribe</a></p></body></html>"""


# --- pipeline objects --------------------------------------------------------------------------


def obj(
    data: bytes | str,
    path: str = "1.2",
    names: tuple[str, ...] = (),
    types: tuple[str, ...] = (),
) -> ScanObject:
    raw = data.encode() if isinstance(data, str) else data
    return ScanObject(
        data=raw,
        path=path,
        filenames=frozenset(names),
        content_types=frozenset(types),
        views=frozenset({"email-default"}),
    )


def analysis(*objects: ScanObject, anomalies: tuple[str, ...] = ()) -> Analysis:
    return Analysis(objects=list(objects), anomalies=list(anomalies))
