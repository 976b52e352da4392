"""What an object really is: native-code magic, file-name parts, text decoding."""

from __future__ import annotations

import codecs
import re

# Native code by magic is also what the parsing stages call risky (one definition).
from mailtower.scanning.risk import native_kind as native_kind

OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
ZIP_MAGIC = b"PK\x03\x04"


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


def utf16_encoding(data: bytes) -> str | None:
    """ "utf-16" (BOM), "utf-16-le" or "utf-16-be" (no BOM: every other byte of the first 4 KB
    is NUL and the others are not, the way Notepad's "Unicode" saves ASCII text), or None."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    head = data[:_HEAD]
    head = head[: len(head) & ~1]
    if len(head) < 4:
        return None
    even, odd = head[0::2], head[1::2]
    if odd.count(0) == len(odd) and 0 not in even:
        return "utf-16-le"
    if even.count(0) == len(even) and 0 not in odd:
        return "utf-16-be"
    return None


def decode_text(data: bytes) -> str:
    """Bytes of a script or page as text: BOM-aware (UTF-8, UTF-16), UTF-16 without a BOM,
    UTF-8, falling back to Latin-1."""
    if data.startswith(codecs.BOM_UTF8):
        return data.decode("utf-8-sig", errors="replace")
    utf16 = utf16_encoding(data)
    if utf16:
        return data.decode(utf16, errors="replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def looks_binary(data: bytes) -> bool:
    """Whether ``data`` is not text (NUL bytes near the start, the way file(1) decides), UTF-16
    text being text."""
    head = data[:_HEAD]
    return b"\0" in head and utf16_encoding(data) is None


_HEAD = 4096
