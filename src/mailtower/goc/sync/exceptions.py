"""The errors of the GOC sync: one root, one subclass per failure.

Every message names the server (a redacted conninfo or the tower) and what to do.
"""

from __future__ import annotations

from mailtower.errors import MailtowerError


class SyncError(MailtowerError):
    """A sync object could not be created, checked or re-pointed."""


class NotPrimary(SyncError):
    """The server is a standby (in recovery): sync objects live on primaries only."""


class WalLevelNotLogical(SyncError):
    """``wal_level`` is not ``logical``: the server cannot publish (set it, then restart)."""


class SchemaMissing(SyncError):
    """A table, publication or trigger the sync needs is absent: run the ensure step first."""


class RepointNeeded(SyncError):
    """A subscription follows a server that is no longer the tower's primary: re-point it."""


class SlotBusy(SyncError):
    """A replication slot stayed in use after its walsender was terminated."""


class SyncTimeout(SyncError):
    """A subscription did not reach the awaited state before the deadline."""
