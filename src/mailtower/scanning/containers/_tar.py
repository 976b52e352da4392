"""tar (ustar, GNU, pax, V7), read from the start only, as ``tar`` reads it; a sparse
member's holes count towards its ratio."""

from __future__ import annotations

import io
import tarfile

from mailtower.scanning.containers import _locate as locate
from mailtower.scanning.containers._core import (
    ANOMALY_CORRUPT,
    OUT_CHUNK,
    Corrupt,
    Expansion,
    Sink,
    log,
)
from mailtower.scanning.objects import ScanObject


def read(ex: Expansion, obj: ScanObject, certain: bool, covered: locate.Spans) -> None:
    try:
        archive = tarfile.TarFile(fileobj=io.BytesIO(obj.data), ignore_zeros=True)
    except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
        if certain:
            log.info("%s: corrupt tar: %s", obj.path, exc)
            ex.anomaly(ANOMALY_CORRUPT)
        return
    with archive:
        while True:
            try:
                info = archive.next()
            except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
                log.info("%s: corrupt tar: %s", obj.path, exc)
                ex.anomaly(ANOMALY_CORRUPT)
                return
            if info is None:
                return
            ex.count_entry()
            # A member's bytes are its own (an archive stored in it is expanded there).
            covered.add(info.offset, info.offset_data + (info.size if info.isreg() else 0))
            if info.isreg():
                _tar_member(ex, obj, archive, info)


def _tar_member(
    ex: Expansion, obj: ScanObject, archive: tarfile.TarFile, info: tarfile.TarInfo
) -> None:
    # A sparse member stores only its data blocks; the holes read back as zeros, so a
    # "10 GB" sparse file of a few bytes is a bomb like any other: its ratio counts.
    sparse = getattr(info, "sparse", None)
    stored = sum(size for _, size in sparse) if sparse else info.size

    def produce(sink: Sink) -> None:
        sink.consumed = stored
        try:
            member = archive.extractfile(info)
            if member is None:
                return
            while chunk := member.read(OUT_CHUNK):
                sink.write(chunk)
        except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
            raise Corrupt(str(exc)) from exc
        if sink.size != info.size:
            raise Corrupt(f"member is {sink.size} bytes, its header says {info.size}")

    ex.member(obj, info.name, produce)
