"""Office documents and RTF: VBA macro source (via oletools' olevba) and RTF embedded objects."""

from __future__ import annotations

import hashlib
import io
import logging
import re
import threading
import warnings
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field

from mailtower.scanning.skeptic._sniff import OLE_MAGIC, ZIP_MAGIC, find_pe

log = logging.getLogger(__name__)

# Big enough for any real VBA project; a bigger "vbaProject.bin" is a bomb, not a document.
MAX_OLE_BYTES = 64 << 20
MAX_ZIP_MEMBERS = 5000
# Far above real VBA projects: a longer source is taken for an MS-OVBA decompression bomb, and
# fails closed as unanalysable.
MAX_VBA_SOURCE = 8 * 1024 * 1024
_VBA_STORAGE = "_VBA_PROJECT".encode("utf-16-le")  # directory entry name inside OLE
# What zipfile raises on broken or hostile archives: bad structure or offsets, a corrupt deflate
# stream (zlib.error, met only when a member is read), encryption (RuntimeError), methods it
# does not know (NotImplementedError).
ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    OSError,
    RuntimeError,
    NotImplementedError,
    EOFError,
    ValueError,
    zlib.error,
)
_XML_OFFICE = (
    b"http://schemas.microsoft.com/office/word/2003/wordml",
    b"http://schemas.microsoft.com/office/2006/xmlPackage",
)


@dataclass(frozen=True)
class Macros:
    """What the VBA in one object amounts to."""

    status: str  # "none" | "found" | "unanalysable"
    source: str = ""
    reason: str = ""


NO_MACROS = Macros("none")


def macros(data: bytes) -> Macros:
    """The VBA source in an Office document (OLE, OOXML, ActiveMime, Office XML), if any."""
    candidate, hint = _macro_candidate(data)
    if candidate is None:
        return NO_MACROS if not hint else Macros("unanalysable", reason=hint)
    return _read_vba(candidate, hint)


def all_macros(data: bytes, rtf: list[RtfObject] | None = None) -> list[Macros]:
    """The VBA of ``data`` and that of macro documents embedded in it as RTF objects (``rtf``:
    its RTF objects, when already read)."""
    if rtf is None:
        rtf = rtf_objects(data) if is_rtf(data) else []
    return [macros(data)] + [macros(ole) for ole in (o.embedded_ole() for o in rtf) if ole]


def vba_sources(data: bytes) -> list[str]:
    """The VBA source read from ``data`` and from macro documents embedded in it as RTF
    objects: what a scanner of plain text cannot see in MS-OVBA's compressed form."""
    return [m.source for m in all_macros(data) if m.status == "found"]


# The pipeline reads a document's VBA for the object engines, then Skeptic for its rules: olevba
# runs once. Only documents that may hold VBA get here; the last few results are kept by a
# digest of the document (not the document itself), and only when their source is small.
_READ_KEEP = 8
_READ_KEEP_SOURCE = 256 * 1024
_read: OrderedDict[bytes, Macros] = OrderedDict()
_read_lock = threading.Lock()


def _read_vba(candidate: bytes, hint: str) -> Macros:
    key = hashlib.blake2b(candidate, digest_size=16).digest()
    with _read_lock:
        found = _read.get(key)
        if found is not None:
            _read.move_to_end(key)
            return found
    found = _olevba(candidate, hint)
    if len(found.source) <= _READ_KEEP_SOURCE:
        with _read_lock:
            _read[key] = found
            while len(_read) > _READ_KEEP:
                _read.popitem(last=False)
    return found


def forget_read_vba() -> None:
    """Drop the kept results (tests that count olevba's runs)."""
    with _read_lock:
        _read.clear()


def _olevba(candidate: bytes, hint: str) -> Macros:
    try:
        with warnings.catch_warnings():  # oletools 0.60 trips pyparsing deprecation warnings
            warnings.simplefilter("ignore", DeprecationWarning)
            from oletools.olevba import VBA_Parser  # type: ignore[import-untyped]

        parser = VBA_Parser("attachment", data=candidate, relaxed=True, disable_pcode=True)
        try:
            if not parser.detect_vba_macros():
                return NO_MACROS
            # A module whose stream olevba cannot open comes back as None, not as text.
            source = "\n".join(code for _, _, _, code in parser.extract_macros() if code)
        finally:
            parser.close()
    except Exception as exc:  # olevba raises many kinds on hostile input
        if _VBA_STORAGE in candidate or hint:
            return Macros("unanalysable", reason=f"olevba: {type(exc).__name__}: {exc}")
        log.debug("olevba could not open an object without VBA markers: %s", exc)
        return NO_MACROS
    if not source.strip():
        # olevba logs and swallows a dir stream it cannot parse: a VBA project is there but no
        # module was read. Office saves every module with its attributes, never empty.
        return Macros("unanalysable", reason="olevba found a VBA project but read no module")
    if len(source) > MAX_VBA_SOURCE:
        # An MS-OVBA bomb (a copy token repeats up to 4 KiB): not read on by anyone.
        return Macros("unanalysable", reason=f"VBA source of {len(source)} characters (limit)")
    return Macros("found", source=source)


def _macro_candidate(data: bytes) -> tuple[bytes | None, str]:
    """The bytes olevba should read, or (None, why it cannot) / (None, "") if no VBA."""
    if data.startswith(OLE_MAGIC):
        return data, ""
    if data.startswith(b"ActiveMime"):
        # MSO/ActiveMime (Office "single file web page" and Word 2003 XML): zlib-compressed OLE.
        try:
            inflated = zlib.decompressobj().decompress(data[0x32:], MAX_OLE_BYTES)
        except zlib.error as exc:
            return None, f"ActiveMime: {exc}"
        return (inflated, "") if inflated.startswith(OLE_MAGIC) else (None, "")
    if data.startswith(ZIP_MAGIC):
        return _zip_candidate(data)
    head = data[:65536]
    if any(ns in head for ns in _XML_OFFICE):
        return data, ""
    return None, ""


def _zip_candidate(data: bytes) -> tuple[bytes | None, str]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()[:MAX_ZIP_MEMBERS]
            has_ole = False
            for info in members:
                if info.is_dir():
                    continue
                named_vba = "vbaproject" in info.filename.lower()
                if info.file_size > MAX_OLE_BYTES:
                    if named_vba:
                        return None, f"{info.filename}: {info.file_size} bytes (limit)"
                    continue
                with archive.open(info) as member:
                    if member.read(len(OLE_MAGIC)) == OLE_MAGIC:
                        has_ole = True
                if named_vba and not has_ole:
                    return None, f"{info.filename} is not an OLE file"
    except ZIP_ERRORS as exc:
        # Encrypted or broken zips are the container stage's to report, unless they claim VBA.
        if b"vbaProject" in data:
            return None, f"zip: {exc}"
        return None, ""
    return (data, "") if has_ole else (None, "")


def macro_keywords(source: str, patterns: list[re.Pattern[str]]) -> list[str]:
    """Which of ``patterns`` occur in VBA source (comment lines ignored), as matched text."""
    code = "\n".join(
        line for line in source.lower().splitlines() if not line.lstrip().startswith(("'", "rem "))
    )
    found = []
    for pattern in patterns:
        match = pattern.search(code)
        if match:
            found.append(match.group())
    return found


# --- RTF --------------------------------------------------------------------------------------


@dataclass
class RtfObject:
    """One \\object group of an RTF document."""

    class_names: set[str] = field(default_factory=set)  # lower case
    data: bytes = b""  # \objdata decoded from hex
    auto_update: bool = False  # \objupdate: Word refreshes (runs) it on open

    @property
    def has_executable(self) -> bool:
        return find_pe(self.data)

    def embedded_ole(self) -> bytes | None:
        """An OLE2 compound document inside the object (e.g. a macro document), if any."""
        at = self.data.find(OLE_MAGIC)
        return self.data[at:] if at >= 0 else None


_RTF_OBJECT = re.compile(rb"\\object\b|\\objdata\b")
_RTF_DESTINATION = re.compile(rb"\{\\\*[^{}]*\}")
_RTF_CONTROL = re.compile(rb"\\[a-zA-Z]+-?\d* ?|\\[^a-zA-Z]")
_RTF_CLASS = re.compile(rb"\\objclass\s+([^}\\]+)")
_NOT_HEX = re.compile(rb"[^0-9a-fA-F]")


def is_rtf(data: bytes) -> bool:
    """RTF as Word reads it: Word only needs the file to start with ``{\\rt``."""
    return data[:1024].lstrip()[:4] == b"{\\rt"


def rtf_objects(data: bytes, max_objects: int = 64) -> list[RtfObject]:
    """Every embedded object of an RTF document, with its class and decoded data."""
    objects = []
    starts = [m.start() for m in _RTF_OBJECT.finditer(data)]
    seen_end = -1
    for start in starts[:max_objects]:
        if start < seen_end:
            continue
        group_start = data.rfind(b"{", 0, start)
        group = _group(data, group_start if group_start >= 0 else start)
        seen_end = (group_start if group_start >= 0 else start) + len(group)
        obj = RtfObject(auto_update=b"\\objupdate" in group)
        for match in _RTF_CLASS.finditer(group):
            obj.class_names.add(match.group(1).strip().decode("latin-1").lower())
        at = group.find(b"\\objdata")
        if at >= 0:
            # Only the \objdata destination: the \result picture after it is hex too.
            brace = group.rfind(b"{", 0, at)
            blob = _group(group, brace) if brace > 0 else group[at:]
            obj.data = _hex_blob(blob[blob.find(b"\\objdata") + len(b"\\objdata") :])
            ole1_class = _ole1_class(obj.data)
            if ole1_class:
                obj.class_names.add(ole1_class.lower())
        objects.append(obj)
    return objects


_RTF_STRUCTURE = re.compile(rb"\\.|[{}]", re.S)


def _group(data: bytes, start: int, limit: int = 32 << 20) -> bytes:
    """The brace group opening at ``start`` (to the end of data if it never closes)."""
    depth = 0
    end = min(len(data), start + limit)
    # Only braces and escapes matter; jumping between them keeps megabytes of hex fast.
    for match in _RTF_STRUCTURE.finditer(data, start, end):
        token = match.group()
        if token == b"{":
            depth += 1
        elif token == b"}":
            depth -= 1
            if depth == 0:
                return data[start : match.end()]
    return data[start:end]


def _hex_blob(text: bytes) -> bytes:
    # Word ignores unknown {\*...} destinations, control words and whitespace inside \objdata,
    # which is exactly how exploit documents break naive hex scanners.
    previous = None
    while previous != text:
        previous, text = text, _RTF_DESTINATION.sub(b"", text)
    digits = _NOT_HEX.sub(b"", _RTF_CONTROL.sub(b"", text))
    if len(digits) % 2:
        digits = digits[:-1]
    return bytes.fromhex(digits.decode("ascii"))


def _ole1_class(blob: bytes) -> str | None:
    """The class name of an OLE1 ObjectHeader (OLEVersion, FormatID, ClassName)."""
    if len(blob) < 12:
        return None
    length = int.from_bytes(blob[8:12], "little")
    if not 0 < length <= 128:
        return None
    name = blob[12 : 12 + length].rstrip(b"\0")
    try:
        return name.decode("ascii") if name.isascii() else None
    except UnicodeDecodeError:
        return None
