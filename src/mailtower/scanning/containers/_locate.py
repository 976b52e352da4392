"""Finding archives inside an object: zip and 7z records at any offset, read without copying.

Extractors do not agree on where an archive starts. Python's ``zipfile`` looks for the zip end
record in the last 64 KiB; Debian's Info-ZIP ``unzip`` 6.0 somewhat further back (a record 73,000
bytes from the end was found, 75,000 not, measured 2026-12-06); streaming readers (Java's
``ZipInputStream``) walk local headers from the front; 7-Zip opens a zip or 7z behind a
self-extractor stub. No reach is the right one, so the container module searches the whole
object, which covers them all (the union principle); this module holds the byte-level pieces,
pure and bounded:

* :class:`Spans` — byte ranges already read as part of an archive, so that the same bytes are
  not opened twice (a zip stored inside a zip is its member's business, not its parent's);
* :func:`find_uncovered` / :func:`rfind_uncovered` — a signature outside those ranges; the
  search position only ever moves one way, so a whole object is searched in linear time;
  :class:`ForwardIndex` the same for a signature asked about again from earlier positions;
* :func:`zip_end_record`, :func:`zip_local_entry`, :func:`sevenzip_extent` — O(1) plausibility
  checks of one candidate record (what a chance match of a few bytes almost never passes);
* :class:`ByteWindow` — a read-only file over part of a buffer, for ``zipfile`` and ``py7zr``.
"""

from __future__ import annotations

import bisect
import io
import struct
import zlib
from dataclasses import dataclass

ZIP_LOCAL = b"PK\x03\x04"
ZIP_CENTRAL = b"PK\x01\x02"
ZIP_END = b"PK\x05\x06"
ZIP64_END = b"PK\x06\x06"
ZIP64_LOCATOR = b"PK\x06\x07"
ZIP_DESCRIPTOR = b"PK\x07\x08"
SEVENZIP = b"7z\xbc\xaf\x27\x1c"

ZIP_END_SIZE = 22
_ZIP64_END_SIZE = 56
_ZIP64_LOCATOR_SIZE = 20
_LOCAL_SIZE = 30
_SEVENZIP_HEADER_SIZE = 32

# Compression methods a zip entry may plausibly carry (APPNOTE 4.4.5): what a chance match of
# "PK\3\4" in other data almost never has. 0/8/12/14 are decoded here; the rest are reported.
ZIP_DECODED_METHODS = frozenset({0, 8, 12, 14})
ZIP_KNOWN_METHODS = ZIP_DECODED_METHODS | frozenset(
    {1, 2, 3, 4, 5, 6, 9, 10, 93, 95, 96, 97, 98, 99}
)


class Spans:
    """Byte ranges of one object already read as part of an archive (kept merged and sorted)."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        i = bisect.bisect_left(self._starts, start)
        # Merge with the previous range if it reaches this one, then swallow the ones after.
        if i > 0 and self._ends[i - 1] >= start:
            i -= 1
            start = self._starts[i]
            end = max(end, self._ends[i])
        j = i
        while j < len(self._starts) and self._starts[j] <= end:
            end = max(end, self._ends[j])
            j += 1
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]

    def containing(self, pos: int) -> tuple[int, int] | None:
        """The range that holds ``pos``, if any."""
        i = bisect.bisect_right(self._starts, pos) - 1
        if i >= 0 and pos < self._ends[i]:
            return self._starts[i], self._ends[i]
        return None

    def next_start(self, pos: int, default: int) -> int:
        """Where the first range after ``pos`` starts (``default`` if none does)."""
        i = bisect.bisect_right(self._starts, pos)
        return self._starts[i] if i < len(self._starts) else default

    def previous_end(self, pos: int) -> int:
        """Where the last range ending at or before ``pos`` ends (0 if none does)."""
        i = bisect.bisect_right(self._starts, pos) - 1
        while i >= 0 and self._ends[i] > pos:
            i -= 1
        return self._ends[i] if i >= 0 else 0


# Both searches look only in the gaps between ranges already read: bytes inside an archive's
# members are never searched again, and every byte is searched at most once per direction.


def find_uncovered(data: bytes, signature: bytes, pos: int, spans: Spans) -> int:
    """The first ``signature`` at or after ``pos`` that does not start inside ``spans``, or -1."""
    while pos < len(data):
        span = spans.containing(pos)
        if span is not None:
            pos = span[1]
            continue
        gap_end = spans.next_start(pos, len(data))
        found = data.find(signature, pos, gap_end + len(signature) - 1)
        if found >= 0:
            return found
        pos = gap_end
    return -1


def rfind_uncovered(data: bytes, signature: bytes, end: int, spans: Spans) -> int:
    """The last ``signature`` starting before ``end`` and not inside ``spans``, or -1."""
    while end > 0:
        span = spans.containing(end - 1)
        if span is not None:
            end = span[0]
            continue
        gap_start = spans.previous_end(end - 1)
        found = data.rfind(signature, gap_start, end + len(signature) - 1)
        if found >= 0:
            return found
        end = gap_start
    return -1


class ForwardIndex:
    """Where one signature occurs at or after a position, each byte of ``data`` searched once.

    For a walk that moves forward (``forget_before``) but may ask again about positions it
    asked about before: zip data descriptors, looked for behind every stored entry whose size
    comes after its data. Without it, many such headers would each search to the end.
    """

    def __init__(self, data: bytes, signature: bytes):
        self._data = data
        self._signature = signature
        self._found: list[int] = []  # occurrences at or after the floor, in order
        self._first = 0  # index of the first one not forgotten
        self._searched = 0  # occurrences starting before this are all in _found (or forgotten)
        self._floor = 0

    def forget_before(self, pos: int) -> None:
        self._floor = max(self._floor, pos)
        while self._first < len(self._found) and self._found[self._first] < self._floor:
            self._first += 1
        if self._first > 1024 and self._first * 2 > len(self._found):
            del self._found[: self._first]
            self._first = 0

    def next(self, pos: int) -> int:
        """The first occurrence at or after ``pos`` (not before the floor), or -1."""
        i = bisect.bisect_left(self._found, pos, self._first)
        if i < len(self._found):
            return self._found[i]
        self._searched = max(self._searched, self._floor)
        while self._searched < len(self._data):
            hit = self._data.find(self._signature, self._searched)
            if hit < 0:
                self._searched = len(self._data)
                break
            self._searched = hit + 1
            self._found.append(hit)
            if hit >= pos:
                return hit
        return -1


@dataclass(frozen=True)
class ZipDirectory:
    """Where a zip end record says its central directory is."""

    start: int  # offset of the directory's first entry in the object
    end: int  # offset just past the end record: a reader sees the object up to here
    entries_region: tuple[int, int]  # the directory's bytes (for counting entries before parsing)


def zip_end_record(data: bytes, pos: int) -> ZipDirectory | None:
    """The central directory of the end record at ``pos``, if it is where a reader looks.

    Like ``zipfile`` and ``unzip``, the directory is taken to lie just before the end record
    (zip64: before its zip64 end record and locator), whatever offset the record states: that
    is what lets a self-extractor's stub or any other prefix stand before the archive.
    """
    record = data[pos : pos + ZIP_END_SIZE]
    if len(record) < ZIP_END_SIZE:
        return None
    _, _, _, _, entries, size, _, _ = struct.unpack("<4sHHHHIIH", record)
    locator = pos - _ZIP64_LOCATOR_SIZE
    end64 = locator - _ZIP64_END_SIZE
    if locator >= 0 and data[locator : locator + 4] == ZIP64_LOCATOR:
        # zip64 records stand between the directory and the end record (zipfile writes them
        # whenever it likes, even when the end record's own fields would do).
        if end64 < 0 or data[end64 : end64 + 4] != ZIP64_END:
            return None
        (entries, size) = struct.unpack_from("<QQ", data, end64 + 32)
        directory_end = end64
    else:
        directory_end = pos
    start = directory_end - size
    if entries == 0 and size == 0:
        return ZipDirectory(start, pos + ZIP_END_SIZE, (start, start))  # an empty archive
    if start < 0 or data[start : start + 4] != ZIP_CENTRAL:
        return None
    return ZipDirectory(start, pos + ZIP_END_SIZE, (start, directory_end))


@dataclass(frozen=True)
class LocalEntry:
    """One zip local header, as a streaming reader sees it."""

    offset: int
    flags: int
    method: int
    crc: int
    compressed_size: int
    size: int
    name: str
    data_start: int
    zip64: bool
    names: frozenset[str] = frozenset()  # every name an extractor could read (zip_names)

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & 0x41) or self.method == 99

    @property
    def sizes_follow(self) -> bool:
        """Bit 3: crc and sizes are in a data descriptor after the data, not in the header."""
        return bool(self.flags & 0x08)

    @property
    def data_end(self) -> int:
        return self.data_start + self.compressed_size


def zip_local_entry(data: bytes, pos: int) -> LocalEntry | None:
    """The local header at ``pos``, if it is plausible (a known method, a name that fits)."""
    header = data[pos : pos + _LOCAL_SIZE]
    if len(header) < _LOCAL_SIZE:
        return None
    (_, version, flags, method, _, _, crc, csize, size, name_len, extra_len) = struct.unpack(
        "<4sHHHHHIIIHH", header
    )
    if method not in ZIP_KNOWN_METHODS or version & 0xFF > 99 or name_len == 0:
        return None
    name_start = pos + _LOCAL_SIZE
    data_start = name_start + name_len + extra_len
    if data_start > len(data):
        return None
    zip64 = False
    if csize == 0xFFFFFFFF or size == 0xFFFFFFFF:
        extra = data[name_start + name_len : data_start]
        found = _zip64_sizes(extra)
        if found is None:
            return None
        size, csize = found
        zip64 = True
    raw_name = data[name_start : name_start + name_len]
    encoding = "utf-8" if flags & 0x800 else "cp437"
    name = raw_name.decode(encoding, errors="replace")
    names = zip_names(raw_name, flags, data[name_start + name_len : data_start])
    return LocalEntry(pos, flags, method, crc, csize, size, name, data_start, zip64, names)


def zip_names(raw_name: bytes, flags: int, extra: bytes) -> frozenset[str]:
    """Every name an extractor could give a zip member: its header name as the UTF-8 flag says
    and, if not ASCII, the other way (writers set the flag wrongly, readers ignore it); the
    Info-ZIP Unicode Path extra field's name (0x7075; readers differ in checking its CRC
    against the header name, so it counts either way); and what stops at a NUL."""
    names = {raw_name.decode("utf-8" if flags & 0x800 else "cp437", errors="replace")}
    if not raw_name.isascii():
        names.add(raw_name.decode("cp437" if flags & 0x800 else "utf-8", errors="replace"))
    pos = 0
    while pos + 4 <= len(extra):
        kind, length = struct.unpack_from("<HH", extra, pos)
        if kind == 0x7075 and length > 5 and pos + 4 + length <= len(extra):
            names.add(extra[pos + 9 : pos + 4 + length].decode("utf-8", errors="replace"))
        pos += 4 + length
    names |= {n.split("\x00", 1)[0] for n in names if "\x00" in n}
    names.discard("")
    return frozenset(names)


def _zip64_sizes(extra: bytes) -> tuple[int, int] | None:
    pos = 0
    while pos + 4 <= len(extra):
        kind, length = struct.unpack_from("<HH", extra, pos)
        if kind == 1 and length >= 16 and pos + 4 + 16 <= len(extra):
            size, csize = struct.unpack_from("<QQ", extra, pos + 4)
            return size, csize
        pos += 4 + length
    return None


def zip_descriptor(data: bytes, pos: int, zip64: bool) -> tuple[int, int, int, int] | None:
    """(crc, compressed size, size, end) of a data descriptor at ``pos`` (signature optional)."""
    if data[pos : pos + 4] == ZIP_DESCRIPTOR:
        pos += 4
    layout = "<IQQ" if zip64 else "<III"
    length = struct.calcsize(layout)
    if pos + length > len(data):
        return None
    crc, csize, size = struct.unpack_from(layout, data, pos)
    return crc, csize, size, pos + length


def sevenzip_extent(data: bytes, pos: int) -> int | None:
    """The end of the 7z archive whose signature header is at ``pos``, if its CRC holds.

    The signature header carries a CRC-32 of the next 20 bytes (the header database's place
    and size): six magic bytes found by chance almost never pass it.
    """
    header = data[pos : pos + _SEVENZIP_HEADER_SIZE]
    if len(header) < _SEVENZIP_HEADER_SIZE:
        return None
    (start_crc,) = struct.unpack_from("<I", header, 8)
    if zlib.crc32(header[12:32]) != start_crc:
        return None
    next_offset, next_size = struct.unpack_from("<QQ", header, 12)
    end = pos + _SEVENZIP_HEADER_SIZE + next_offset + next_size
    if end > len(data):
        return None
    return end


class ByteWindow(io.RawIOBase):
    """A read-only file over ``buf[start:end]``, without copying it."""

    def __init__(self, buf: memoryview, start: int, end: int):
        super().__init__()
        self._buf = buf[start:end]
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._buf)}[whence]
        if base + offset < 0:
            raise OSError("seek before the start of the window")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        chunk = self._buf[self._pos : self._pos + len(buffer)]
        n = len(chunk)
        memoryview(buffer).cast("B")[:n] = chunk
        self._pos += n
        return n
