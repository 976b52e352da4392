"""Errors of customers' policies and of the snapshot scand applies them from."""

from __future__ import annotations

from mailtower.errors import MailtowerError


class CustomersError(MailtowerError):
    """The root of this package's errors."""


class PolicyError(CustomersError, ValueError):
    """A policy that cannot be applied; the message names each bad field."""


class SnapshotError(CustomersError, ValueError):
    """A snapshot file that cannot be read; the message names the file and the fix."""
