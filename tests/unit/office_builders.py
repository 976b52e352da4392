"""Office documents with real VBA projects, built at run time (no binary samples in the repo).

Three layers, each following its Microsoft specification closely enough that oletools' olevba
(what Skeptic reads macros with) parses them the way it parses files Office saved:

- ``cfb()``: an OLE2 Compound File (MS-CFB version 3: 512-byte sectors, one FAT, a mini stream
  for streams under 4096 bytes, directory siblings kept as a balanced red-black tree);
- ``vba_project()``: the storages and streams of a VBA project (MS-OVBA: ``PROJECT``,
  ``VBA/_VBA_PROJECT``, ``VBA/dir`` and one stream per module, source at the dir's
  MODULEOFFSET), compressed with ``ovba_compress()``;
- ``doc()``, ``xls()``, ``docm()``, ``docx()``: the documents a mail carries.

What is not real: the document bodies. ``WordDocument`` and ``Workbook`` hold only their
format's first record, and ``_VBA_PROJECT`` is the version-independent form (no compiled
p-code), which makes Office recompile the project from source: the source is what counts.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from archive_builders import zip_of

OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"

# --- MS-OVBA compression --------------------------------------------------------------------

_CHUNK = 4096  # bytes of decompressed data per chunk


def ovba_compress(data: bytes) -> bytes:
    """A CompressedContainer (MS-OVBA 2.4.1) that uses no copy tokens.

    Full 4096-byte chunks go as raw chunks; the last, shorter one as literal tokens (a flag
    byte of zeros before every eight bytes). Both are valid MS-OVBA, and what Office's own
    compressor writes for data without repeats. A last chunk longer than 3640 bytes cannot be
    written without copy tokens (nor padded, which would add NULs to the source): ValueError."""
    out = bytearray(b"\x01")  # SignatureByte
    for start in range(0, len(data), _CHUNK):
        chunk = data[start : start + _CHUNK]
        if len(chunk) == _CHUNK:
            # Header: size 4098 - 3, signature 0b011, flag 0 (raw).
            out += struct.pack("<H", 0x3000 | (_CHUNK + 2 - 3)) + chunk
            continue
        tokens = b"".join(b"\x00" + chunk[i : i + 8] for i in range(0, len(chunk), 8))
        if len(tokens) > _CHUNK:
            raise ValueError(f"last chunk of {len(chunk)} bytes needs copy tokens (max 3640)")
        out += struct.pack("<H", 0xB000 | (len(tokens) + 2 - 3)) + tokens  # flag 1: compressed
    return bytes(out)


# --- MS-CFB compound files ------------------------------------------------------------------

_SECTOR = 512
_MINI_SECTOR = 64
_MINI_CUTOFF = 4096
_FREE, _END_OF_CHAIN, _FAT_SECTOR, _NO_STREAM = 0xFFFFFFFF, 0xFFFFFFFE, 0xFFFFFFFD, 0xFFFFFFFF
_STORAGE, _STREAM, _ROOT = 1, 2, 5
_RED, _BLACK = 0, 1


@dataclass(eq=False)
class _Entry:
    name: str
    kind: int
    data: bytes = b""
    children: dict[str, _Entry] = field(default_factory=dict)
    sid: int = 0
    left: int = _NO_STREAM
    right: int = _NO_STREAM
    child: int = _NO_STREAM
    color: int = _BLACK
    start: int = _END_OF_CHAIN


def cfb(streams: dict[str, bytes]) -> bytes:
    """A compound file holding ``streams`` (paths like ``"Macros/VBA/dir"``; storages on the
    way are created). Streams under 4096 bytes live in the mini stream, as MS-CFB requires."""
    root = _Entry("Root Entry", _ROOT)
    for path, data in streams.items():
        *storages, name = path.split("/")
        node = root
        for part in storages:
            node = node.children.setdefault(part.upper(), _Entry(part, _STORAGE))
        node.children[name.upper()] = _Entry(name, _STREAM, data)
    entries = _number(root)

    # Mini stream: small streams in 64-byte sectors, chained by the mini FAT.
    mini, mini_fat = bytearray(), []
    for entry in entries:
        if entry.kind == _STREAM and 0 < len(entry.data) < _MINI_CUTOFF:
            entry.start = len(mini) // _MINI_SECTOR
            count = -(-len(entry.data) // _MINI_SECTOR)
            mini_fat += [entry.start + i + 1 for i in range(count - 1)] + [_END_OF_CHAIN]
            mini += entry.data.ljust(count * _MINI_SECTOR, b"\0")
    root.data = bytes(mini)

    # Regular sectors, in file order after the FAT: directory, mini FAT, mini stream, streams.
    # The directory's size is known now; its content (start sectors) only after allocation.
    runs: list[tuple[_Entry | None, bytes]] = [(None, bytes(len(entries) * 128))]
    mini_fat_bytes = struct.pack(f"<{len(mini_fat)}I", *mini_fat)
    runs.append((None, mini_fat_bytes))
    runs.append((root, root.data))
    runs += [(e, e.data) for e in entries if e.kind == _STREAM and len(e.data) >= _MINI_CUTOFF]
    sizes = [-(-len(data) // _SECTOR) for _, data in runs]
    fat_sectors = 1
    while fat_sectors * (_SECTOR // 4) < fat_sectors + sum(sizes):
        fat_sectors += 1
    if fat_sectors > 109:
        raise ValueError("too big for a header-only DIFAT (about 7 MB)")
    fat = [_FAT_SECTOR] * fat_sectors
    starts = []
    for size in sizes:
        starts.append(len(fat) if size else _END_OF_CHAIN)
        fat += [len(fat) + i + 1 for i in range(size - 1)] + ([_END_OF_CHAIN] if size else [])
    for (entry, _), start in zip(runs, starts, strict=True):
        if entry is not None:
            entry.start = start
    fat += [_FREE] * (-len(fat) % (_SECTOR // 4))
    directory = b"".join(_direntry(e) for e in entries)
    directory += _direntry(None) * (-len(entries) % (_SECTOR // 128))
    runs[0] = (None, directory)

    header = bytearray(_SECTOR)
    header[0:8] = OLE_MAGIC
    struct.pack_into("<HHHHH", header, 24, 0x003E, 0x0003, 0xFFFE, 9, 6)  # v3, 2^9, 2^6
    struct.pack_into("<II", header, 44, fat_sectors, starts[0])  # FAT count, first dir sector
    struct.pack_into("<I", header, 56, _MINI_CUTOFF)
    struct.pack_into("<II", header, 60, starts[1], sizes[1])  # first mini FAT sector, count
    struct.pack_into("<II", header, 68, _END_OF_CHAIN, 0)  # no DIFAT sectors
    difat = list(range(fat_sectors)) + [_FREE] * (109 - fat_sectors)
    struct.pack_into("<109I", header, 76, *difat)
    body = struct.pack(f"<{len(fat)}I", *fat)
    body += b"".join(
        data.ljust(size * _SECTOR, b"\0") for (_, data), size in zip(runs, sizes, strict=True)
    )
    return bytes(header) + body


def _number(root: _Entry) -> list[_Entry]:
    """Every entry in directory order (root first), with sibling trees and child links set."""
    entries = [root]
    pending = [root]
    while pending:
        storage = pending.pop(0)
        children = sorted(storage.children.values(), key=_cfb_order)
        for child in children:
            child.sid = len(entries)
            entries.append(child)
        storage.child = _sibling_tree(children, 0, len(children).bit_length() - 1)
        pending += [c for c in children if c.kind == _STORAGE]
    return entries


def _cfb_order(entry: _Entry) -> tuple[int, str]:
    # MS-CFB 2.6.4: shorter names first, then by upper-cased code points.
    return len(entry.name), entry.name.upper()


def _sibling_tree(nodes: list[_Entry], depth: int, deepest: int) -> int:
    """Sorted siblings as a balanced binary tree, the root's sid returned. Middle splits fill
    every level but the last, so all black above a red last level is a valid red-black tree."""
    if not nodes:
        return _NO_STREAM
    middle = len(nodes) // 2
    node = nodes[middle]
    node.left = _sibling_tree(nodes[:middle], depth + 1, deepest)
    node.right = _sibling_tree(nodes[middle + 1 :], depth + 1, deepest)
    node.color = _RED if 0 < depth == deepest else _BLACK
    return node.sid


def _direntry(entry: _Entry | None) -> bytes:
    if entry is None:  # an unused slot
        return b"\0" * 66 + struct.pack("<BBIII", 0, 0, *[_NO_STREAM] * 3) + b"\0" * 48
    name = entry.name.encode("utf-16-le")
    if len(name) > 62 or any(c in entry.name for c in "/\\:!"):
        raise ValueError(f"not a compound-file name: {entry.name!r}")
    start, size = (0, 0) if entry.kind == _STORAGE else (entry.start, len(entry.data))
    if entry.kind != _STORAGE and size == 0:
        start = _END_OF_CHAIN
    links = struct.pack("<III", entry.left, entry.right, entry.child)
    return (
        name.ljust(64, b"\0")
        + struct.pack("<HBB", len(name) + 2, entry.kind, entry.color)
        + links
        + b"\0" * 36  # CLSID, state bits, creation and modification times
        + struct.pack("<IQ", start, size)
    )


# --- MS-OVBA VBA projects -------------------------------------------------------------------

_CODEPAGE = 1252
# ID and protection values (CMG/DPB/GC) taken together from the sample PROJECT stream quoted in
# olevba's source: Office encrypts the latter with a key derived from the ID, so they go as a
# set. Not verified here (olevba ignores them); only Office would notice a mismatch.
_PROJECT_ID = "{5312AC8A-349D-4950-BDD0-49BE3C4DD0F0}"
_PROTECTION = (
    'CMG="F1F301E705E705E705E705"',
    'DPB="8F8D7FE3831F2020202020"',
    'GC="2D2FDD81E51EE61EE6E1"',
)
_STDOLE = (
    "*\\G{00020430-0000-0000-C000-000000000046}#2.0#0#C:\\Windows\\System32\\stdole2.tlb"
    "#OLE Automation"
)
_DOCUMENT_ATTRIBUTES = (
    "VB_GlobalNameSpace = False",
    "VB_Creatable = False",
    "VB_PredeclaredId = True",
    "VB_Exposed = True",
    "VB_TemplateDerived = False",
    "VB_Customizable = True",
)


@dataclass(frozen=True)
class Module:
    """One VBA module: a standard module (``Module1``), or with ``base`` (its VB_Base) the
    module of a document, workbook or sheet (``ThisDocument``)."""

    name: str
    code: str
    base: str = ""

    @property
    def document(self) -> bool:
        return bool(self.base)

    @property
    def source(self) -> str:
        """The module's text as the VBA editor stores it: attributes first, CRLF lines."""
        lines = [f'Attribute VB_Name = "{self.name}"']
        if self.document:
            lines.append(f'Attribute VB_Base = "{self.base}"')
            lines += [f"Attribute {attribute}" for attribute in _DOCUMENT_ATTRIBUTES]
        lines += self.code.replace("\r\n", "\n").split("\n")
        return "\r\n".join(lines)


def vba_project(modules: list[Module], root: str = "") -> dict[str, bytes]:
    """The streams of a VBA project stored under ``root`` ("" for a vbaProject.bin, "Macros"
    in a .doc, "_VBA_PROJECT_CUR" in an .xls), ready for ``cfb()``."""
    prefix = f"{root}/" if root else ""
    streams = {
        f"{prefix}PROJECT": _project_stream(modules),
        # Version-independent _VBA_PROJECT (MS-OVBA 2.3.4.1): Reserved1 0x61CC, Version 0xFFFF,
        # Reserved2 0x00, Reserved3, no performance cache.
        f"{prefix}VBA/_VBA_PROJECT": struct.pack("<HHBH", 0x61CC, 0xFFFF, 0, 0),
    }
    offsets = {}
    for n, module in enumerate(modules):
        # The PerformanceCache (compiled code) comes first; its length is MODULEOFFSET. Office
        # ignores it when _VBA_PROJECT's version does not match, so any bytes will do.
        cache = bytes([n + 1]) * (64 + 32 * n)
        offsets[module.name] = len(cache)
        compressed = ovba_compress(module.source.encode(f"cp{_CODEPAGE}"))
        streams[f"{prefix}VBA/{module.name}"] = cache + compressed
    streams[f"{prefix}VBA/dir"] = ovba_compress(_dir_stream(modules, offsets))
    return streams


def _record(record_id: int, data: bytes) -> bytes:
    return struct.pack("<HI", record_id, len(data)) + data


def _text(record_id: int, unicode_id: int, text: str) -> bytes:
    """Text in the project's code page, then a reserved marker, its size and the UTF-16."""
    wide = text.encode("utf-16-le")
    return _record(record_id, text.encode(f"cp{_CODEPAGE}")) + _record(unicode_id, wide)


def _dir_stream(modules: list[Module], offsets: dict[str, int]) -> bytes:
    """The decompressed dir stream (MS-OVBA 2.3.4.2)."""
    u32, u16 = (lambda v: struct.pack("<I", v)), (lambda v: struct.pack("<H", v))
    out = bytearray()
    out += _record(0x0001, u32(1))  # PROJECTSYSKIND: 32-bit Windows
    out += _record(0x0002, u32(0x409))  # PROJECTLCID
    out += _record(0x0014, u32(0x409))  # PROJECTLCIDINVOKE
    out += _record(0x0003, u16(_CODEPAGE))  # PROJECTCODEPAGE
    out += _record(0x0004, b"VBAProject")  # PROJECTNAME
    out += _text(0x0005, 0x0040, "")  # PROJECTDOCSTRING
    out += _text(0x0006, 0x003D, "")  # PROJECTHELPFILEPATH (HelpFile1, HelpFile2)
    out += _record(0x0007, u32(0))  # PROJECTHELPCONTEXT
    out += _record(0x0008, u32(0))  # PROJECTLIBFLAGS
    out += struct.pack("<HIIH", 0x0009, 4, 1, 0)  # PROJECTVERSION (Reserved 4, 1.0)
    out += _text(0x000C, 0x003C, "")  # PROJECTCONSTANTS
    # PROJECTREFERENCES: stdole, as every Office project has.
    out += _text(0x0016, 0x003E, "stdole")  # REFERENCENAME
    libid = _STDOLE.encode("ascii")
    registered = u32(len(libid)) + libid + u32(0) + u16(0)
    out += _record(0x000D, registered)  # REFERENCEREGISTERED
    # PROJECTMODULES
    out += _record(0x000F, u16(len(modules)))
    out += _record(0x0013, u16(0xFFFF))  # PROJECTCOOKIE
    for module in modules:
        out += _text(0x0019, 0x0047, module.name)  # MODULENAME, MODULENAMEUNICODE
        out += _text(0x001A, 0x0032, module.name)  # MODULESTREAMNAME
        out += _text(0x001C, 0x0048, "")  # MODULEDOCSTRING
        out += _record(0x0031, u32(offsets[module.name]))  # MODULEOFFSET
        out += _record(0x001E, u32(0))  # MODULEHELPCONTEXT
        out += _record(0x002C, u16(0xFFFF))  # MODULECOOKIE
        out += _record(0x0022 if module.document else 0x0021, b"")  # MODULETYPE
        out += _record(0x002B, b"")  # MODULE terminator
    out += _record(0x0010, b"")  # dir stream terminator
    return bytes(out)


def _project_stream(modules: list[Module]) -> bytes:
    """The PROJECT stream (MS-OVBA 2.3.1): the project's properties as text."""
    lines = [f'ID="{_PROJECT_ID}"']
    for module in modules:
        lines.append(
            f"Document={module.name}/&H00000000" if module.document else f"Module={module.name}"
        )
    lines += [
        'Name="VBAProject"',
        'HelpContextID="0"',
        'VersionCompatible32="393222000"',
        *_PROTECTION,
        "",
        "[Host Extender Info]",
        "&H00000001={3832D640-CF90-11CF-8E43-00A0C911005A};VBE;&H00000000",
        "",
        "[Workspace]",
    ]
    lines += [f"{module.name}=0, 0, 0, 0, C" for module in modules]
    return ("\r\n".join(lines) + "\r\n").encode(f"cp{_CODEPAGE}")


# --- documents ------------------------------------------------------------------------------


def _padded(head: bytes, size: int = 4096) -> bytes:
    # Office writes its main streams in whole 512-byte blocks; 4096 puts them in the FAT.
    return head.ljust(size, b"\0")


def word_modules(code: str) -> list[Module]:
    """A Word project as Word saves one: ThisDocument (empty) and Module1 holding ``code``."""
    return [Module("ThisDocument", "", base="1Normal.ThisDocument"), Module("Module1", code)]


def excel_modules(code: str) -> list[Module]:
    """An Excel project: ThisWorkbook holding ``code`` (where Workbook_Open lives), Sheet1."""
    return [
        Module("ThisWorkbook", code, base="0{00020819-0000-0000-C000-000000000046}"),
        Module("Sheet1", "", base="0{00020820-0000-0000-C000-000000000046}"),
    ]


def doc(modules: list[Module] | None = None) -> bytes:
    """A Word 97-2003 document (its VBA project in the ``Macros`` storage)."""
    # FIB base: wIdent 0xA5EC (Word), nFib 0x00C1 (Word 97 and later).
    streams = {"WordDocument": _padded(struct.pack("<HH", 0xA5EC, 0x00C1)), "1Table": b"\0" * 8}
    if modules:
        streams.update(vba_project(modules, "Macros"))
    return cfb(streams)


def xls(modules: list[Module] | None = None) -> bytes:
    """An Excel 97-2003 workbook (its VBA project in ``_VBA_PROJECT_CUR``)."""
    # BIFF8 BOF record (workbook globals) then EOF.
    bof = struct.pack("<HHHHHHII", 0x0809, 16, 0x0600, 0x0005, 0x2775, 0x07CD, 0, 0x0206)
    streams = {"Workbook": _padded(bof + struct.pack("<HH", 0x000A, 0))}
    if modules:
        streams.update(vba_project(modules, "_VBA_PROJECT_CUR"))
    return cfb(streams)


def vba_project_bin(modules: list[Module]) -> bytes:
    """The ``vbaProject.bin`` part of a macro-enabled OOXML document: a project at the root."""
    return cfb(vba_project(modules))


_PKG = "http://schemas.openxmlformats.org/package/2006"
_REL = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
_WML = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"
_WORD_MAIN = "application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"
_WORD_MACRO_MAIN = "application/vnd.ms-word.document.macroEnabled.main+xml"


def docm(modules: list[Module]) -> bytes:
    """A macro-enabled Word document (.docm): the project in ``word/vbaProject.bin``."""
    return _word_package(vba_project_bin(modules))


def docx() -> bytes:
    """The same Word document without macros (.docx)."""
    return _word_package(None)


def _word_package(vba: bytes | None) -> bytes:
    main = _WORD_MACRO_MAIN if vba is not None else _WORD_MAIN
    overrides = f'<Override PartName="/word/document.xml" ContentType="{main}"/>'
    document_rels = ""
    if vba is not None:
        overrides += (
            '<Override PartName="/word/vbaProject.bin" '
            'ContentType="application/vnd.ms-office.vbaProject"/>'
        )
        document_rels = (
            '<Relationship Id="rId1" '
            'Type="http://schemas.microsoft.com/office/2006/relationships/vbaProject" '
            'Target="vbaProject.bin"/>'
        )
    parts = {
        "[Content_Types].xml": (
            f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            f'<Types xmlns="{_PKG}/content-types">'
            '<Default Extension="rels" '
            'ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
            '<Default Extension="xml" ContentType="application/xml"/>'
            f"{overrides}</Types>"
        ),
        "_rels/.rels": (
            f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            f'<Relationships xmlns="{_PKG}/relationships">'
            f'<Relationship Id="rId1" Type="{_REL}/officeDocument" Target="word/document.xml"/>'
            "</Relationships>"
        ),
        "word/document.xml": (
            f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            f'<w:document xmlns:w="{_WML}"><w:body><w:p><w:r>'
            "<w:t>Quarterly report</w:t></w:r></w:p></w:body></w:document>"
        ),
        "word/_rels/document.xml.rels": (
            f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            f'<Relationships xmlns="{_PKG}/relationships">{document_rels}</Relationships>'
        ),
    }
    members = {name: text.encode() for name, text in parts.items()}
    if vba is not None:
        members["word/vbaProject.bin"] = vba
    return zip_of(members)
