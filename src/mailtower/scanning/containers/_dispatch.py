"""Which format an object is (by its magic bytes) and which reader reads it; the recursion.

Every reader has one signature, ``(expansion, obj, certain, covered)``, and imports only the
core (``_core``, ``_decode``, ``_locate``): a format added is a module and a line in
``READERS``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from mailtower.scanning.containers import _compressed, _sevenzip, _tar, _zip
from mailtower.scanning.containers import _locate as locate
from mailtower.scanning.containers._core import (
    ANOMALY_CORRUPT,
    ANOMALY_LIMIT,
    ANOMALY_WALL_TIMEOUT,
    ContainerLimitExceeded,
    Expansion,
    MiB,
    WallTimeout,
    log,
)
from mailtower.scanning.objects import ScanObject

# -- detection ---------------------------------------------------------------------------------


def detect(data: bytes) -> tuple[str | None, bool]:
    """(format, certain): ``certain`` is False when only a weak sign matched.

    A weak sign (a zip or 7z record anywhere, a plausible V7 tar header or raw LZMA header)
    that then fails to parse means "not a container", not "corrupt container": plenty of
    ordinary files contain such bytes by chance.
    """
    kind, certain = detect_head(data)
    # An archive behind something else, wherever an extractor finds one: a self-extractor's
    # stub, a polyglot image, data appended after it. Every zip that has anything to extract
    # has a local header: its end record alone is not looked for (one search fewer).
    if kind is None and locate.ZIP_LOCAL in data:
        return "zip", False
    if kind is None and locate.SEVENZIP in data:
        return "7z", False
    return kind, certain


def detect_head(data: bytes) -> tuple[str | None, bool]:
    """The format the object's first bytes declare (archives found further in: detect)."""
    head = data[:512]
    if head.startswith((locate.ZIP_LOCAL, locate.ZIP_END)):
        return "zip", True
    if head.startswith(locate.SEVENZIP):
        return "7z", True
    if head.startswith(_compressed.GZIP):
        return "gzip", True
    if head.startswith(_compressed.XZ):
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


# -- the readers and the recursion -------------------------------------------------------------

Reader = Callable[[Expansion, ScanObject, bool, locate.Spans], None]

# The reader of each format detect_head names.
READERS: dict[str, Reader] = {
    "zip": _zip.read,
    "tar": _tar.read,
    "7z": _sevenzip.read,
    "gzip": _compressed.read_gzip,
    "bzip2": _compressed.read_bzip2,
    "xz": _compressed.read_xz,
    "lzma": _compressed.read_lzma_alone,
}


class Expander(Expansion):
    def run(self) -> tuple[list[ScanObject], list[str]]:
        try:
            self.expand(self.obj)
        except WallTimeout:
            log.warning("%s: container expansion outran its wall-clock backstop", self.obj.path)
            self.anomaly(ANOMALY_WALL_TIMEOUT)
        except ContainerLimitExceeded as exc:
            log.info("%s: container limit exceeded: %s", self.obj.path, exc.which)
            self.anomaly(f"{ANOMALY_LIMIT}:{exc.which}")
        except Exception:
            # A parser met input it was not written for (hostile archives find such paths):
            # what it could not read is not clean.
            log.warning("%s: container expansion failed", self.obj.path, exc_info=True)
            self.anomaly(ANOMALY_CORRUPT)
        return self.members, self.anomalies

    def expand(self, obj: ScanObject) -> None:
        """Every reading of ``obj``: the format its first bytes declare, then every zip or 7z
        further in that some extractor would open (each byte range read once)."""
        if detect(obj.data)[0] is None:
            return
        if obj.depth >= self.limits.max_depth:
            raise ContainerLimitExceeded("depth")
        self.check_time()
        covered = locate.Spans()
        kind, certain = detect_head(obj.data)
        if kind is not None:
            READERS[kind](self, obj, certain, covered)
        if kind != "zip":  # the zip reader reads every zip in the object itself
            _zip.read(self, obj, False, covered)
        _sevenzip.read_embedded(self, obj, covered)
