"""The monitor's errors, all under :class:`MonitorError`."""

from __future__ import annotations

from mailtower.errors import MailtowerError


class MonitorError(MailtowerError):
    """Something the monitor could not do; the message names the host and the step."""


class HAProxyError(MonitorError):
    """The runtime API could not be reached or refused a command."""


class RelayQueueError(MonitorError):
    """The relay exporter's metrics could not be read or lack the queue counts."""


class RolloutError(MonitorError):
    """One scanner's update failed; the message names the scanner and the step."""


class CanaryFailed(RolloutError):
    """A canary came back with the wrong verdict, or scanned with another version: the rules
    are wrong (not a scanner that could not answer, which is a plain RolloutError)."""
