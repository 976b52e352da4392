"""Errors of the GOC's own commands (``mailtower customer``); the sync's are in
``goc.sync.exceptions``, VirusEye's in ``goc.eye.errors``."""

from __future__ import annotations

from mailtower.errors import MailtowerError


class CustomerCommandError(MailtowerError):
    """The root of ``mailtower customer``'s errors."""


class InputError(CustomerCommandError):
    """Bad input: exit 2, nothing written."""


class Refused(CustomerCommandError):
    """Valid input the GOC's data refuses (no such customer, a domain taken): exit 1."""
