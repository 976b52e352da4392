"""Ed25519 key pairs: the GOC signs with ``signing.key``; towers hold only ``signing.pub``."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mailtower.bundles._errors import KeyFileError

PRIVATE_NAME = "signing.key"
PUBLIC_NAME = "signing.pub"


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short name of a public key (SHA-256 of its raw bytes, 16 hex digits)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def keygen(out: Path) -> tuple[Path, Path]:
    """Write a new pair into ``out``: signing.key (0600, PKCS#8 PEM) and signing.pub (PEM).

    Refuses to overwrite either file: replacing the signing key by mistake would make every
    tower refuse the next bundle.
    """
    private_path, public_path = out / PRIVATE_NAME, out / PUBLIC_NAME
    for path in (private_path, public_path):
        if path.exists():
            raise KeyFileError(f"{path} already exists; not overwriting a key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        out.mkdir(parents=True, exist_ok=True)
        # Created 0600 from the start (O_EXCL): the key is never readable by others.
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # whatever the umask
            f.write(private_pem)
        public_path.write_bytes(public_pem)
        public_path.chmod(0o644)
    except OSError as exc:
        raise KeyFileError(f"cannot write a key pair into {out}: {exc}") from exc
    return private_path, public_path


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read key: {exc.strerror or exc}") from exc


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """The private key in ``path`` (as keygen writes it)."""
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 key ({type(key).__name__})")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The public key in ``path`` (as keygen writes it)."""
    return public_key_from_pem(_read(path), shown_as=str(path))


def public_key_from_pem(pem: bytes | str, *, shown_as: str = "public key") -> Ed25519PublicKey:
    """The Ed25519 public key in PEM text (a signing.pub's content, e.g. from the settings)."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{shown_as}: not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{shown_as}: not an Ed25519 public key ({type(key).__name__})")
    return key
