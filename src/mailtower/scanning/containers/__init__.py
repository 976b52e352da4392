"""Container expansion: the members of zip, tar, gzip, bzip2, xz/lzma and 7z objects, with limits.

Formats are recognised by their content (magic bytes), never by a declared name or type. An
object is read every way an extractor reads it (the union principle): as the format its first
bytes declare, and as every zip or 7z further in that some extractor opens — a zip end record
anywhere (``zipfile`` looks 64 KiB back, Info-ZIP's ``unzip`` further: the union is the whole
object), its directory with anything before it (a self-extractor's stub) or after it, local
headers no directory lists (streaming readers walk them), a 7z signature header at any offset
(7-Zip opens self-extractors). Byte ranges one
reading accounted for are not searched again (see ``_locate``). Every decompression is
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

Informational (recorded, never suspicious): ``container.names-differ`` — a zip member's local
header and directory entry name it differently, and the names' extensions agree or are all
harmless (both names are scanned and checked; see :mod:`mailtower.scanning.risk`). Names that
disagree about a risky extension (``a.pdf`` / ``a.exe``) are ``container.corrupt``.

Usage::

    detect(data)                                  # "zip", "tar", "gzip", … or None
    members, anomalies = expand(obj, ContainerLimits(max_depth=4))

The package, one module per format behind a small core (the formats import only the core,
never each other; an import contract keeps it so):

* ``_core`` — the limits, the anomalies, the expansion's budget (the bomb guards every format
  shares) and the sinks members are produced into;
* ``_decode`` — streamed decompression in bounded chunks (zip members and the compressors);
* ``_locate`` — finding zip and 7z records at any offset, without copying;
* ``_zip``, ``_sevenzip``, ``_tar``, ``_compressed`` (gzip, bzip2, xz, lzma) — the readers;
* ``_dispatch`` — detection by magic bytes, the reader of each format, the recursion.
"""

from __future__ import annotations

from mailtower.scanning.containers._core import (
    ANOMALY_CORRUPT,
    ANOMALY_ENCRYPTED,
    ANOMALY_LIMIT,
    ANOMALY_NAMES_DIFFER,
    ANOMALY_UNSUPPORTED,
    ANOMALY_WALL_TIMEOUT,
    INFORMATIONAL_ANOMALIES,
    ContainerLimits,
)
from mailtower.scanning.containers._dispatch import Expander
from mailtower.scanning.containers._dispatch import detect as _detect
from mailtower.scanning.objects import ScanObject

__all__ = [
    "ANOMALY_CORRUPT",
    "ANOMALY_ENCRYPTED",
    "ANOMALY_LIMIT",
    "ANOMALY_NAMES_DIFFER",
    "ANOMALY_UNSUPPORTED",
    "ANOMALY_WALL_TIMEOUT",
    "INFORMATIONAL_ANOMALIES",
    "ContainerLimits",
    "detect",
    "expand",
]


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
    return Expander(obj, limits or ContainerLimits()).run()
