"""VirusEye's errors: sign-in and its secrets."""

from __future__ import annotations

from mailtower.errors import MailtowerError


class EyeError(MailtowerError):
    """What VirusEye refuses or cannot do."""


class AuthError(EyeError):
    """Root of VirusEye's authentication errors."""


class CredentialsError(AuthError):
    """The credentials file cannot be read or has a malformed line."""


class SecretError(AuthError):
    """The session secret file is missing, unreadable, too short or too open."""
