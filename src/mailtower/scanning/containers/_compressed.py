"""Single-stream compressors: gzip, bzip2, xz and raw LZMA (.lzma), read from the start only,
as their tools read them; concatenated streams are one output, as ``gunzip`` makes them."""

from __future__ import annotations

import bz2
import lzma
from collections.abc import Callable

from mailtower.scanning.containers import _locate as locate
from mailtower.scanning.containers._core import Corrupt, Expansion, copy
from mailtower.scanning.containers._decode import (
    BufferingDecoder,
    Decoder,
    ZlibDecoder,
    decode,
    decode_streams,
)
from mailtower.scanning.objects import ScanObject

XZ = b"\xfd7zXZ\x00"
GZIP = b"\x1f\x8b\x08"


def _streams(
    ex: Expansion,
    obj: ScanObject,
    name: str,
    new_decoder: Callable[[], Decoder],
    magic: bytes,
    covered: locate.Spans,
) -> None:
    """One compressed object's content; its compressed bytes are not searched again (what
    they hold verbatim, a stored block's, is in the content, which is)."""
    src = memoryview(obj.data)
    used: list[int] = []
    ex.count_entry()
    ex.member(obj, name, lambda sink: used.append(decode_streams(src, new_decoder, magic, sink)))
    if used:
        covered.add(0, used[0])


def read_gzip(ex: Expansion, obj: ScanObject, certain: bool, covered: locate.Spans) -> None:
    name = _gzip_name(obj.data) or _stripped_name(obj, (".gz", ".tgz", ".z"))
    _streams(ex, obj, name, lambda: ZlibDecoder(31), GZIP, covered)


def read_bzip2(ex: Expansion, obj: ScanObject, certain: bool, covered: locate.Spans) -> None:
    name = _stripped_name(obj, (".bz2", ".tbz", ".tbz2"))
    _streams(ex, obj, name, lambda: BufferingDecoder(bz2.BZ2Decompressor()), b"BZh", covered)


def read_xz(ex: Expansion, obj: ScanObject, certain: bool, covered: locate.Spans) -> None:
    memlimit = ex.limits.max_decoder_memory

    def new() -> Decoder:
        return BufferingDecoder(lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=memlimit))

    _streams(ex, obj, _stripped_name(obj, (".xz", ".txz")), new, XZ, covered)


def read_lzma_alone(ex: Expansion, obj: ScanObject, certain: bool, covered: locate.Spans) -> None:
    src = memoryview(obj.data)
    memlimit = ex.limits.max_decoder_memory
    # Only a weak sign said "lzma": decode first and keep the result only if it worked.
    sink = ex.sink()
    try:
        used = decode(
            src,
            lambda: BufferingDecoder(lzma.LZMADecompressor(lzma.FORMAT_ALONE, memlimit=memlimit)),
            sink,
        )
    except Corrupt:
        ex.expanded -= sink.size
        return
    covered.add(0, used)
    ex.count_entry()
    ex.member(obj, _stripped_name(obj, (".lzma", ".tlz")), lambda s: copy(sink, s))


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
