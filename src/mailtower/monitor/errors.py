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


class RestartDeferred(RolloutError):
    """scand would not restart now (a deploy is writing what is installed, or it restarted a
    moment ago): the scanner goes back in service and a later round tries it again."""


class QuarantineManagerError(MonitorError):
    """The quarantine manager could not do one thing; the message names the host and step."""


class ReleaseDeferred(QuarantineManagerError):
    """The relay could not take a released message now (unreachable, 4xx): tried again."""


class ReleaseRefused(QuarantineManagerError):
    """The relay refused a released message for good (5xx, or an address it cannot take)."""


class ReleaseInDoubt(QuarantineManagerError):
    """The connection ended after the message's last byte and before the relay's answer: the
    relay may have taken it, so it is never sent again on its own."""


class QuarantineGocDown(QuarantineManagerError):
    """The GOC could not be read or written (its requests wait there until it answers)."""


class UpgradeCheckFailed(RolloutError):
    """A scanner restarted with the newly installed code failed a check (``check``: health or
    canary); it stays out of service and the rolling upgrade stops."""

    def __init__(self, check: str, reason: str) -> None:
        super().__init__(f"{check} check failed: {reason}")
        self.check = check
        self.reason = reason
