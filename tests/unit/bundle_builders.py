"""Helpers for the rule bundle tests: key pairs, a rules directory, hand-made bundles (signed
without build's checks, or repacked member by member) and snapshots of a rules root."""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mailtower import bundles
from mailtower.bundles._format import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    FileEntry,
    Manifest,
    sha256,
    write_tar,
)
from mailtower.scanning import testdata
from mailtower.scanning.rules import RuleDirs

# Harmless text the shipped rules pass and PROBE_RULE flags as a virus.
PROBE = "MAILTOWER-BUNDLE-PROBE-2f9c41"
PROBE_RULE_NAME = "Mailtower_Bundle_Probe"
PROBE_RULE = f"""
rule {PROBE_RULE_NAME}
{{
    meta:
        description = "a rule only a newer bundle has"
        severity = "virus"
    strings:
        $probe = "{PROBE}"
    condition:
        $probe
}}
"""


@dataclass(frozen=True)
class Keys:
    private: Ed25519PrivateKey
    public: Ed25519PublicKey
    private_path: Path
    public_path: Path


def make_keys(directory: Path) -> Keys:
    private_path, public_path = bundles.keygen(directory)
    return Keys(
        bundles.load_signing_key(private_path),
        bundles.load_public_key(public_path),
        private_path,
        public_path,
    )


def rules_copy(directory: Path) -> Path:
    """A complete rules directory: the shipped rules plus the lab's ClamAV test signatures."""
    shipped = RuleDirs.packaged()
    for section, source in (
        ("yara", shipped.yara),
        ("skeptic", shipped.skeptic),
        ("reputation", shipped.reputation),
    ):
        shutil.copytree(source, directory / section)
    (directory / "clamav").mkdir(parents=True)
    for name, content in testdata.clamav_signatures().items():
        (directory / "clamav" / name).write_text(content)
    # Canary samples: what the monitor checks a scanner with after installing the bundle.
    (directory / "canary").mkdir()
    head = b"From: av-team@goc.test\r\nTo: canary@tower.test\r\nSubject: canary\r\n\r\n"
    (directory / "canary" / "virus-eicar.eml").write_bytes(head + testdata.eicar() + b"\r\n")
    (directory / "canary" / "clean-hello.eml").write_bytes(head + b"Hello.\r\n")
    return directory


def rule_files(directory: Path) -> dict[str, bytes]:
    files, _ = bundles.collect(directory)
    return files


def signed_bundle(
    out: Path,
    key: Ed25519PrivateKey,
    files: dict[str, bytes],
    version: int = 1,
    *,
    listed: dict[str, bytes] | None = None,
) -> Path:
    """A bundle of ``files`` signed by ``key`` without build()'s rule checks; the manifest
    lists ``listed`` (default: the same files)."""
    manifest = Manifest(
        version=version,
        created="2025-01-31T12:00:00Z",
        key_id=bundles.key_id(key.public_key()),
        files={
            name: FileEntry(sha256(data), len(data)) for name, data in (listed or files).items()
        },
    )
    data = manifest.to_bytes()
    write_tar(
        out, [(MANIFEST_NAME, data), (SIGNATURE_NAME, key.sign(data)), *sorted(files.items())]
    )
    return out


Member = tuple[tarfile.TarInfo, bytes]


def members(path: Path) -> list[Member]:
    with tarfile.open(path, "r:gz") as tar:
        found = []
        for info in tar:
            handle = tar.extractfile(info)
            found.append((info, handle.read() if handle else b""))
        return found


def repack(src: Path, dst: Path, edit: Callable[[list[Member]], list[Member]]) -> Path:
    """Rewrite ``src`` as ``dst`` with ``edit`` applied to its members (any tar type)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in edit(members(src)):
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    dst.write_bytes(gzip.compress(raw.getvalue()))
    return dst


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = 0o644
    return info, data


def replace_member(name: str, data: bytes) -> Callable[[list[Member]], list[Member]]:
    def edit(found: list[Member]) -> list[Member]:
        assert any(info.name == name for info, _ in found), name
        return [(info, data if info.name == name else old) for info, old in found]

    return edit


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: file digests, link targets, directories."""
    if not root.exists():
        return {}
    seen: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            seen[name] = f"-> {path.readlink()}"
        elif path.is_dir():
            seen[name] = "dir"
        else:
            seen[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return seen
