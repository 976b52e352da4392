"""The root of every mailtower error: ``except MailtowerError`` catches what mailtower raises.

Each package keeps its own errors in one module (``scanning.errors``, ``scand.errors``,
``monitor.errors``, ``goc.sync.exceptions``, ``controller.dns.exceptions``, …), each under a
package root that derives from this class.
"""

from __future__ import annotations


class MailtowerError(Exception):
    """Something mailtower refuses or cannot do, with a message naming the cause and the fix."""


class SettingsError(MailtowerError):
    """A tower's settings are invalid; the message names the field and the fix."""
