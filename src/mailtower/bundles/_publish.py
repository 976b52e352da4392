"""A published bundle directory: what the GOC serves and each tower's monitor mirrors.

Layout::

    latest.json            {"version", "file", "sha256", "size", "published_at", "key_id"}
    rules-<N>.tar.gz       the bundles, the newest ``keep`` of them
    .publish.lock          held while the directory changes (one publish at a time)

A reader fetches ``latest.json``, then the file it names, and checks size and SHA-256 before
verifying the bundle itself. A publish verifies the bundle (signature, hashes, rules load,
newer than the version ``latest.json`` names), writes ``rules-<N>.tar.gz`` durably, and only
then replaces ``latest.json`` atomically: a reader sees the old version or the new one, and the
file ``latest.json`` names is always complete. Any refusal leaves the published files as they
were. Everything is world-readable (0644): the web server serving it runs as another user.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from mailtower._fsio import fsync_dir, write_durable
from mailtower.bundles._bundle import verify
from mailtower.bundles._errors import BundleError, InstallError, MalformedBundle, UnsafeBundle
from mailtower.bundles._format import MAX_BUNDLE_BYTES, sha256, utc_timestamp
from mailtower.bundles._install import locked
from mailtower.bundles._keys import key_id

# Where a GOC keeps its key pair and publishes (roles/goc.py makes them; the lab publishes there).
GOC_KEY_DIR = "/etc/mailtower/goc/bundles"  # signing.key (root only), signing.pub
GOC_PUBLISH_DIR = "/srv/mailtower/bundles"  # served to the towers' monitors

LATEST = "latest.json"
LOCK = ".publish.lock"
_INCOMING = ".incoming-"  # a bundle being checked; hidden, and never named by latest.json
_PUBLIC_MODE = 0o644
_BUNDLE_FILE = re.compile(r"rules-([1-9][0-9]*)\.tar\.gz")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_UTC_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def bundle_file_name(version: int) -> str:
    """The name of bundle ``version`` in a published directory."""
    return f"rules-{version}.tar.gz"


@dataclass(frozen=True)
class Latest:
    """What ``latest.json`` says: the newest published bundle and how to check its file."""

    version: int
    file: str  # always bundle_file_name(version): a plain name, never a path
    sha256: str  # of the file, hex
    size: int  # of the file, bytes
    published_at: str  # UTC, utc_timestamp()
    key_id: str  # the key the bundle is signed with (bundles.key_id)

    def to_bytes(self) -> bytes:
        doc = {
            "version": self.version,
            "file": self.file,
            "sha256": self.sha256,
            "size": self.size,
            "published_at": self.published_at,
            "key_id": self.key_id,
        }
        return (json.dumps(doc, indent=2) + "\n").encode()


@dataclass(frozen=True)
class Published:
    """What a publish did."""

    latest: Latest  # as now written to latest.json
    path: Path  # the bundle file in the directory
    removed: tuple[int, ...] = ()  # versions whose files were deleted (pruned)

    @property
    def version(self) -> int:
        return self.latest.version


def parse_latest(data: bytes) -> Latest:
    """Parse a ``latest.json`` document strictly; raise MalformedBundle naming the problem.

    Fields beyond the six are ignored, so a newer GOC may add some without breaking towers.
    """
    try:
        doc: Any = json.loads(data)
    except ValueError as exc:  # UnicodeDecodeError included
        raise MalformedBundle(f"{LATEST} is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise MalformedBundle(f"{LATEST}: top level must be an object")
    missing = sorted({"version", "file", "sha256", "size", "published_at", "key_id"} - set(doc))
    if missing:
        raise MalformedBundle(f"{LATEST}: lacks {', '.join(missing)}")
    version = doc["version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise MalformedBundle(f"{LATEST}: version must be a positive integer, not {version!r}")
    if doc["file"] != bundle_file_name(version):
        # Exactly this name: a reader joins it to a URL or a directory, so nothing else
        # (a path, '..', another version's file) may come from the document.
        raise MalformedBundle(
            f"{LATEST}: file must be {bundle_file_name(version)!r} for version {version}, "
            f"not {doc['file']!r}"
        )
    if not isinstance(doc["sha256"], str) or not _SHA256.fullmatch(doc["sha256"]):
        raise MalformedBundle(f"{LATEST}: sha256 must be 64 lower-case hex digits")
    size = doc["size"]
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_BUNDLE_BYTES:
        raise MalformedBundle(
            f"{LATEST}: size must be a whole number of bytes from 1 to {MAX_BUNDLE_BYTES}"
        )
    published_at = doc["published_at"]
    if not isinstance(published_at, str) or not _UTC_TIME.fullmatch(published_at):
        raise MalformedBundle(f"{LATEST}: published_at must be a UTC time (2025-01-31T12:00:00Z)")
    if not isinstance(doc["key_id"], str) or not _KEY_ID.fullmatch(doc["key_id"]):
        raise MalformedBundle(f"{LATEST}: key_id must be 16 hex digits")
    return Latest(version, doc["file"], doc["sha256"], size, published_at, doc["key_id"])


def read_latest(directory: Path) -> Latest | None:
    """The ``latest.json`` of ``directory``, None if nothing was published there yet."""
    path = directory / LATEST
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InstallError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        return parse_latest(data)
    except MalformedBundle as exc:
        raise MalformedBundle(f"{directory}/{exc}") from None


def publish(
    bundle_path: Path, public_key: Ed25519PublicKey, directory: Path, *, keep: int = 5
) -> Published:
    """Verify the bundle, add it to ``directory`` and make it the one ``latest.json`` names;
    keep the newest ``keep`` bundle files. A refusal (BundleError) changes no published file."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise BundleError(f"keep must be a positive number of bundles, not {keep!r}")
    data = _read_bundle(bundle_path)
    try:
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise InstallError(f"cannot create {directory}: {exc.strerror or exc}") from exc
    with locked(directory / LOCK):
        before = read_latest(directory)
        # The copy in the directory is what is checked and then renamed into place, so the
        # bytes published are the bytes verified, whatever happens to ``bundle_path``.
        incoming = directory / f"{_INCOMING}{secrets.token_hex(4)}.tar.gz"
        try:
            _write(incoming, data)
            bundle = verify(incoming, public_key, current=before.version if before else None)
            target = directory / bundle_file_name(bundle.version)
            _rename(incoming, target)
        finally:
            incoming.unlink(missing_ok=True)
        latest = Latest(
            version=bundle.version,
            file=target.name,
            sha256=sha256(data),
            size=len(data),
            published_at=utc_timestamp(datetime.now(UTC)),
            key_id=key_id(public_key),
        )
        _write(directory / LATEST, latest.to_bytes())
        removed = _prune(directory, bundle.version, keep)
    return Published(latest, target, removed)


# -- helpers -------------------------------------------------------------------------------------


def _read_bundle(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_BUNDLE_BYTES:
            raise UnsafeBundle(f"{path}: {size} bytes, over the limit of {MAX_BUNDLE_BYTES}")
        return path.read_bytes()
    except OSError as exc:
        raise MalformedBundle(f"{path}: cannot read: {exc.strerror or exc}") from exc


def _write(path: Path, data: bytes) -> None:
    try:
        write_durable(path, data, mode=_PUBLIC_MODE)
    except OSError as exc:
        raise InstallError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _rename(source: Path, target: Path) -> None:
    try:
        os.replace(source, target)  # a file left by an interrupted publish is replaced
        fsync_dir(target.parent)
    except OSError as exc:
        raise InstallError(f"cannot rename {source} to {target}: {exc.strerror or exc}") from exc


def _prune(directory: Path, published: int, keep: int) -> tuple[int, ...]:
    """Delete bundle files beyond the newest ``keep`` up to ``published``, any newer one (left
    by an interrupted publish: never named by latest.json) and leftover incoming copies."""
    versions: dict[int, Path] = {}
    for path in directory.iterdir():
        match = _BUNDLE_FILE.fullmatch(path.name)
        if match and path.is_file() and not path.is_symlink():
            versions[int(match.group(1))] = path
        elif path.name.startswith(_INCOMING):
            path.unlink(missing_ok=True)  # under the lock: no publish is using it
    kept = sorted((v for v in versions if v <= published), reverse=True)[:keep]
    removed = sorted(set(versions) - set(kept))
    for version in removed:
        versions[version].unlink(missing_ok=True)
    if removed:
        fsync_dir(directory)
    return tuple(removed)
