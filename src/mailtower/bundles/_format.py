"""The bundle file: a deterministic gzip tar of ``manifest.json``, ``manifest.sig`` and the
rule files, and the manifest that lists them.

Members, in this order: ``manifest.json``, ``manifest.sig``, then every rule file sorted by
name, each ``<section>/<file>`` (one level, no directories). Every member is a regular file,
mode 0644, owner 0/0, mtime 0; gzip's own time stamp is 0 too, so the same rules, version,
creation time and key give the same bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import tarfile
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mailtower._fsio import write_durable
from mailtower.bundles._errors import MalformedBundle, UnsafeBundle

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"

# ClamAV databases a bundle may carry (custom and test signatures, not the official CVDs).
CLAMAV_SUFFIXES = (".ndb", ".hdb", ".hsb", ".mdb", ".msb", ".ldb", ".fp", ".sfp", ".ign2")
# Section → the file suffixes its loader reads. Exact, lower case: the loaders compare suffixes
# case-sensitively, so "X.TOML" would ride along in the bundle and never be loaded.
SECTIONS: dict[str, tuple[str, ...]] = {
    "yara": (".yar", ".yara"),
    "skeptic": (".toml", ".json"),
    "reputation": (".sha256", ".tlsh"),
    "clamav": CLAMAV_SUFFIXES,
    "canary": (".eml",),  # samples and the verdict they must get (bundles._canary)
}

# Limits well above any real rule set (the shipped one is ~100 kB), far below what would hurt
# a scanner that unpacks a hostile file.
MAX_BUNDLE_BYTES = 256 * 1024 * 1024  # the compressed file
MAX_FILE_BYTES = 64 * 1024 * 1024  # one member, uncompressed
MAX_TOTAL_BYTES = 256 * 1024 * 1024  # all members, uncompressed
MAX_MEMBERS = 4096
MAX_MANIFEST_BYTES = 4 * 1024 * 1024

_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_MEMBER_MODE = 0o644


def rule_file_name(name: str) -> bool:
    """Whether ``name`` is a rule file a bundle may hold: ``<section>/<file><suffix>``."""
    section, _, base = name.partition("/")
    suffixes = SECTIONS.get(section)
    return bool(suffixes and _FILE_NAME.fullmatch(base) and base.endswith(suffixes))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def utc_timestamp(moment: datetime) -> str:
    """``2025-01-31T12:00:00Z``: whole seconds, UTC."""
    return moment.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """What the signature covers: the version and the digest of every rule file."""

    version: int  # monotonic: a tower takes only a bundle newer than the one it runs
    created: str  # UTC, ISO 8601 (utc_timestamp)
    key_id: str  # the signer's key (keys.key_id), so a refusal can say whose it was
    files: dict[str, FileEntry]
    format: int = FORMAT_VERSION

    def to_bytes(self) -> bytes:
        """The exact bytes that are signed (sorted keys: the same manifest, the same bytes)."""
        doc = {
            "format": self.format,
            "version": self.version,
            "created": self.created,
            "key_id": self.key_id,
            "files": {
                name: {"sha256": entry.sha256, "size": entry.size}
                for name, entry in sorted(self.files.items())
            },
        }
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def parse(cls, data: bytes) -> Manifest:
        """Parse signed manifest bytes strictly; raise MalformedBundle naming the problem."""
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise MalformedBundle(f"{MANIFEST_NAME} is not JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise MalformedBundle(f"{MANIFEST_NAME}: top level must be an object")
        if doc.get("format") != FORMAT_VERSION:
            raise MalformedBundle(
                f"{MANIFEST_NAME}: bundle format {doc.get('format')!r} is not supported "
                f"(this mailtower reads format {FORMAT_VERSION}); upgrade mailtower"
            )
        expected = {"format", "version", "created", "key_id", "files"}
        if set(doc) != expected:
            raise MalformedBundle(
                f"{MANIFEST_NAME}: fields {sorted(doc)} are not the format's {sorted(expected)}"
            )
        version = doc["version"]
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise MalformedBundle(f"{MANIFEST_NAME}: version must be a positive integer")
        created = doc["created"]
        if not isinstance(created, str) or _parse_time(created) is None:
            raise MalformedBundle(f"{MANIFEST_NAME}: created must be a UTC ISO 8601 time")
        if not isinstance(doc["key_id"], str) or not _KEY_ID.fullmatch(doc["key_id"]):
            raise MalformedBundle(f"{MANIFEST_NAME}: key_id must be 16 hex digits")
        if not isinstance(doc["files"], dict):
            raise MalformedBundle(f"{MANIFEST_NAME}: files must be an object")
        files: dict[str, FileEntry] = {}
        for name, entry in doc["files"].items():
            files[name] = _file_entry(name, entry)
        return cls(version, created, doc["key_id"], files, FORMAT_VERSION)


def _parse_time(text: str) -> datetime | None:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def _file_entry(name: str, entry: Any) -> FileEntry:
    if not rule_file_name(name):
        raise MalformedBundle(
            f"{MANIFEST_NAME} lists {name!r}, which is not a rule file a bundle may hold "
            f"(<section>/<file>, sections {', '.join(SECTIONS)})"
        )
    if (
        not isinstance(entry, dict)
        or set(entry) != {"sha256", "size"}
        or not isinstance(entry["sha256"], str)
        or not _SHA256.fullmatch(entry["sha256"])
        or isinstance(entry["size"], bool)
        or not isinstance(entry["size"], int)
        or entry["size"] < 0
    ):
        raise MalformedBundle(f"{MANIFEST_NAME}: {name}: entry must be {{sha256, size}}")
    return FileEntry(entry["sha256"], entry["size"])


def claimed_key_id(data: bytes) -> str | None:
    """The key_id unverified manifest bytes claim, if they can be read at all (for messages)."""
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    value = doc.get("key_id") if isinstance(doc, dict) else None
    return value if isinstance(value, str) and _KEY_ID.fullmatch(value) else None


# -- the tar -------------------------------------------------------------------------------------


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """Write ``members`` (in the order given) as a deterministic gzip tar, atomically."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = _MEMBER_MODE
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(data))
    packed = io.BytesIO()
    # filename="" and mtime=0: gzip would otherwise record the output name and the time.
    with gzip.GzipFile(filename="", mode="wb", fileobj=packed, compresslevel=9, mtime=0) as gz:
        gz.write(raw.getvalue())
    write_durable(path, packed.getvalue())
    path.chmod(0o644)  # published: the monitors and scanners read it


def read_tar(path: Path) -> dict[str, bytes]:
    """Every member of the bundle at ``path`` by name, refusing anything unsafe before reading
    its data: links and other non-files, unsafe names, duplicates, absurd sizes or counts."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise MalformedBundle(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if size > MAX_BUNDLE_BYTES:
        raise UnsafeBundle(f"{path}: {size} bytes, over the limit of {MAX_BUNDLE_BYTES}")
    members: dict[str, bytes] = {}
    total = 0
    try:
        with tarfile.open(path, mode="r:gz") as tar:
            # Iterating reads one header at a time: each is checked before its data is read,
            # so a member claiming terabytes is refused without decompressing it.
            for member in tar:
                _check_member(member, members)
                total += member.size
                if total > MAX_TOTAL_BYTES:
                    raise UnsafeBundle(
                        f"members add up to more than {MAX_TOTAL_BYTES} bytes uncompressed"
                    )
                handle = tar.extractfile(member)
                if handle is None:  # pragma: no cover - regular files always have data
                    raise MalformedBundle(f"{member.name}: no data")
                members[member.name] = handle.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise MalformedBundle(f"{path}: not a mailtower bundle (a gzip tar): {exc}") from exc
    return members


def _check_member(member: tarfile.TarInfo, seen: dict[str, bytes]) -> None:
    name = member.name
    if len(seen) >= MAX_MEMBERS:
        raise UnsafeBundle(f"more than {MAX_MEMBERS} members")
    parts = name.split("/")
    if (
        name.startswith("/")
        or "\\" in name
        or "\x00" in name
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise UnsafeBundle(f"member {name!r}: path outside the bundle (absolute or '..')")
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        kind = (
            "a symbolic link"
            if member.issym()
            else "a hard link"
            if member.islnk()
            else "a directory"
            if member.isdir()
            else f"tar type {member.type!r}"
        )
        raise UnsafeBundle(f"member {name!r} is {kind}; a bundle holds regular files only")
    if name in seen:
        raise UnsafeBundle(f"member {name!r} appears twice")
    limit = MAX_MANIFEST_BYTES if name in (MANIFEST_NAME, SIGNATURE_NAME) else MAX_FILE_BYTES
    if member.size > limit:
        raise UnsafeBundle(f"member {name!r}: {member.size} bytes, over the limit of {limit}")
