"""Streamed decompression in bounded chunks (zip members, gzip, bzip2, xz, lzma).

Input goes in ``IN_CHUNK`` bytes at a time and each call may produce at most ``OUT_CHUNK``
bytes, every one charged to the sink before it is kept: a bomb stops at the first limit it
crosses. Decoder errors become :class:`Corrupt` (or ``ContainerLimitExceeded("memory")`` when an
LZMA header asks for more memory than allowed).
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from mailtower.scanning.containers._core import (
    IN_CHUNK,
    OUT_CHUNK,
    ContainerLimitExceeded,
    Corrupt,
    Sink,
)


class Decoder(Protocol):
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


class ZlibDecoder(_WrappedDecoder):
    """zlib/deflate/gzip with bounded output per step (leftover input waits in the tail)."""

    def __init__(self, wbits: int):
        self._d = zlib.decompressobj(wbits)

    def feed(self, data: bytes | memoryview) -> Iterator[bytes]:
        out = self._d.decompress(data, OUT_CHUNK)
        yield out
        # A full output buffer may leave output pending inside zlib even with no input left.
        while not self._d.eof and (self._d.unconsumed_tail or len(out) == OUT_CHUNK):
            out = self._d.decompress(self._d.unconsumed_tail, OUT_CHUNK)
            yield out


class BufferingDecoder(_WrappedDecoder):
    """bz2/lzma decoders: they keep leftover input themselves and say when they need more."""

    def __init__(self, decoder: bz2.BZ2Decompressor | lzma.LZMADecompressor):
        self._d = decoder

    def feed(self, data: bytes | memoryview) -> Iterator[bytes]:
        yield self._d.decompress(data, OUT_CHUNK)
        while not self._d.eof and not self._d.needs_input:
            yield self._d.decompress(b"", OUT_CHUNK)


_DECODE_ERRORS = (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError)


def decode(src: memoryview, new_decoder: Callable[[], Decoder], sink: Sink) -> int:
    """Stream ``src`` through one decoder into ``sink``; return the input bytes it used."""
    decoder = new_decoder()
    pos = 0
    try:
        while pos < len(src) and not decoder.eof:
            chunk = src[pos : pos + IN_CHUNK]
            pos += len(chunk)
            sink.consumed += len(chunk)
            for out in decoder.feed(chunk):
                sink.write(out)
    except lzma.LZMAError as exc:
        if "memory" in str(exc).lower():
            raise ContainerLimitExceeded("memory") from exc
        raise Corrupt(f"{exc}") from exc
    except _DECODE_ERRORS as exc:
        raise Corrupt(f"{exc}") from exc
    if not decoder.eof:
        raise Corrupt("truncated stream")
    return pos - len(decoder.unused_data)


def decode_streams(
    src: memoryview, new_decoder: Callable[[], Decoder], magic: bytes, sink: Sink
) -> int:
    """Decode concatenated streams (gzip members, xz/bzip2 streams) as one output, like gunzip;
    return where the last stream ended."""
    pos = 0
    while True:
        pos += decode(src[pos:], new_decoder, sink)
        # xz allows NUL stream padding between streams; anything else after the last stream
        # is trailing garbage, which the raw object's own scan still sees.
        while pos < len(src) and src[pos] == 0:
            pos += 1
        if bytes(src[pos : pos + len(magic)]) != magic:
            return pos
