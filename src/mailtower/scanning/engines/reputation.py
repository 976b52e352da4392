"""The reputation engine: exact SHA-256 hits and TLSH nearest neighbours among known families.

Data lives in directories of list files (the shipped ``mailtower/scanning/rules/reputation/``
plus any a tower updates), one entry per line, ``#`` comments and blank lines ignored:

* ``*.sha256`` — ``<sha256 hex> <name>``: a known file; any object with that hash is a hit;
* ``*.tlsh``   — ``<tlsh hash> <family name>``: a known family member; an object whose TLSH
  is within ``tlsh_threshold`` of one (the nearest wins) is a hit for that family.

TLSH needs at least 50 bytes with enough variety; smaller or uniform objects get no fuzzy hash
and are checked by SHA-256 only. ``reload()`` parses everything first and swaps atomically.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import tlsh

from mailtower.scanning.engines import Finding
from mailtower.scanning.errors import EngineTimeout, ReputationDataError
from mailtower.scanning.mime import MESSAGE_PATH
from mailtower.scanning.objects import ScanObject
from mailtower.scanning.rules import REPUTATION_DIR

log = logging.getLogger(__name__)

DEFAULT_TLSH_THRESHOLD = 70  # TLSH authors: < ~100 "likely related"; 70 keeps false hits rare
TLSH_MIN_BYTES = 50
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TLSH = re.compile(r"(T1)?[0-9A-F]{70}")


@dataclass(frozen=True)
class ReputationHit:
    """One reputation match: ``kind`` is "sha256" (distance 0) or "tlsh"."""

    kind: str
    name: str
    distance: int = 0


@dataclass(frozen=True)
class ReputationData:
    """One loaded generation of the lists."""

    sha256: dict[str, str]  # hex digest → name
    tlsh: tuple[tuple[str, str], ...]  # (T1… hash, family name)
    files: tuple[Path, ...]


def default_data_dirs() -> tuple[Path, ...]:
    """The project's own lists (package data)."""
    return (REPUTATION_DIR,)


def load(dirs: Sequence[Path]) -> ReputationData:
    """Parse every list under ``dirs``; raise ReputationDataError naming file and line."""
    sha256: dict[str, str] = {}
    families: list[tuple[str, str]] = []
    files: list[Path] = []
    for directory in dirs:
        if not directory.is_dir():
            raise ReputationDataError(f"reputation directory {directory} does not exist")
        for path in sorted(directory.rglob("*")):
            if path.suffix not in (".sha256", ".tlsh") or not path.is_file():
                continue
            files.append(path)
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                entry = _parse_line(path, number, line)
                if entry is None:
                    continue
                digest, name = entry
                if path.suffix == ".sha256":
                    sha256[digest] = name
                else:
                    families.append((digest, name))
    return ReputationData(sha256=sha256, tlsh=tuple(families), files=tuple(files))


def _parse_line(path: Path, number: int, line: str) -> tuple[str, str] | None:
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    parts = text.split(maxsplit=1)
    if len(parts) != 2:
        raise ReputationDataError(f"{path}:{number}: expected '<hash> <name>', got {line!r}")
    digest, name = parts[0], parts[1].strip()
    if path.suffix == ".sha256":
        digest = digest.lower()
        if not _SHA256.fullmatch(digest):
            raise ReputationDataError(f"{path}:{number}: not a SHA-256 hex digest: {parts[0]!r}")
    else:
        digest = digest.upper()
        if not _TLSH.fullmatch(digest):
            raise ReputationDataError(f"{path}:{number}: not a TLSH hash: {parts[0]!r}")
        if not digest.startswith("T1"):
            digest = "T1" + digest
    return digest, name


def fuzzy_hash(data: bytes) -> str | None:
    """The TLSH of ``data``, or None when it is too small or too uniform to have one."""
    if len(data) < TLSH_MIN_BYTES:
        return None
    digest = tlsh.hash(data)
    return digest if digest.startswith("T1") else None


class ReputationEngine:
    """Looks objects up in the SHA-256 list and among the TLSH families."""

    name = "reputation"

    def __init__(
        self,
        data_dirs: Sequence[Path | str] | None = None,
        *,
        tlsh_threshold: int = DEFAULT_TLSH_THRESHOLD,
        timeout_s: float = 10.0,
    ):
        dirs = default_data_dirs() if data_dirs is None else data_dirs
        self.data_dirs = tuple(Path(d) for d in dirs)
        self.tlsh_threshold = tlsh_threshold
        self.timeout_s = timeout_s
        self._reload_lock = threading.Lock()
        self._data = load(self.data_dirs)

    @property
    def data(self) -> ReputationData:
        return self._data

    def reload(self) -> ReputationData:
        """Parse the lists again and swap them in; on error keep the current ones."""
        with self._reload_lock:
            new = load(self.data_dirs)
            self._data = new
        log.info("reputation: %d hashes, %d family hashes", len(new.sha256), len(new.tlsh))
        return new

    def lookup(self, data: bytes, *, lists: ReputationData | None = None) -> list[ReputationHit]:
        """The exact hit (if any) and the nearest family within the threshold (if any)."""
        lists = self._data if lists is None else lists
        return self._lookup(data, hashlib.sha256(data).hexdigest(), lists)

    def _lookup(
        self, data: bytes, sha256: str, lists: ReputationData, *, fuzzy: bool = True
    ) -> list[ReputationHit]:
        hits: list[ReputationHit] = []
        name = lists.sha256.get(sha256)
        if name is not None:
            hits.append(ReputationHit("sha256", name))
        if lists.tlsh and fuzzy:
            digest = fuzzy_hash(data)
            if digest is not None:
                nearest = min(
                    ((tlsh.diff(digest, known), family) for known, family in lists.tlsh),
                    key=lambda pair: pair[0],
                )
                if nearest[0] <= self.tlsh_threshold:
                    hits.append(ReputationHit("tlsh", nearest[1], nearest[0]))
        return hits

    def scan(self, data: bytes) -> list[Finding]:
        return [Finding(self.name, hit.name) for hit in self.lookup(data)]

    def scan_objects(self, objects: Iterable[ScanObject]) -> list[Finding]:
        """Look up each object (one deadline for all); each finding names the object's path.

        The whole message is looked up by SHA-256 only: families are of files, and a message
        is never one (its parts are looked up each). Its TLSH cost as much as all its parts'.
        """
        lists = self._data
        deadline = time.monotonic() + self.timeout_s
        cache: dict[tuple[str, bool], list[ReputationHit]] = {}  # same bytes, many paths
        findings: list[Finding] = []
        for obj in objects:
            if time.monotonic() > deadline:
                raise EngineTimeout(f"reputation: not finished within {self.timeout_s}s")
            digest = hashlib.sha256(obj.data).hexdigest()
            fuzzy = obj.path != MESSAGE_PATH
            key = (digest, fuzzy)
            if key not in cache:
                cache[key] = self._lookup(obj.data, digest, lists, fuzzy=fuzzy)
            for hit in cache[key]:
                if hit.kind == "tlsh":
                    log.debug("%s: TLSH %d from %s", obj.path, hit.distance, hit.name)
                findings.append(Finding(self.name, hit.name, part=obj.path))
        return findings

    def health(self, timeout_s: float) -> str:
        lists = self._data
        return f"reputation ({len(lists.sha256)} hashes, {len(lists.tlsh)} family hashes)"
