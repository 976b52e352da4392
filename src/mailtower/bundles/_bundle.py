"""Build and sign a bundle from a rules directory; read one back, refusing any that is not
authentic, intact and newer; unpack one."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mailtower._fsio import fsync_dir
from mailtower.bundles._check import check_rules, make_sections
from mailtower.bundles._errors import (
    BundleError,
    ForeignKeyBundle,
    MalformedBundle,
    StaleBundle,
    TamperedBundle,
    UnsignedBundle,
)
from mailtower.bundles._format import (
    MANIFEST_NAME,
    SECTIONS,
    SIGNATURE_NAME,
    FileEntry,
    Manifest,
    claimed_key_id,
    read_tar,
    rule_file_name,
    sha256,
    utc_timestamp,
    write_tar,
)
from mailtower.bundles._keys import key_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bundle:
    """A bundle that passed the checks it was read with; ``files`` by bundle name."""

    manifest: Manifest
    manifest_bytes: bytes
    signature: bytes
    files: dict[str, bytes] = field(repr=False)

    @property
    def version(self) -> int:
        return self.manifest.version


@dataclass(frozen=True)
class Built:
    """What ``build`` wrote, and what it left out of the bundle."""

    manifest: Manifest
    skipped: list[str]  # files in section directories that are not rule files


def collect(rules_dir: Path) -> tuple[dict[str, bytes], list[str]]:
    """The rule files of ``rules_dir`` by bundle name, and the section entries left out.

    Only the section directories are read (yara/, skeptic/, reputation/, clamav/), one level
    deep, as the loaders read them; anything else at the top (a README, scripts) is ignored.
    """
    if not rules_dir.is_dir():
        raise BundleError(f"{rules_dir}: no such rules directory")
    files: dict[str, bytes] = {}
    skipped: list[str] = []
    for section in SECTIONS:
        directory = rules_dir / section
        if not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            name = f"{section}/{path.name}"
            if path.is_file() and rule_file_name(name):
                try:
                    files[name] = path.read_bytes()
                except OSError as exc:
                    raise BundleError(f"{path}: cannot read: {exc.strerror or exc}") from exc
            else:
                skipped.append(name)
    return files, skipped


def build(
    rules_dir: Path,
    signing_key: Ed25519PrivateKey,
    version: int,
    out: Path,
    *,
    created: datetime | None = None,
) -> Built:
    """Check the rules in ``rules_dir`` load, then write them to ``out`` as signed bundle
    ``version``. Raises InvalidRules (nothing is written) or BundleError."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise BundleError(f"version must be a positive integer, not {version!r}")
    files, skipped = collect(rules_dir)
    manifest = Manifest(
        version=version,
        created=utc_timestamp(created or datetime.now(UTC)),
        key_id=key_id(signing_key.public_key()),
        files={name: FileEntry(sha256(data), len(data)) for name, data in files.items()},
    )
    manifest_bytes = manifest.to_bytes()
    bundle = Bundle(manifest, manifest_bytes, signing_key.sign(manifest_bytes), files)
    # The same check a tower makes: a bundle every tower would refuse is never published.
    with tempfile.TemporaryDirectory(prefix="mailtower-bundle-") as tmp:
        unpack(bundle, Path(tmp, "rules"), durable=False)
        check_rules(Path(tmp, "rules"))
    members = [(MANIFEST_NAME, manifest_bytes), (SIGNATURE_NAME, bundle.signature)]
    try:
        write_tar(out, members + sorted(files.items()))
    except OSError as exc:
        raise BundleError(f"{out}: cannot write the bundle: {exc.strerror or exc}") from exc
    return Built(manifest, skipped)


def read(path: Path, public_key: Ed25519PublicKey, *, current: int | None = None) -> Bundle:
    """The bundle at ``path`` if it is signed by ``public_key``, intact, and (with
    ``current``) newer than ``current``. Its rules are not checked here (see ``verify``)."""
    members = read_tar(path)
    manifest_bytes = members.pop(MANIFEST_NAME, None)
    if manifest_bytes is None:
        raise MalformedBundle(f"{path}: no {MANIFEST_NAME}; not a mailtower bundle")
    signature = members.pop(SIGNATURE_NAME, b"")
    if not signature:
        raise UnsignedBundle(f"{path}: not signed (no {SIGNATURE_NAME}); refused")
    ours = key_id(public_key)
    try:
        public_key.verify(signature, manifest_bytes)
    except InvalidSignature:
        claimed = claimed_key_id(manifest_bytes)
        if claimed is not None and claimed != ours:
            raise ForeignKeyBundle(
                f"{path}: signed by key {claimed}, not by the key this tower trusts ({ours})"
            ) from None
        raise TamperedBundle(
            f"{path}: {MANIFEST_NAME} does not match its signature by key {ours}: "
            "changed after signing"
        ) from None
    manifest = Manifest.parse(manifest_bytes)
    if manifest.key_id != ours:
        raise MalformedBundle(f"{path}: manifest names key {manifest.key_id}, signed by {ours}")
    extra = sorted(set(members) - set(manifest.files))
    if extra:
        raise TamperedBundle(f"{path}: holds files the manifest does not list: {', '.join(extra)}")
    missing = sorted(set(manifest.files) - set(members))
    if missing:
        raise TamperedBundle(f"{path}: lacks files the manifest lists: {', '.join(missing)}")
    for name, entry in sorted(manifest.files.items()):
        data = members[name]
        if len(data) != entry.size or sha256(data) != entry.sha256:
            raise TamperedBundle(
                f"{path}: {name}: content does not match the manifest's SHA-256; changed after "
                "signing"
            )
    if current is not None and manifest.version <= current:
        raise StaleBundle(
            f"{path}: bundle version {manifest.version} is not newer than version {current} "
            "in use; refused as a rollback or replay"
        )
    return Bundle(manifest, manifest_bytes, signature, members)


def verify(path: Path, public_key: Ed25519PublicKey, *, current: int | None = None) -> Bundle:
    """``read``, then load its rules as scand would (InvalidRules if they do not load)."""
    bundle = read(path, public_key, current=current)
    with tempfile.TemporaryDirectory(prefix="mailtower-bundle-") as tmp:
        unpack(bundle, Path(tmp, "rules"), durable=False)
        check_rules(Path(tmp, "rules"))
    return bundle


def unpack(bundle: Bundle, directory: Path, *, durable: bool = True) -> None:
    """Write the bundle into the new directory ``directory``: every section (empty if the
    bundle has none), the rule files, manifest.json and manifest.sig; fsync'd if ``durable``."""
    directory.mkdir(mode=0o755)
    make_sections(directory)
    # Names were checked against the format (rule_file_name) when the manifest was parsed or
    # the files collected: each is <section>/<plain file name>, inside ``directory``.
    entries = [(MANIFEST_NAME, bundle.manifest_bytes), (SIGNATURE_NAME, bundle.signature)]
    for name, data in [*entries, *sorted(bundle.files.items())]:
        target = directory / name
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), 0o644)
            out.write(data)
            if durable:
                out.flush()
                os.fsync(out.fileno())
    if durable:
        for section in SECTIONS:
            fsync_dir(directory / section)
        fsync_dir(directory)
