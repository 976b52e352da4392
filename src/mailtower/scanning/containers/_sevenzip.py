"""7z through py7zr, at the start of an object or behind other bytes (a self-extractor, an
image with an archive appended), as 7-Zip opens them; py7zr writes each member into a sink.

Importing this module caps py7zr's decoding step at ``OUT_CHUNK`` (see the end of it).
"""

from __future__ import annotations

import py7zr
import py7zr.exceptions
import py7zr.io
import py7zr.py7zr

from mailtower.scanning.containers import _locate as locate
from mailtower.scanning.containers._core import (
    ANOMALY_CORRUPT,
    ANOMALY_ENCRYPTED,
    ANOMALY_UNSUPPORTED,
    OUT_CHUNK,
    ContainerLimitExceeded,
    Expansion,
    Sink,
    log,
)
from mailtower.scanning.objects import ScanObject


def read(
    ex: Expansion, obj: ScanObject, certain: bool, covered: locate.Spans, start: int = 0
) -> None:
    """The 7z archive whose signature header is at ``start`` (0, or behind a stub)."""
    end = locate.sevenzip_extent(obj.data, start)
    if end is not None:
        covered.add(start, end)
    factory = _SevenZipSinks(ex)
    window = locate.ByteWindow(memoryview(obj.data), start, len(obj.data))
    try:
        with py7zr.SevenZipFile(window, mode="r") as archive:  # type: ignore[arg-type]
            if archive.needs_password():
                ex.anomaly(ANOMALY_ENCRYPTED)
                return
            for _ in archive.list():
                ex.count_entry()
            archive.extractall(factory=factory)
    except py7zr.exceptions.PasswordRequired:
        ex.anomaly(ANOMALY_ENCRYPTED)
        return
    except ContainerLimitExceeded:
        for name, sink in factory.sinks:
            if sink.size:
                ex.add(obj, name, sink, frozenset({name}))
        raise
    except py7zr.exceptions.UnsupportedCompressionMethodError as exc:
        log.info("%s: unsupported 7z method: %s", obj.path, exc)
        ex.anomaly(ANOMALY_UNSUPPORTED)
    except Exception as exc:  # py7zr raises many kinds on hostile input; all mean corrupt
        log.info("%s: corrupt 7z: %s", obj.path, exc)
        ex.anomaly(ANOMALY_CORRUPT)
    # Empty members too: their names alone may be banned.
    added = [ex.add(obj, name, sink, frozenset({name})) for name, sink in factory.sinks]
    for member in added:
        ex.expand(member)


def read_embedded(ex: Expansion, obj: ScanObject, covered: locate.Spans) -> None:
    """Every 7z behind other bytes (a self-extractor, an image with an archive appended),
    as 7-Zip opens them; its signature header's CRC tells a real one from chance bytes."""
    data = obj.data
    pos = 0
    while (pos := locate.find_uncovered(data, locate.SEVENZIP, pos, covered)) >= 0:
        ex.count_signature()
        end = locate.sevenzip_extent(data, pos)
        if end is None:
            pos += 1
            continue
        read(ex, obj, True, covered, pos)
        pos = end


class _SevenZipSinks(py7zr.io.WriterFactory):
    """A py7zr WriterFactory whose writers are sinks."""

    def __init__(self, expander: Expansion):
        self.expander = expander
        self.sinks: list[tuple[str, Sink]] = []

    def create(self, filename: str) -> _SevenZipWriter:
        sink = self.expander.sink()
        # Solid 7z archives do not say how much input each file used: judge by the archive.
        sink.consumed = self.expander.source_size
        self.sinks.append((filename, sink))
        return _SevenZipWriter(sink)


class _SevenZipWriter(py7zr.io.Py7zIO):
    """Where py7zr writes one member."""

    def __init__(self, sink: Sink):
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
py7zr.py7zr.get_memory_limit = lambda: OUT_CHUNK
