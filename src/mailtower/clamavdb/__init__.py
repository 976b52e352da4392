"""The official ClamAV databases: their headers and the versions a directory holds.

(Scanner side's minimal part of issue 16's ``mailtower.clamavdb``; the GOC's and the monitor's
verification and mirror format join it here.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mailtower.clamavdb.errors import DatabaseError

__all__ = ["CvdHeader", "DatabaseError", "live_versions", "read_header"]

HEADER_BYTES = 512
_MAGIC = "ClamAV-VDB:"


@dataclass(frozen=True)
class CvdHeader:
    version: int
    built: str
    sigs: int
    flevel: int


def read_header(path: Path) -> CvdHeader:
    """The header of a .cvd or .cld: "ClamAV-VDB:build time:version:sigs:flevel:…" in its
    first 512 bytes (e.g. "ClamAV-VDB:22 Jun 2021 21-34 -0400:6:14:81:…")."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(HEADER_BYTES)
    except OSError as exc:
        raise DatabaseError(f"{path}: cannot read its header: {exc}") from exc
    text = raw.decode("latin-1").rstrip("\0 ")
    if not text.startswith(_MAGIC) or len(raw) < HEADER_BYTES:
        raise DatabaseError(f"{path}: not a ClamAV database (no ClamAV-VDB header)")
    fields = text.split(":")
    try:
        return CvdHeader(
            version=int(fields[2]), built=fields[1], sigs=int(fields[3]), flevel=int(fields[4])
        )
    except (IndexError, ValueError) as exc:
        raise DatabaseError(f"{path}: malformed ClamAV-VDB header {text[:80]!r}") from exc


def live_versions(directory: Path) -> dict[str, int]:
    """{db: version} of the <db>.cvd / <db>.cld files in ``directory`` (a .cld wins over a
    .cvd: freshclam keeps a database it updated by CDIFFs as .cld). A file whose header
    cannot be read raises DatabaseError."""
    found: dict[str, int] = {}
    for suffix in (".cvd", ".cld"):  # .cld last: it wins
        for path in sorted(directory.glob(f"*{suffix}")):
            if path.name.startswith("."):
                continue
            found[path.stem] = read_header(path).version
    return found
