"""Container expansion: the members of zip, tar, gzip, bzip2, xz/lzma and 7z objects, with limits.

Formats are recognised by their content (magic bytes), never by a declared name or type. An
object is read every way an extractor reads it (the union principle): as the format its first
bytes declare, and as every zip or 7z further in that some extractor opens — a zip end record
anywhere (``zipfile`` looks 64 KiB back, Info-ZIP's ``unzip`` further: the union is the whole
object), its directory with anything before it (a self-extractor's stub) or after it, local
headers no directory lists (streaming readers walk them), a 7z signature header at any offset
(7-Zip opens self-extractors). Byte ranges one
reading accounted for are not searched again (see ``_archive_locate``). Every decompression is
streamed in bounded chunks and every byte is counted, so a decompression bomb stops at the first
limit it crosses instead of filling memory; headers that state sizes are never trusted for
allocation. What cannot be fully expanded is reported as an anomaly, which the pipeline turns
into ``suspicious`` (never ``clean``):

* ``container.limit-exceeded:<which>`` — ``depth``, ``members``, ``bytes``, ``ratio``, ``time``,
  ``memory`` (a decoder that asks for more memory than allowed) or ``signatures`` (an object
  stuffed with archive signatures); expansion stops there;
* ``container.encrypted`` — an encrypted member or archive (it cannot be scanned);
* ``container.corrupt`` — damaged or inconsistent data (truncated streams, bad checksums,
  overlapping zip entries, sizes or names that disagree between headers);
* ``container.unsupported`` — a compression method no kept library decodes (e.g. zip deflate64).
"""

from __future__ import annotations

import bz2
import io
import logging
import lzma
import struct
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import py7zr
import py7zr.exceptions
import py7zr.io
import py7zr.py7zr

from mailtower.scanning.containers import _locate as locate
from mailtower.scanning.objects import ScanObject

log = logging.getLogger(__name__)

MiB = 1024 * 1024

ANOMALY_LIMIT = "container.limit-exceeded"
ANOMALY_ENCRYPTED = "container.encrypted"
ANOMALY_CORRUPT = "container.corrupt"
ANOMALY_UNSUPPORTED = "container.unsupported"
# The expansion outran its wall-clock backstop before its CPU-time limit: the machine starved
# it. Not the archive's fault and not a finding: the pipeline answers tempfail (retry later).
ANOMALY_WALL_TIMEOUT = "container.wall-timeout"

_IN_CHUNK = 64 * 1024  # compressed bytes fed to a decoder at a time
_OUT_CHUNK = 1 * MiB  # most output a decoder may produce per call (bounds memory per step)


@dataclass(frozen=True)
class ContainerLimits:
    """How far one object may be expanded (all limits count over the whole expansion)."""

    max_depth: int = 8  # nesting levels below the object handed to expand()
    max_members: int = 10_000  # archive entries seen, in total
    max_expanded_bytes: int = 512 * MiB  # bytes produced, in total (intermediate archives too)
    max_ratio: float = 100.0  # output/input, per member and over the whole expansion
    # CPU time of the expanding thread (a starved machine must not make an archive look like
    # a bomb); a bomb of any kind reaches it in CPU, or the bytes/ratio limits first.
    max_time_s: float = 10.0
    max_wall_s: float = 30.0  # wall-clock backstop: a starved expansion still ends
    # Ratios are judged only past this much output: a tiny member (an empty form, a line of
    # spaces) routinely exceeds 100:1 and is harmless; bombs cross this within milliseconds.
    ratio_grace_bytes: int = 1 * MiB
    # Largest dictionary an LZMA/xz decoder may allocate (xz -9 needs 64 MiB): the header of an
    # xz stream chooses it, so without a cap a few bytes could demand gigabytes.
    max_decoder_memory: int = 128 * MiB
    # Archive signatures examined inside one object (zip end records and local headers, 7z
    # headers, at any offset): a plausible archive needs few; a file stuffed with them is
    # hostile, and each costs a look.
    max_signatures: int = 10_000


def detect(data: bytes) -> str | None:
    """The container format of ``data`` by its magic bytes: zip, tar, gzip, … or None."""
    kind, _ = _detect(data)
    return kind


def expand(
    obj: ScanObject, limits: ContainerLimits | None = None
) -> tuple[list[ScanObject], list[str]]:
    """Members of ``obj`` (recursively, in order) and the anomalies met expanding it."""
    if _detect(obj.data)[0] is None:
        # Not a container: nothing to expand (the expander would find the same), and no
        # clock to start — most objects of most messages end here.
        return [], []
    return _Expander(obj, limits or ContainerLimits()).run()


# -- detection ---------------------------------------------------------------------------------

_ZIP_LOCAL = locate.ZIP_LOCAL
_ZIP_END = locate.ZIP_END
_SEVENZIP = locate.SEVENZIP
_XZ = b"\xfd7zXZ\x00"
_GZIP = b"\x1f\x8b\x08"


def _detect(data: bytes) -> tuple[str | None, bool]:
    """(format, certain): ``certain`` is False when only a weak sign matched.

    A weak sign (a zip or 7z record anywhere, a plausible V7 tar header or raw LZMA header)
    that then fails to parse means "not a container", not "corrupt container": plenty of
    ordinary files contain such bytes by chance.
    """
    kind, certain = _detect_head(data)
    # An archive behind something else, wherever an extractor finds one: a self-extractor's
    # stub, a polyglot image, data appended after it. Every zip that has anything to extract
    # has a local header: its end record alone is not looked for (one search fewer).
    if kind is None and _ZIP_LOCAL in data:
        return "zip", False
    if kind is None and _SEVENZIP in data:
        return "7z", False
    return kind, certain


def _detect_head(data: bytes) -> tuple[str | None, bool]:
    """The format the object's first bytes declare (archives found further in: _detect)."""
    head = data[:512]
    if head.startswith((_ZIP_LOCAL, _ZIP_END)):
        return "zip", True
    if head.startswith(_SEVENZIP):
        return "7z", True
    if head.startswith(_GZIP):
        return "gzip", True
    if head.startswith(_XZ):
        return "xz", True
    if head[:3] == b"BZh" and head[3:4].isdigit() and head[4:10] in (b"1AY&SY", b"\x17rE8P\x90"):
        return "bzip2", True
    if len(data) >= 512 and data[257:262] == b"ustar":
        return "tar", True
    if _looks_like_v7_tar(head):
        return "tar", False
    if _looks_like_lzma_alone(head):
        return "lzma", False
    return None, False


def _looks_like_v7_tar(head: bytes) -> bool:
    if len(head) < 512 or head[0] == 0:
        return False
    field = head[148:156].replace(b"\0", b" ").strip()
    if not field or any(c not in b"01234567" for c in field):
        return False
    expected = sum(head[:148]) + sum(head[156:512]) + 8 * 0x20
    return int(field, 8) == expected


def _looks_like_lzma_alone(head: bytes) -> bool:
    # .lzma has no magic: properties byte (lc+lp*9+pb*45, nearly always 0x5D), dictionary size
    # (2^n or 2^n + 2^(n-1)), then the uncompressed size (-1 = unknown) or a sane number.
    if len(head) < 13 or head[0] >= 9 * 5 * 5:
        return False
    (dict_size,) = struct.unpack_from("<I", head, 1)
    (size,) = struct.unpack_from("<Q", head, 5)
    if dict_size < 4096 or dict_size > 1536 * MiB:
        return False
    top = 1 << (dict_size.bit_length() - 1)
    if dict_size not in (top, top | (top >> 1)):
        return False
    return size == (1 << 64) - 1 or size < (1 << 40)


# -- limits and accounting ---------------------------------------------------------------------


class _LimitExceeded(Exception):
    def __init__(self, which: str):
        super().__init__(which)
        self.which = which


class _WallTimeout(_LimitExceeded):
    """The wall-clock backstop ran out (anomaly container.wall-timeout, not a limit finding)."""

    def __init__(self) -> None:
        super().__init__("wall-time")


class _Corrupt(Exception):
    """The container is damaged: it cannot be read through (anomaly container.corrupt)."""


class _Unsupported(Exception):
    """A format variant the libraries cannot decode (anomaly container.unsupported)."""


class _Sink:
    """Collects one member's output and charges every byte to the expansion's budget."""

    def __init__(self, expander: _Expander):
        self._expander = expander
        # BytesIO grows in place and getvalue() hands its buffer over without a copy: a
        # member costs its own size once, not twice (a list of chunks joined would double it).
        self._buf = io.BytesIO()
        self.size = 0
        self.consumed = 0  # compressed bytes fed so far (for the member's ratio)
        self.crc = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        # Charged before it is kept: the chunk that crosses a limit is dropped, not stored.
        self._expander.charge(len(data), self.size + len(data), self.consumed)
        self._buf.write(data)
        self.size += len(data)
        self.crc = zlib.crc32(data, self.crc)

    def data(self) -> bytes:
        return self._buf.getvalue()


class _Decoder(Protocol):
    @property
    def eof(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def feed(self, data: bytes | memoryview) -> Iterator[bytes]: ...


class _WrappedDecoder:
    """A stdlib decompressor's end-of-stream state, shared by the decoders below."""

    _d: Any

    @property
    def eof(self) -> bool:
        return bool(self._d.eof)

    @property
    def unused_data(self) -> bytes:
        return bytes(self._d.unused_data)


class _ZlibDecoder(_WrappedDecoder):
    """zlib/deflate/gzip with bounded output per step (leftover input waits in the tail)."""

    def __init__(self, wbits: int):
        self._d = zlib.decompressobj(wbits)

    def feed(self, data: bytes | memoryview) -> Iterator[bytes]:
        out = self._d.decompress(data, _OUT_CHUNK)
        yield out
        # A full output buffer may leave output pending inside zlib even with no input left.
        while not self._d.eof and (self._d.unconsumed_tail or len(out) == _OUT_CHUNK):
            out = self._d.decompress(self._d.unconsumed_tail, _OUT_CHUNK)
            yield out


class _BufferingDecoder(_WrappedDecoder):
    """bz2/lzma decoders: they keep leftover input themselves and say when they need more."""

    def __init__(self, decoder: bz2.BZ2Decompressor | lzma.LZMADecompressor):
        self._d = decoder

    def feed(self, data: bytes | memoryview) -> Iterator[bytes]:
        yield self._d.decompress(data, _OUT_CHUNK)
        while not self._d.eof and not self._d.needs_input:
            yield self._d.decompress(b"", _OUT_CHUNK)


_DECODE_ERRORS = (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError)


def _decode(src: memoryview, new_decoder: Callable[[], _Decoder], sink: _Sink) -> int:
    """Stream ``src`` through one decoder into ``sink``; return the input bytes it used."""
    decoder = new_decoder()
    pos = 0
    try:
        while pos < len(src) and not decoder.eof:
            chunk = src[pos : pos + _IN_CHUNK]
            pos += len(chunk)
            sink.consumed += len(chunk)
            for out in decoder.feed(chunk):
                sink.write(out)
    except lzma.LZMAError as exc:
        if "memory" in str(exc).lower():
            raise _LimitExceeded("memory") from exc
        raise _Corrupt(f"{exc}") from exc
    except _DECODE_ERRORS as exc:
        raise _Corrupt(f"{exc}") from exc
    if not decoder.eof:
        raise _Corrupt("truncated stream")
    return pos - len(decoder.unused_data)


def _decode_streams(
    src: memoryview, new_decoder: Callable[[], _Decoder], magic: bytes, sink: _Sink
) -> int:
    """Decode concatenated streams (gzip members, xz/bzip2 streams) as one output, like gunzip;
    return where the last stream ended."""
    pos = 0
    while True:
        pos += _decode(src[pos:], new_decoder, sink)
        # xz allows NUL stream padding between streams; anything else after the last stream
        # is trailing garbage, which the raw object's own scan still sees.
        while pos < len(src) and src[pos] == 0:
            pos += 1
        if bytes(src[pos : pos + len(magic)]) != magic:
            return pos


# -- the expander ------------------------------------------------------------------------------


class _Expander:
    def __init__(self, obj: ScanObject, limits: ContainerLimits):
        self.obj = obj
        self.limits = limits
        # One expansion runs in one thread (thread_time is per thread).
        self.cpu_deadline = time.thread_time() + limits.max_time_s
        now = time.monotonic()
        self.wall_deadline = now + limits.max_wall_s
        # CPU time cannot run ahead of wall time: before this, the CPU clock (a system call)
        # need not be read (mime/_limits.py, Budget).
        self.cpu_possible = now + limits.max_time_s
        self.source_size = max(len(obj.data), 1)
        self.members: list[ScanObject] = []
        self.anomalies: list[str] = []
        self.entries = 0
        self.expanded = 0
        self.signatures = 0

    def run(self) -> tuple[list[ScanObject], list[str]]:
        try:
            self.expand(self.obj)
        except _WallTimeout:
            log.warning("%s: container expansion outran its wall-clock backstop", self.obj.path)
            self.anomaly(ANOMALY_WALL_TIMEOUT)
        except _LimitExceeded as exc:
            log.info("%s: container limit exceeded: %s", self.obj.path, exc.which)
            self.anomaly(f"{ANOMALY_LIMIT}:{exc.which}")
        except Exception:
            # A parser met input it was not written for (hostile archives find such paths):
            # what it could not read is not clean.
            log.warning("%s: container expansion failed", self.obj.path, exc_info=True)
            self.anomaly(ANOMALY_CORRUPT)
        return self.members, self.anomalies

    # -- bookkeeping

    def anomaly(self, name: str) -> None:
        if name not in self.anomalies:
            self.anomalies.append(name)

    def check_time(self) -> None:
        now = time.monotonic()
        if now >= self.cpu_possible and time.thread_time() >= self.cpu_deadline:
            raise _LimitExceeded("time")
        if now >= self.wall_deadline:
            raise _WallTimeout()

    def count_signature(self) -> None:
        """Count one archive signature examined inside an object (a candidate, real or not)."""
        self.signatures += 1
        if self.signatures > self.limits.max_signatures:
            raise _LimitExceeded("signatures")
        self.check_time()

    def count_entry(self) -> None:
        self.entries += 1
        if self.entries > self.limits.max_members:
            raise _LimitExceeded("members")
        self.check_time()

    def charge(self, n: int, member_size: int, member_input: int) -> None:
        """Count ``n`` more output bytes of a member now ``member_size`` bytes long."""
        limits = self.limits
        self.expanded += n
        if self.expanded > limits.max_expanded_bytes:
            raise _LimitExceeded("bytes")
        if member_size > limits.ratio_grace_bytes and (
            member_size > limits.max_ratio * max(member_input, 1)
        ):
            raise _LimitExceeded("ratio")
        if self.expanded > limits.ratio_grace_bytes and (
            self.expanded > limits.max_ratio * self.source_size
        ):
            raise _LimitExceeded("ratio")
        self.check_time()

    def sink(self) -> _Sink:
        return _Sink(self)

    def add(self, parent: ScanObject, name: str, sink: _Sink, names: frozenset[str]) -> ScanObject:
        member = ScanObject(
            data=sink.data(),
            path=f"{parent.path}!{name}",
            filenames=names or frozenset({name}),
            views=parent.views,
            depth=parent.depth + 1,
        )
        self.members.append(member)
        return member

    # -- recursion

    def expand(self, obj: ScanObject) -> None:
        """Every reading of ``obj``: the format its first bytes declare, then every zip or 7z
        further in that some extractor would open (each byte range read once)."""
        if _detect(obj.data)[0] is None:
            return
        if obj.depth >= self.limits.max_depth:
            raise _LimitExceeded("depth")
        self.check_time()
        covered = locate.Spans()
        kind, certain = _detect_head(obj.data)
        if kind is not None:
            handler = {
                "zip": self._zip,
                "tar": self._tar,
                "7z": self._sevenzip,
                "gzip": self._gzip,
                "bzip2": self._bzip2,
                "xz": self._xz,
                "lzma": self._lzma_alone,
            }[kind]
            handler(obj, certain, covered)
        if kind != "zip":  # _zip reads every zip in the object itself
            self._zip(obj, False, covered)
        self._sevenzip_embedded(obj, covered)

    def member(
        self,
        parent: ScanObject,
        name: str,
        produce: Callable[[_Sink], None],
        names: frozenset[str] = frozenset(),
    ) -> bool:
        """Produce one member into a sink, keep what came out (even partial), then recurse.

        False when it could not be read through (corrupt or unsupported)."""
        names = names or frozenset({name})
        sink = self.sink()
        try:
            produce(sink)
        except _LimitExceeded:
            if sink.size:
                self.add(parent, name, sink, names)  # the bytes before the limit are scanned
            raise
        except _Corrupt as exc:
            log.info("%s!%s: corrupt: %s", parent.path, name, exc)
            self.anomaly(ANOMALY_CORRUPT)
            if sink.size:
                self.add(parent, name, sink, names)
            return False
        except _Unsupported as exc:
            log.info("%s!%s: unsupported: %s", parent.path, name, exc)
            self.anomaly(ANOMALY_UNSUPPORTED)
            return False
        self.expand(self.add(parent, name, sink, names))
        return True

    # -- single-stream compressors

    def _streams(
        self,
        obj: ScanObject,
        name: str,
        new_decoder: Callable[[], _Decoder],
        magic: bytes,
        covered: locate.Spans,
    ) -> None:
        """One compressed object's content; its compressed bytes are not searched again (what
        they hold verbatim, a stored block's, is in the content, which is)."""
        src = memoryview(obj.data)
        used: list[int] = []
        self.count_entry()
        self.member(
            obj, name, lambda sink: used.append(_decode_streams(src, new_decoder, magic, sink))
        )
        if used:
            covered.add(0, used[0])

    def _gzip(self, obj: ScanObject, certain: bool, covered: locate.Spans) -> None:
        name = _gzip_name(obj.data) or _stripped_name(obj, (".gz", ".tgz", ".z"))
        self._streams(obj, name, lambda: _ZlibDecoder(31), _GZIP, covered)

    def _bzip2(self, obj: ScanObject, certain: bool, covered: locate.Spans) -> None:
        name = _stripped_name(obj, (".bz2", ".tbz", ".tbz2"))
        self._streams(obj, name, lambda: _BufferingDecoder(bz2.BZ2Decompressor()), b"BZh", covered)

    def _xz(self, obj: ScanObject, certain: bool, covered: locate.Spans) -> None:
        memlimit = self.limits.max_decoder_memory

        def new() -> _Decoder:
            return _BufferingDecoder(lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=memlimit))

        self._streams(obj, _stripped_name(obj, (".xz", ".txz")), new, _XZ, covered)

    def _lzma_alone(self, obj: ScanObject, certain: bool, covered: locate.Spans) -> None:
        src = memoryview(obj.data)
        memlimit = self.limits.max_decoder_memory
        # Only a weak sign said "lzma": decode first and keep the result only if it worked.
        sink = self.sink()
        try:
            used = _decode(
                src,
                lambda: _BufferingDecoder(
                    lzma.LZMADecompressor(lzma.FORMAT_ALONE, memlimit=memlimit)
                ),
                sink,
            )
        except _Corrupt:
            self.expanded -= sink.size
            return
        covered.add(0, used)
        self.count_entry()
        self.member(obj, _stripped_name(obj, (".lzma", ".tlz")), lambda s: _copy(sink, s))

    # -- zip

    def _zip(self, obj: ScanObject, certain: bool, covered: locate.Spans) -> None:
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
        while (pos := locate.rfind_uncovered(data, _ZIP_END, end, covered)) >= 0:
            end = pos
            self.count_signature()
            directory = locate.zip_end_record(data, pos)
            if directory is not None and self._zip_directory(obj, directory, covered, seen):
                directories += 1
        if certain and not directories:
            # Starts like a zip, yet no directory reads: extractors will disagree about it.
            log.info("%s: zip without a readable central directory", obj.path)
            self.anomaly(ANOMALY_CORRUPT)
        self._zip_local_entries(obj, certain, covered)

    def _zip_directory(
        self,
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
        if entries > self.limits.max_members - self.entries:
            raise _LimitExceeded("members")
        self.entries += entries
        src = memoryview(data)
        try:
            # Up to the end record: zipfile finds it last, as if nothing came after it.
            archive = zipfile.ZipFile(locate.Window(src, 0, directory.end))
            infos = archive.infolist()
        except NotImplementedError as exc:  # e.g. "zip file version 7.1" (newer than zipfile)
            log.info("%s: unsupported zip: %s", obj.path, exc)
            self.anomaly(ANOMALY_UNSUPPORTED)
            covered.add(directory.start, directory.end)
            return True
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
            log.debug("%s: end record at %d is no zip: %s", obj.path, directory.end, exc)
            return False
        covered.add(directory.start, directory.end)
        self._zip_check_layout(obj, infos)
        for info in infos:
            self.check_time()  # (counted above)
            key = (info.header_offset, info.compress_type, info.compress_size, info.filename)
            if key in seen:  # the same entry listed by another directory: read once
                continue
            seen.add(key)
            if info.is_dir():
                continue
            try:
                start, local_name, local_flags, local_size = _zip_local_header(src, info)
            except _Corrupt as exc:
                log.info("%s!%s: %s", obj.path, info.filename, exc)
                self.anomaly(ANOMALY_ENCRYPTED if info.flag_bits & 0x41 else ANOMALY_CORRUPT)
                continue
            # The entry is read here: the local-header walk need not read it again. Its data
            # counts as read only as far as it was decoded (below): a stated size that reaches
            # further must not hide what lies behind the real end of the data.
            covered.add(info.header_offset, start)
            if info.flag_bits & 0x41:  # traditional or strong encryption
                self.anomaly(ANOMALY_ENCRYPTED)
                continue
            if local_name not in (None, info.filename):
                # Clients that read local headers see another name than those that read the
                # central directory: scan under both.
                self.anomaly(ANOMALY_CORRUPT)
            if not local_flags & 0x08 and local_size not in (info.compress_size, 0xFFFFFFFF):
                # A streaming reader would take another length for this member's data.
                log.info("%s!%s: local and central sizes differ", obj.path, info.filename)
                self.anomaly(ANOMALY_CORRUPT)
            raw = src[start : start + info.compress_size]
            used = self._zip_member(obj, info, raw, local_name)
            covered.add(start, start + used)
            if used and used != info.compress_size:
                # Readers disagree: Java's ZipInputStream refuses the entry, zipfile and unzip
                # stop at the stream's end, a reader that trusts the size skips further.
                log.info("%s!%s: data ends before its stated size", obj.path, info.filename)
                self.anomaly(ANOMALY_CORRUPT)
        return True

    def _zip_member(
        self, obj: ScanObject, info: zipfile.ZipInfo, raw: memoryview, local_name: str | None
    ) -> int:
        """Read one member a directory lists; return how much of its data was decoded."""
        max_dict = self.limits.max_decoder_memory
        used: list[int] = []

        def produce(sink: _Sink) -> None:
            if len(raw) < info.compress_size:
                raise _Corrupt("member data runs past the end of the archive")
            used.append(_zip_data(raw, info.compress_type, max_dict, sink))
            if sink.size != info.file_size or sink.crc != info.CRC:
                raise _Corrupt(
                    f"size {sink.size} / crc {sink.crc:08x} differ from the header's "
                    f"{info.file_size} / {info.CRC:08x}"
                )

        names = frozenset(n for n in (info.filename, local_name) if n)
        self.member(obj, info.filename, produce, names)
        return used[0] if used else 0

    def _zip_local_entries(self, obj: ScanObject, certain: bool, covered: locate.Spans) -> None:
        """Local headers outside what the directories covered, walked from the front.

        A header where one must be (at the start of a zip, or right after an entry read here)
        is the archive's: what fails in it is corrupt. Anywhere else it is a weak sign, taken
        only if its entry reads through and checks out; otherwise the walk looks further.
        """
        data = obj.data
        descriptors = locate.ForwardIndex(data, locate.ZIP_DESCRIPTOR)
        pos = 0
        expected = 0 if certain else -1
        while (pos := locate.find_uncovered(data, _ZIP_LOCAL, pos, covered)) >= 0:
            self.count_signature()
            descriptors.forget_before(pos)
            trusted = pos == expected
            entry = locate.zip_local_entry(data, pos)
            end = None
            if entry is not None:
                end = self._zip_local_member(obj, entry, trusted, descriptors)
            elif trusted:
                self.anomaly(ANOMALY_CORRUPT)
            if end is None:
                pos += len(_ZIP_LOCAL)
                continue
            covered.add(pos, end)
            pos = expected = end

    def _zip_local_member(
        self,
        obj: ScanObject,
        entry: locate.LocalEntry,
        trusted: bool,
        descriptors: locate.ForwardIndex,
    ) -> int | None:
        """Read one entry from its local header; where it ends, or None if it did not read."""
        data = obj.data
        known_end = None if entry.sizes_follow else entry.data_end
        if entry.name.endswith("/") and known_end == entry.data_start:
            self.count_entry()  # a directory
            return known_end
        if entry.encrypted or entry.method not in locate.ZIP_DECODED_METHODS:
            # Unreadable here; with a stated extent that fits, it is an entry all the same.
            anomaly = ANOMALY_ENCRYPTED if entry.encrypted else ANOMALY_UNSUPPORTED
            if known_end is None or known_end > len(data):
                if trusted:
                    self.anomaly(anomaly)
                return None
            self.count_entry()
            log.info("%s!%s: %s (local header)", obj.path, entry.name, anomaly)
            self.anomaly(anomaly)
            return known_end
        max_dict = self.limits.max_decoder_memory
        ends: list[int] = []  # where the entry's data ended, once known (checked or not)

        def produce(sink: _Sink) -> None:
            _zip_local_data(data, entry, max_dict, sink, descriptors, self, ends)

        if trusted:
            self.count_entry()
            self.member(obj, entry.name, produce)  # a failed check is corrupt: kept, flagged
        else:
            trial = self.sink()
            try:
                produce(trial)
            except (_Corrupt, _Unsupported):
                return None  # no entry after all (what it decoded stays charged: fakes cost)
            self.count_entry()
            self.member(obj, entry.name, lambda sink: _copy(trial, sink))
        if not ends:
            return None
        if known_end is not None and ends[0] != known_end:
            log.info("%s!%s: data ends before its stated size", obj.path, entry.name)
            self.anomaly(ANOMALY_CORRUPT)
        return ends[0]

    def _zip_check_layout(self, obj: ScanObject, infos: list[zipfile.ZipInfo]) -> None:
        """Overlapping entries (one compressed kernel shared by many members) are a bomb."""
        spans = sorted(
            (info.header_offset, info.header_offset + 30 + info.compress_size) for info in infos
        )
        for (_, end), (next_start, _) in zip(spans, spans[1:], strict=False):
            if next_start < end:
                log.info("%s: zip entries overlap", obj.path)
                self.anomaly(ANOMALY_CORRUPT)
                return

    # -- tar

    def _tar(self, obj: ScanObject, certain: bool, covered: locate.Spans) -> None:
        try:
            archive = tarfile.TarFile(fileobj=io.BytesIO(obj.data), ignore_zeros=True)
        except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
            if certain:
                log.info("%s: corrupt tar: %s", obj.path, exc)
                self.anomaly(ANOMALY_CORRUPT)
            return
        with archive:
            while True:
                try:
                    info = archive.next()
                except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
                    log.info("%s: corrupt tar: %s", obj.path, exc)
                    self.anomaly(ANOMALY_CORRUPT)
                    return
                if info is None:
                    return
                self.count_entry()
                # A member's bytes are its own (an archive stored in it is expanded there).
                covered.add(info.offset, info.offset_data + (info.size if info.isreg() else 0))
                if info.isreg():
                    self._tar_member(obj, archive, info)

    def _tar_member(self, obj: ScanObject, archive: tarfile.TarFile, info: tarfile.TarInfo) -> None:
        # A sparse member stores only its data blocks; the holes read back as zeros, so a
        # "10 GB" sparse file of a few bytes is a bomb like any other: its ratio counts.
        sparse = getattr(info, "sparse", None)
        stored = sum(size for _, size in sparse) if sparse else info.size

        def produce(sink: _Sink) -> None:
            sink.consumed = stored
            try:
                member = archive.extractfile(info)
                if member is None:
                    return
                while chunk := member.read(_OUT_CHUNK):
                    sink.write(chunk)
            except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
                raise _Corrupt(str(exc)) from exc
            if sink.size != info.size:
                raise _Corrupt(f"member is {sink.size} bytes, its header says {info.size}")

        self.member(obj, info.name, produce)

    # -- 7z

    def _sevenzip(
        self, obj: ScanObject, certain: bool, covered: locate.Spans, start: int = 0
    ) -> None:
        """The 7z archive whose signature header is at ``start`` (0, or behind a stub)."""
        end = locate.sevenzip_extent(obj.data, start)
        if end is not None:
            covered.add(start, end)
        factory = _SevenZipSinks(self)
        window = locate.Window(memoryview(obj.data), start, len(obj.data))
        try:
            with py7zr.SevenZipFile(window, mode="r") as archive:  # type: ignore[arg-type]
                if archive.needs_password():
                    self.anomaly(ANOMALY_ENCRYPTED)
                    return
                for _ in archive.list():
                    self.count_entry()
                archive.extractall(factory=factory)
        except py7zr.exceptions.PasswordRequired:
            self.anomaly(ANOMALY_ENCRYPTED)
            return
        except _LimitExceeded:
            for name, sink in factory.sinks:
                if sink.size:
                    self.add(obj, name, sink, frozenset({name}))
            raise
        except py7zr.exceptions.UnsupportedCompressionMethodError as exc:
            log.info("%s: unsupported 7z method: %s", obj.path, exc)
            self.anomaly(ANOMALY_UNSUPPORTED)
        except Exception as exc:  # py7zr raises many kinds on hostile input; all mean corrupt
            log.info("%s: corrupt 7z: %s", obj.path, exc)
            self.anomaly(ANOMALY_CORRUPT)
        # Empty members too: their names alone may be banned.
        added = [self.add(obj, name, sink, frozenset({name})) for name, sink in factory.sinks]
        for member in added:
            self.expand(member)

    def _sevenzip_embedded(self, obj: ScanObject, covered: locate.Spans) -> None:
        """Every 7z behind other bytes (a self-extractor, an image with an archive appended),
        as 7-Zip opens them; its signature header's CRC tells a real one from chance bytes."""
        data = obj.data
        pos = 0
        while (pos := locate.find_uncovered(data, _SEVENZIP, pos, covered)) >= 0:
            self.count_signature()
            end = locate.sevenzip_extent(data, pos)
            if end is None:
                pos += 1
                continue
            self._sevenzip(obj, True, covered, pos)
            pos = end


def _copy(src: _Sink, dst: _Sink) -> None:
    dst.consumed = src.consumed
    dst._buf, dst.size, dst.crc = src._buf, src.size, src.crc


class _SevenZipSinks(py7zr.io.WriterFactory):
    """A py7zr WriterFactory whose writers are sinks."""

    def __init__(self, expander: _Expander):
        self.expander = expander
        self.sinks: list[tuple[str, _Sink]] = []

    def create(self, filename: str) -> _SevenZipWriter:
        sink = self.expander.sink()
        # Solid 7z archives do not say how much input each file used: judge by the archive.
        sink.consumed = self.expander.source_size
        self.sinks.append((filename, sink))
        return _SevenZipWriter(sink)


class _SevenZipWriter(py7zr.io.Py7zIO):
    """Where py7zr writes one member."""

    def __init__(self, sink: _Sink):
        self.sink = sink

    def write(self, s: bytes | bytearray) -> int:
        self.sink.write(s)
        return len(s)

    def read(self, size: int | None = None) -> bytes:
        return b""

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def flush(self) -> None:
        """Nothing is buffered here: every write went to the sink already."""

    def size(self) -> int:
        return self.sink.size

    def close(self) -> None:
        """The sink outlives this file: closing it is the expander's business."""


# py7zr sizes each decoding step by its get_memory_limit(): up to 128 MB of output in one call.
# Steps of 1 MiB let the sinks stop a bomb early; py7zr has no other knob for it.
py7zr.py7zr.get_memory_limit = lambda: _OUT_CHUNK


# -- format details ----------------------------------------------------------------------------


def _zip_local_header(src: memoryview, info: zipfile.ZipInfo) -> tuple[int, str | None, int, int]:
    """Offset of a member's data, and the name, flags and compressed size its local header
    gives."""
    offset = info.header_offset
    header = bytes(src[offset : offset + 30])
    if len(header) < 30 or header[:4] != _ZIP_LOCAL:
        raise _Corrupt("bad local header")
    (flags,) = struct.unpack_from("<H", header, 6)
    (compressed_size,) = struct.unpack_from("<I", header, 18)
    name_len, extra_len = struct.unpack_from("<HH", header, 26)
    raw_name = bytes(src[offset + 30 : offset + 30 + name_len])
    encoding = "utf-8" if flags & 0x800 else "cp437"
    name = raw_name.decode(encoding, errors="replace") if raw_name else None
    return offset + 30 + name_len + extra_len, name, flags, compressed_size


def _zip_data(raw: memoryview, method: int, max_dict: int, sink: _Sink) -> int:
    """Decode one zip member's data into ``sink``; return the input bytes it used."""
    if method == zipfile.ZIP_STORED:
        for pos in range(0, len(raw), _OUT_CHUNK):
            sink.consumed += min(_OUT_CHUNK, len(raw) - pos)
            sink.write(raw[pos : pos + _OUT_CHUNK])
        return len(raw)
    if method == zipfile.ZIP_DEFLATED:
        return _decode(raw, lambda: _ZlibDecoder(-15), sink)
    if method == zipfile.ZIP_BZIP2:
        return _decode(raw, lambda: _BufferingDecoder(bz2.BZ2Decompressor()), sink)
    if method == zipfile.ZIP_LZMA:
        decoder, offset = _zip_lzma_decoder(raw, max_dict)
        sink.consumed += offset
        return offset + _decode(raw[offset:], lambda: decoder, sink)
    raise _Unsupported(f"zip compression method {method}")


def _zip_local_data(
    data: bytes,
    entry: locate.LocalEntry,
    max_dict: int,
    sink: _Sink,
    descriptors: locate.ForwardIndex,
    expander: _Expander,
    ends: list[int],
) -> None:
    """Decode one entry's data as its local header (or data descriptor) describes it; put
    where the entry ends in ``ends`` (before its checks: a failed check still read it)."""
    src = memoryview(data)
    start = entry.data_start
    if not entry.sizes_follow:
        raw = src[start : entry.data_end]
        if len(raw) < entry.compressed_size:
            raise _Corrupt("member data runs past the end of the object")
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
                raise _Corrupt("stored data without a data descriptor")
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
            raise _Corrupt("no data descriptor after the data")
        crc, size, end = descriptor
    ends.append(end)
    if sink.size != size or sink.crc != crc:
        raise _Corrupt(
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


def _zip_lzma_decoder(raw: memoryview, max_dict: int) -> tuple[_Decoder, int]:
    """A decoder for a zip LZMA member (APPNOTE 5.8.8: version, properties, raw LZMA1)."""
    if len(raw) < 9:
        raise _Corrupt("short zip LZMA header")
    (props_size,) = struct.unpack_from("<H", raw, 2)
    props = bytes(raw[4 : 4 + props_size])
    if props_size != 5 or len(props) != 5 or props[0] >= 9 * 5 * 5:
        raise _Corrupt("bad zip LZMA properties")
    (dict_size,) = struct.unpack_from("<I", props, 1)
    if dict_size > max_dict:  # FORMAT_RAW takes no memlimit: check the dictionary by hand
        raise _LimitExceeded("memory")
    pb, rest = divmod(props[0], 45)
    lp, lc = divmod(rest, 9)
    lzma_filter = {"id": lzma.FILTER_LZMA1, "dict_size": dict_size, "lc": lc, "lp": lp, "pb": pb}
    try:
        decoder = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[lzma_filter])
    except (lzma.LZMAError, ValueError) as exc:
        raise _Corrupt(f"bad zip LZMA properties: {exc}") from exc
    return _BufferingDecoder(decoder), 4 + props_size


def _gzip_name(data: bytes) -> str | None:
    """The original file name a gzip header records (FNAME), if any."""
    if len(data) < 10 or not data[3] & 0x08:
        return None
    pos = 10
    if data[3] & 0x04:  # FEXTRA
        if len(data) < 12:
            return None
        pos = 12 + int.from_bytes(data[10:12], "little")
    end = data.find(b"\0", pos, pos + 1024)
    if end <= pos:
        return None
    return data[pos:end].decode("latin-1")


def _stripped_name(obj: ScanObject, suffixes: tuple[str, ...]) -> str:
    """The name the content of a compressed object had: ``a.tgz`` → ``a.tar``, else "data"."""
    for name in sorted(obj.filenames):
        base = name.rsplit("/", 1)[-1]
        lower = base.lower()
        for suffix in suffixes:
            if lower.endswith(suffix) and len(base) > len(suffix):
                stem = base[: -len(suffix)]
                return stem + ".tar" if suffix.startswith(".t") else stem
    return "data"
