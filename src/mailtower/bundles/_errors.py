"""Why a bundle was refused: one root, one subclass per reason (each says what to do)."""

from __future__ import annotations

from mailtower.errors import MailtowerError


class BundleError(MailtowerError):
    """A bundle was refused, or a bundle operation failed; nothing was changed."""

    code = "error"  # a stable word for programs (mailtower bundle … --json)


class MalformedBundle(BundleError):
    """The file is not a mailtower bundle (not a gzip tar, no manifest, unknown format)."""

    code = "malformed"


class UnsafeBundle(BundleError):
    """The tar holds something no bundle may: a link, a path outside it, an absurd size."""

    code = "unsafe"


class UnsignedBundle(BundleError):
    """The bundle has no signature (manifest.sig missing or empty)."""

    code = "unsigned"


class ForeignKeyBundle(BundleError):
    """The bundle is signed, but not by the key this tower trusts."""

    code = "foreign-key"


class TamperedBundle(BundleError):
    """The manifest or a file changed after signing (hash mismatch, extra or missing file)."""

    code = "tampered"


class StaleBundle(BundleError):
    """The bundle is not newer than the version in use: a rollback or a replay."""

    code = "not-newer"


class InvalidRules(BundleError):
    """The bundle is authentic and intact, but its rules do not load (compile, parse, syntax)."""

    code = "invalid-rules"


class KeyFileError(BundleError):
    """A key file is missing, unreadable or not an Ed25519 key of the expected kind."""

    code = "key-file"


class InstallError(BundleError):
    """The rules root cannot be changed (no previous version, a broken layout, I/O error)."""

    code = "install"
