"""zip, read every way an extractor reads one: each central directory wherever its end record
is (with anything before or after the archive), then the local headers no directory listed,
walked from the front as a streaming reader walks them."""

from __future__ import annotations

import bz2
import lzma
import struct
import zipfile

from mailtower.scanning.containers import _locate as locate
from mailtower.scanning.containers._core import (
    ANOMALY_CORRUPT,
    ANOMALY_ENCRYPTED,
    ANOMALY_NAMES_DIFFER,
    ANOMALY_UNSUPPORTED,
    OUT_CHUNK,
    ContainerLimitExceeded,
    Corrupt,
    Expansion,
    Sink,
    Unsupported,
    copy,
    log,
)
from mailtower.scanning.containers._decode import BufferingDecoder, Decoder, ZlibDecoder, decode
from mailtower.scanning.objects import ScanObject
from mailtower.scanning.risk import names_disagree_about_risk


def read(ex: Expansion, obj: ScanObject, certain: bool, covered: locate.Spans) -> None:
    """Every zip in ``obj``, read every way an extractor reads one.

    First each end record's central directory, wherever the record is, last first (``zipfile``
    looks 64 KiB back, ``unzip`` somewhat further; the union is the whole object), with anything
    before it (a self-extractor's stub) or after it; then the local headers no directory
    accounted for, walked from the front as a streaming reader does (entries hidden from
    the directory, archives whose directory is missing or broken).
    """
    data = obj.data
    seen: set[tuple[int, int, int, str]] = set()
    directories = 0
    end = len(data)
    while (pos := locate.rfind_uncovered(data, locate.ZIP_END, end, covered)) >= 0:
        end = pos
        ex.count_signature()
        directory = locate.zip_end_record(data, pos)
        if directory is not None and _zip_directory(ex, obj, directory, covered, seen):
            directories += 1
    if certain and not directories:
        # Starts like a zip, yet no directory reads: extractors will disagree about it.
        log.info("%s: zip without a readable central directory", obj.path)
        ex.anomaly(ANOMALY_CORRUPT)
    _zip_local_entries(ex, obj, certain, covered)


def _zip_directory(
    ex: Expansion,
    obj: ScanObject,
    directory: locate.ZipDirectory,
    covered: locate.Spans,
    seen: set[tuple[int, int, int, str]],
) -> bool:
    """Read the members one central directory lists; False if it was not one after all."""
    data = obj.data
    # zipfile builds an object per central-directory entry before we see any: refuse a
    # directory with more entries than the limit allows before it is parsed, and charge
    # them whether it then parses or not (many end records could otherwise each have a
    # long directory parsed that fails at its end).
    first, last = directory.entries_region
    entries = data.count(locate.ZIP_CENTRAL, first, last)
    if entries > ex.limits.max_members - ex.entries:
        raise ContainerLimitExceeded("members")
    ex.entries += entries
    src = memoryview(data)
    try:
        # Up to the end record: zipfile finds it last, as if nothing came after it.
        archive = zipfile.ZipFile(locate.ByteWindow(src, 0, directory.end))
        infos = archive.infolist()
    except NotImplementedError as exc:  # e.g. "zip file version 7.1" (newer than zipfile)
        log.info("%s: unsupported zip: %s", obj.path, exc)
        ex.anomaly(ANOMALY_UNSUPPORTED)
        covered.add(directory.start, directory.end)
        return True
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        log.debug("%s: end record at %d is no zip: %s", obj.path, directory.end, exc)
        return False
    covered.add(directory.start, directory.end)
    _zip_check_layout(ex, obj, infos)
    for info in infos:
        ex.check_time()  # (counted above)
        key = (info.header_offset, info.compress_type, info.compress_size, info.filename)
        if key in seen:  # the same entry listed by another directory: read once
            continue
        seen.add(key)
        if info.is_dir():
            continue
        try:
            start, local_name, local_names, local_flags, local_size = _zip_local_header(src, info)
        except Corrupt as exc:
            log.info("%s!%s: %s", obj.path, info.filename, exc)
            ex.anomaly(ANOMALY_ENCRYPTED if info.flag_bits & 0x41 else ANOMALY_CORRUPT)
            continue
        # The entry is read here: the local-header walk need not read it again. Its data
        # counts as read only as far as it was decoded (below): a stated size that reaches
        # further must not hide what lies behind the real end of the data.
        covered.add(info.header_offset, start)
        if info.flag_bits & 0x41:  # traditional or strong encryption
            ex.anomaly(ANOMALY_ENCRYPTED)
            continue
        if local_name not in (None, info.filename):
            # Clients that read local headers see another name than those that read the
            # central directory: scan under both. Suspicious only when the names disagree
            # about a risky extension (mailtower.scanning.risk).
            risky = names_disagree_about_risk({local_name, info.filename})
            ex.anomaly(ANOMALY_CORRUPT if risky else ANOMALY_NAMES_DIFFER)
        if not local_flags & 0x08 and local_size not in (info.compress_size, 0xFFFFFFFF):
            # A streaming reader would take another length for this member's data.
            log.info("%s!%s: local and central sizes differ", obj.path, info.filename)
            ex.anomaly(ANOMALY_CORRUPT)
        raw = src[start : start + info.compress_size]
        used = _zip_member(ex, obj, info, raw, local_names)
        covered.add(start, start + used)
        if used and used != info.compress_size:
            # Readers disagree: Java's ZipInputStream refuses the entry, zipfile and unzip
            # stop at the stream's end, a reader that trusts the size skips further.
            log.info("%s!%s: data ends before its stated size", obj.path, info.filename)
            ex.anomaly(ANOMALY_CORRUPT)
    return True


def _zip_member(
    ex: Expansion,
    obj: ScanObject,
    info: zipfile.ZipInfo,
    raw: memoryview,
    local_names: frozenset[str],
) -> int:
    """Read one member a directory lists; return how much of its data was decoded."""
    max_dict = ex.limits.max_decoder_memory
    used: list[int] = []

    def produce(sink: Sink) -> None:
        if len(raw) < info.compress_size:
            raise Corrupt("member data runs past the end of the archive")
        used.append(_zip_data(raw, info.compress_type, max_dict, sink))
        if sink.size != info.file_size or sink.crc != info.CRC:
            raise Corrupt(
                f"size {sink.size} / crc {sink.crc:08x} differ from the header's "
                f"{info.file_size} / {info.CRC:08x}"
            )

    # The central directory's names (zipfile has decoded one as the flag says and cut it at a
    # NUL: the bytes are read again) and the local header's.
    encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
    raw_name = info.orig_filename.encode(encoding, errors="replace")
    central = locate.zip_names(raw_name, info.flag_bits, info.extra)
    names = frozenset({info.filename, *central, *local_names} - {""})
    ex.member(obj, info.filename, produce, names)
    return used[0] if used else 0


def _zip_local_entries(
    ex: Expansion, obj: ScanObject, certain: bool, covered: locate.Spans
) -> None:
    """Local headers outside what the directories covered, walked from the front.

    A header where one must be (at the start of a zip, or right after an entry read here)
    is the archive's: what fails in it is corrupt. Anywhere else it is a weak sign, taken
    only if its entry reads through and checks out; otherwise the walk looks further.
    """
    data = obj.data
    descriptors = locate.ForwardIndex(data, locate.ZIP_DESCRIPTOR)
    pos = 0
    expected = 0 if certain else -1
    while (pos := locate.find_uncovered(data, locate.ZIP_LOCAL, pos, covered)) >= 0:
        ex.count_signature()
        descriptors.forget_before(pos)
        trusted = pos == expected
        entry = locate.zip_local_entry(data, pos)
        end = None
        if entry is not None:
            end = _zip_local_member(ex, obj, entry, trusted, descriptors)
        elif trusted:
            ex.anomaly(ANOMALY_CORRUPT)
        if end is None:
            pos += len(locate.ZIP_LOCAL)
            continue
        covered.add(pos, end)
        pos = expected = end


def _zip_local_member(
    ex: Expansion,
    obj: ScanObject,
    entry: locate.LocalEntry,
    trusted: bool,
    descriptors: locate.ForwardIndex,
) -> int | None:
    """Read one entry from its local header; where it ends, or None if it did not read."""
    data = obj.data
    known_end = None if entry.sizes_follow else entry.data_end
    if entry.name.endswith("/") and known_end == entry.data_start:
        ex.count_entry()  # a directory
        return known_end
    if entry.encrypted or entry.method not in locate.ZIP_DECODED_METHODS:
        # Unreadable here; with a stated extent that fits, it is an entry all the same.
        anomaly = ANOMALY_ENCRYPTED if entry.encrypted else ANOMALY_UNSUPPORTED
        if known_end is None or known_end > len(data):
            if trusted:
                ex.anomaly(anomaly)
            return None
        ex.count_entry()
        log.info("%s!%s: %s (local header)", obj.path, entry.name, anomaly)
        ex.anomaly(anomaly)
        return known_end
    max_dict = ex.limits.max_decoder_memory
    ends: list[int] = []  # where the entry's data ended, once known (checked or not)

    def produce(sink: Sink) -> None:
        _zip_local_data(data, entry, max_dict, sink, descriptors, ex, ends)

    if trusted:
        ex.count_entry()
        ex.member(obj, entry.name, produce, entry.names)  # a failed check: kept, flagged
    else:
        trial = ex.sink()
        try:
            produce(trial)
        except (Corrupt, Unsupported):
            return None  # no entry after all (what it decoded stays charged: fakes cost)
        ex.count_entry()
        ex.member(obj, entry.name, lambda sink: copy(trial, sink), entry.names)
    if not ends:
        return None
    if known_end is not None and ends[0] != known_end:
        log.info("%s!%s: data ends before its stated size", obj.path, entry.name)
        ex.anomaly(ANOMALY_CORRUPT)
    return ends[0]


def _zip_check_layout(ex: Expansion, obj: ScanObject, infos: list[zipfile.ZipInfo]) -> None:
    """Overlapping entries (one compressed kernel shared by many members) are a bomb."""
    spans = sorted(
        (info.header_offset, info.header_offset + 30 + info.compress_size) for info in infos
    )
    for (_, end), (next_start, _) in zip(spans, spans[1:], strict=False):
        if next_start < end:
            log.info("%s: zip entries overlap", obj.path)
            ex.anomaly(ANOMALY_CORRUPT)
            return


# -- format details ----------------------------------------------------------------------------


def _zip_local_header(
    src: memoryview, info: zipfile.ZipInfo
) -> tuple[int, str | None, frozenset[str], int, int]:
    """Offset of a member's data, and the name (as its flag says), every name an extractor
    could read (:func:`locate.zip_names`), flags and compressed size its local header gives."""
    offset = info.header_offset
    header = bytes(src[offset : offset + 30])
    if len(header) < 30 or header[:4] != locate.ZIP_LOCAL:
        raise Corrupt("bad local header")
    (flags,) = struct.unpack_from("<H", header, 6)
    (compressed_size,) = struct.unpack_from("<I", header, 18)
    name_len, extra_len = struct.unpack_from("<HH", header, 26)
    raw_name = bytes(src[offset + 30 : offset + 30 + name_len])
    extra = bytes(src[offset + 30 + name_len : offset + 30 + name_len + extra_len])
    encoding = "utf-8" if flags & 0x800 else "cp437"
    name = raw_name.decode(encoding, errors="replace") if raw_name else None
    names = locate.zip_names(raw_name, flags, extra)
    return offset + 30 + name_len + extra_len, name, names, flags, compressed_size


def _zip_data(raw: memoryview, method: int, max_dict: int, sink: Sink) -> int:
    """Decode one zip member's data into ``sink``; return the input bytes it used."""
    if method == zipfile.ZIP_STORED:
        for pos in range(0, len(raw), OUT_CHUNK):
            sink.consumed += min(OUT_CHUNK, len(raw) - pos)
            sink.write(raw[pos : pos + OUT_CHUNK])
        return len(raw)
    if method == zipfile.ZIP_DEFLATED:
        return decode(raw, lambda: ZlibDecoder(-15), sink)
    if method == zipfile.ZIP_BZIP2:
        return decode(raw, lambda: BufferingDecoder(bz2.BZ2Decompressor()), sink)
    if method == zipfile.ZIP_LZMA:
        decoder, offset = _zip_lzma_decoder(raw, max_dict)
        sink.consumed += offset
        return offset + decode(raw[offset:], lambda: decoder, sink)
    raise Unsupported(f"zip compression method {method}")


def _zip_local_data(
    data: bytes,
    entry: locate.LocalEntry,
    max_dict: int,
    sink: Sink,
    descriptors: locate.ForwardIndex,
    expander: Expansion,
    ends: list[int],
) -> None:
    """Decode one entry's data as its local header (or data descriptor) describes it; put
    where the entry ends in ``ends`` (before its checks: a failed check still read it)."""
    src = memoryview(data)
    start = entry.data_start
    if not entry.sizes_follow:
        raw = src[start : entry.data_end]
        if len(raw) < entry.compressed_size:
            raise Corrupt("member data runs past the end of the object")
        # Where a compressed stream ended, whatever size was stated (the caller compares).
        used = _zip_data(raw, entry.method, max_dict, sink)
        crc, size, end = entry.crc, entry.size, start + used
    elif entry.method == zipfile.ZIP_STORED:
        # Stored data has no end of its own: it ends at the first signed data descriptor that
        # states its own distance from the data start.
        pos = start
        while True:
            found = descriptors.next(pos)
            if found < 0:
                raise Corrupt("stored data without a data descriptor")
            expander.count_signature()
            descriptor = _zip_descriptor(data, found, found - start)
            if descriptor is not None:
                break
            pos = found + 1
        _zip_data(src[start:found], entry.method, max_dict, sink)
        crc, size, end = descriptor
    else:
        used = _zip_data(src[start:], entry.method, max_dict, sink)
        descriptor = _zip_descriptor(data, start + used, used)
        if descriptor is None:
            raise Corrupt("no data descriptor after the data")
        crc, size, end = descriptor
    ends.append(end)
    if sink.size != size or sink.crc != crc:
        raise Corrupt(
            f"size {sink.size} / crc {sink.crc:08x} differ from the header's {size} / {crc:08x}"
        )


def _zip_descriptor(data: bytes, pos: int, compressed_size: int) -> tuple[int, int, int] | None:
    """(crc, size, end) of the data descriptor at ``pos`` that states ``compressed_size``.

    Its signature is optional, and zip64 writers use 8-byte sizes: each layout is tried.
    """
    for zip64 in (False, True):
        found = locate.zip_descriptor(data, pos, zip64)
        if found is not None and found[1] == compressed_size:
            crc, _, size, end = found
            return crc, size, end
    return None


def _zip_lzma_decoder(raw: memoryview, max_dict: int) -> tuple[Decoder, int]:
    """A decoder for a zip LZMA member (APPNOTE 5.8.8: version, properties, raw LZMA1)."""
    if len(raw) < 9:
        raise Corrupt("short zip LZMA header")
    (props_size,) = struct.unpack_from("<H", raw, 2)
    props = bytes(raw[4 : 4 + props_size])
    if props_size != 5 or len(props) != 5 or props[0] >= 9 * 5 * 5:
        raise Corrupt("bad zip LZMA properties")
    (dict_size,) = struct.unpack_from("<I", props, 1)
    if dict_size > max_dict:  # FORMAT_RAW takes no memlimit: check the dictionary by hand
        raise ContainerLimitExceeded("memory")
    pb, rest = divmod(props[0], 45)
    lp, lc = divmod(rest, 9)
    lzma_filter = {"id": lzma.FILTER_LZMA1, "dict_size": dict_size, "lc": lc, "lp": lp, "pb": pb}
    try:
        decoder = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[lzma_filter])
    except (lzma.LZMAError, ValueError) as exc:
        raise Corrupt(f"bad zip LZMA properties: {exc}") from exc
    return BufferingDecoder(decoder), 4 + props_size
