"""Why a ClamAV database was refused, or a mirror operation failed."""

from __future__ import annotations

from mailtower.errors import MailtowerError


class DatabaseError(MailtowerError):
    """A database file was refused (bad signature, broken chain, wrong hash) or a mirror step
    failed; the message names the file or URL, what failed and what to do."""
