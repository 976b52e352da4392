"""What an object really is: native-code magic, file-name parts, text decoding."""

from __future__ import annotations

import codecs
import re

OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
ZIP_MAGIC = b"PK\x03\x04"
_LNK_MAGIC = bytes.fromhex("4c0000000114020000000000c000000000000046")
_MACHO_MAGICS = (b"\xfe\xed\xfa\xce", b"\xfe\xed\xfa\xcf", b"\xce\xfa\xed\xfe", b"\xcf\xfa\xed\xfe")


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


def find_pe(data: bytes, max_candidates: int = 4096) -> bool:
    """Whether a PE image starts anywhere in ``data`` (an executable embedded in a blob)."""
    start = data.find(b"MZ")
    # Bounded: a blob of "MZMZMZ…" must not turn this into a quadratic search.
    for _ in range(max_candidates):
        if start == -1:
            return False
        e_lfanew = int.from_bytes(data[start + 0x3C : start + 0x40], "little")
        if 0 < e_lfanew < 0x100000 and data[start + e_lfanew : start + e_lfanew + 4] == b"PE\0\0":
            return True
        start = data.find(b"MZ", start + 1)
    return False


# Characters Windows drops from the end of a file name: "evil.exe . " opens as "evil.exe".
_WINDOWS_TRAILING = " .\t\r\n\u00a0"


def base_name(name: str) -> str:
    """The last path component of a file name (archive members and some MUAs send paths)."""
    return re.split(r"[\\/]", name)[-1]


def real_name(name: str) -> str:
    """The name as Windows will treat it: base name without trailing dots and spaces."""
    return base_name(name).rstrip(_WINDOWS_TRAILING)


def extensions(name: str) -> list[str]:
    """The dot-separated suffixes of a name, lower case, outermost last; padding ignored.

    ``"invoice.pdf      .scr"`` → ``["pdf", "scr"]``; all-digit parts (``libfoo.so.1``) are kept
    but callers may skip them.
    """
    parts = real_name(name).split(".")[1:]
    return [p.strip().lower() for p in parts if p.strip()]


def real_extension(name: str) -> str:
    """The extension that decides what opens the file, or "" (version numbers skipped)."""
    exts = extensions(name)
    while exts and exts[-1].isdigit():
        exts.pop()
    return exts[-1] if exts else ""


def decode_text(data: bytes) -> str:
    """Bytes of a script or page as text: BOM-aware, UTF-8, falling back to Latin-1."""
    for bom, encoding in (
        (codecs.BOM_UTF8, "utf-8-sig"),
        (codecs.BOM_UTF16_LE, "utf-16"),
        (codecs.BOM_UTF16_BE, "utf-16"),
    ):
        if data.startswith(bom):
            return data.decode(encoding, errors="replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def looks_binary(data: bytes) -> bool:
    """Whether ``data`` is not text (NUL bytes near the start, the way file(1) decides)."""
    head = data[:4096]
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return False
    return b"\0" in head
