"""The errors of the official ClamAV databases' verification and mirror format."""

from __future__ import annotations

from mailtower.errors import MailtowerError


class DatabaseError(MailtowerError):
    """A ClamAV database file or a mirror's index is unreadable, malformed or refused."""
