"""Risky content: what makes a disagreement between readings worth stopping a message for.

Readings of broken MIME (and of broken archives) disagree all the time in legitimate mail: old
mailers nest a boundary in itself, put a boundary on a text/html body, write "Some removed
base64 encoded chars." in a base64 part, or name a part ``clock.bmp,69c`` in Content-Type and
``clock.bmp`` in Content-Disposition. Every object and every name any reading derives is
scanned and checked against the policy anyway (the union), so such a disagreement alone does
not make a message suspicious. It does when it is about **risky content** — something one
reading delivers and another hides that could run or carry something that runs:

* an **executable**: native code by its magic (PE, ELF, Mach-O, Windows shortcut), or a name
  or declared type Windows runs (the Skeptic list of executable extensions, the default banned
  ones);
* a **script**: a script or page-with-script extension or MIME type, or text that reads like
  script code (Windows Script Host, PowerShell, batch, JavaScript/VBScript idioms);
* an **archive**, by content: zip/7z anywhere (as the container stage opens them), rar, gzip,
  bzip2, xz, cab, ARJ, tar, ISO images;
* a **macro document**, by content: OLE2 compound files (legacy Office, and the macro-enabled
  Office formats are zips: archives) and RTF (it embeds OLE objects).

A name decides only what runs: ``report.xls`` against ``report.xlsx`` over a text body, or
``a.pdf`` against ``a.zip``, is no disagreement about risky content (no program runs either,
and the content is what it is under both names); ``a.pdf`` against ``a.exe`` is.

This module decides only that; the MIME stage and the container stage ask it when their
readings disagree (``mime.risky-disagreement:<kind>``, ``container.corrupt``). It is cheap:
magic bytes, one bounded regular-expression search, set look-ups.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from mailtower.settings import DEFAULT_BANNED_EXTENSIONS

_LNK_MAGIC = bytes.fromhex("4c0000000114020000000000c000000000000046")
_MACHO_MAGICS = (b"\xfe\xed\xfa\xce", b"\xfe\xed\xfa\xcf", b"\xce\xfa\xed\xfe", b"\xcf\xfa\xed\xfe")
OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"


def native_kind(data: bytes) -> str | None:
    """The kind of native executable ``data`` is ("pe", "elf", "macho", "lnk"), or None."""
    if data[:2] == b"MZ" and len(data) >= 0x40:
        e_lfanew = int.from_bytes(data[0x3C:0x40], "little")
        # A DOS stub pointing at a PE/NE/LE header: what Windows will actually run.
        if data[e_lfanew : e_lfanew + 4] == b"PE\0\0" or data[e_lfanew : e_lfanew + 2] in (
            b"NE",
            b"LE",
            b"LX",
        ):
            return "pe"
    if data[:4] == b"\x7fELF":
        return "elf"
    if data[:4] in _MACHO_MAGICS:
        return "macho"
    # Fat Mach-O shares 0xCAFEBABE with Java classes; a class file's next word is its version
    # (>= 45), a fat binary's is its small architecture count.
    if data[:4] == b"\xca\xfe\xba\xbe" and 0 < int.from_bytes(data[4:8], "big") <= 20:
        return "macho"
    if data[:20] == _LNK_MAGIC:
        return "lnk"
    return None


# Names Windows runs or hands to a script host or installer (Skeptic's executable-extensions
# list in rules/skeptic/00-lists.toml, which a tower may extend; these are its defaults).
EXECUTABLE_EXTENSIONS = DEFAULT_BANNED_EXTENSIONS | frozenset(
    [
        "exe",
        "scr",
        "pif",
        "com",
        "bat",
        "cmd",
        "vbs",
        "vbe",
        "js",
        "jse",
        "wsf",
        "wsh",
        "wsc",
        "hta",
        "cpl",
        "msi",
        "msp",
        "mst",
        "lnk",
        "jar",
        "ps1",
        "psm1",
        "psd1",
        "ps1xml",
        "psc1",
        "reg",
        "inf",
        "scf",
        "sct",
        "url",
        "chm",
        "hlp",
        "gadget",
        "application",
        "appref-ms",
        "msc",
        "shb",
        "shs",
        "dll",
        "ocx",
        "sys",
        "drv",
        "xbap",
        "xll",
        "library-ms",
        "settingcontent-ms",
        "appx",
        "appxbundle",
        "msix",
        "msixbundle",
        "diagcab",
        "iqy",
        "slk",
        "mde",
        "ade",
        "adp",
        "ins",
        "isp",
        "vxd",
        "ws",
        "mshxml",
        "msh",
        "msh1",
        "msh2",
        "msh1xml",
        "msh2xml",
        "vb",
        "cnt",
        "hpj",
        "job",
        "pcd",
        "prf",
        "cer",
        "crt",
        "elf",
        "so",
        "dylib",
        "bin",
        "run",
        "appimage",
        "apk",
        "dmg",
        "pkg",
        "deb",
        "rpm",
    ]
)
SCRIPT_EXTENSIONS = frozenset(
    [
        "js",
        "jse",
        "mjs",
        "vbs",
        "vbe",
        "vba",
        "bas",
        "ps1",
        "psm1",
        "psd1",
        "bat",
        "cmd",
        "sh",
        "py",
        "pl",
        "hta",
        "wsf",
        "wsc",
        "sct",
        "svg",
    ]
)
# A name makes text run only through these; an archive or a macro document is one by its
# content (a text file called .zip or .xls holds no archive and no macro).
RISKY_EXTENSIONS = EXECUTABLE_EXTENSIONS | SCRIPT_EXTENSIONS

RISKY_TYPES = frozenset(
    {
        # executables
        "application/x-msdownload",
        "application/x-msdos-program",
        "application/x-dosexec",
        "application/x-ms-dos-executable",
        "application/x-executable",
        "application/vnd.microsoft.portable-executable",
        "application/x-ms-shortcut",
        "application/x-ms-installer",
        "application/x-msi",
        "application/java-archive",
        "application/x-sh",
        # scripts
        "application/hta",
        "application/javascript",
        "application/x-javascript",
        "application/ecmascript",
        "text/javascript",
        "text/ecmascript",
        "text/jscript",
        "text/vbscript",
        "text/vbs",
        "application/x-vbscript",
        "application/x-powershell",
        "application/x-bat",
        "application/x-msdos-batch",
    }
)

_WINDOWS_TRAILING = " .\t\r\n\u00a0"
# Archives by their first bytes (zip and 7z are looked for anywhere: the container stage opens
# them wherever an extractor would).
_ARCHIVE_PREFIXES = (
    b"Rar!\x1a\x07",
    b"\x1f\x8b",
    b"BZh",
    b"\xfd7zXZ\x00",
    b"MSCF",
    b"\x60\xea",  # ARJ
)
_ANYWHERE = (b"PK\x03\x04", b"PK\x05\x06", b"7z\xbc\xaf\x27\x1c")
# Text that reads like script code. Skeptic recognises scripts properly in every object; this
# only says whether a disagreement is about something that may be one, so it leans wide.
_SCRIPT_TEXT = re.compile(
    rb"<script\b|<hta:|\bw?script\.(?:shell|createobject|echo|sleep)|\bcscript\b"
    rb"|\bcreateobject\s*\(|\bgetobject\s*\(|\bactivexobject\b|\bpowershell\b"
    rb"|\binvoke-expression\b|\biex\s*[(\$]|\bnew-object\b|\bdownload(?:string|file)\b"
    rb"|^\s*@?echo\s+off\b|\bexecuteglobal\b|\bexecute\s*\(|\beval\s*\("
    rb"|\bfromcharcode\b|\bchrw?\s*\(\s*\d|\bshell(?:execute)?\s*\(|#@~\^|\bregwrite\b"
    rb"|\bon\s+error\s+resume\s+next\b|\bend\s+(?:sub|function)\b|\bdim\s+\w+\s*(?:,|$|\()"
    rb"|\bfunction\s+\w+\s*\(|\bdocument\.write\b|\bwindow\.location\b|\bstart-process\b",
    re.I | re.M,
)
_SCRIPT_SCAN = 1 << 20  # bytes of an object the script search reads (mail parts are smaller)


def extension(name: str) -> str:
    """The extension Windows decides by: base name, trailing dots/spaces stripped, lower case."""
    base = re.split(r"[\\/]", name)[-1].rstrip(_WINDOWS_TRAILING)
    _, dot, ext = base.rpartition(".")
    return ext.strip().lower() if dot else ""


def risky_name(name: str) -> bool:
    """Whether ``name`` (or what a program that stops at a control character reads of it)
    ends in a risky extension."""
    return any(
        extension(reading) in RISKY_EXTENSIONS
        for reading in {name, re.split(r"[\x00-\x1f]", name)[0]}
    )


def risky_type(declared: str) -> bool:
    """Whether a declared MIME type (parameters ignored) is one that runs."""
    main = declared.split(";")[0].strip().lower()
    return main in RISKY_TYPES


def risky_content(data: bytes) -> str | None:
    """What risky thing ``data`` is by content ("executable", "archive", "macro-document",
    "script"), or None."""
    if native_kind(data) is not None:
        return "executable"
    if data.startswith(_ARCHIVE_PREFIXES) or any(magic in data for magic in _ANYWHERE):
        return "archive"
    if len(data) > 0x8005 and data[0x8001:0x8006] == b"CD001" or data[257:262] == b"ustar":
        return "archive"  # an ISO 9660 image, a tar archive
    if data.startswith((OLE_MAGIC, b"{\\rt")):
        return "macro-document"
    if _SCRIPT_TEXT.search(data[:_SCRIPT_SCAN].replace(b"\x00", b"")):
        return "script"  # UTF-16 text too: its NULs dropped
    return None


def names_disagree_about_risk(names: Iterable[str]) -> bool:
    """Whether several names of one object disagree about a risky extension: their extensions
    differ and one of them is risky (``a.pdf`` / ``a.exe``, ``x.txt`` / ``x.zip``)."""
    extensions = {extension(n) for n in names}
    if len(extensions) < 2:
        return False
    return any(risky_name(n) for n in names)
