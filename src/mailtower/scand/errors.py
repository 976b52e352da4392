"""The scanner daemon's errors: quarantine, re-injection, signature sync, bundle apply."""

from __future__ import annotations

from mailtower.errors import MailtowerError


class ScandError(MailtowerError):
    """What the scanner daemon cannot do."""


class QuarantineError(ScandError):
    """A quarantine entry is missing or its id is malformed."""


class ReinjectError(ScandError):
    """The relay did not take the message back."""


class ReinjectDeferred(ReinjectError):
    """The relay could not take the message now (unreachable, closed, a 4xx): retry later."""


class ReinjectRefused(ReinjectError):
    """The relay will not take this message as it is (a 5xx, an address that cannot be sent,
    a failure of ours on it): a retry would meet the same answer."""


class SignatureSyncError(ScandError):
    """The mirror could not be read or served a file that does not match its index."""


class ApplyError(ScandError):
    """The bundle could not be applied; the message says where and why."""


class ClamavApplyError(ApplyError):
    """The official ClamAV databases were not applied. ``status`` is scand's HTTP answer:
    409 refused (the live databases as they were), 502 freshclam could not stage them from the
    monitor's mirror, 500 the databases before could not be put back (look at the scanner)."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


class EnginesError(ScandError):
    """clamd or c-icap did not come back after their restart (scand.engines); the message
    names the engine and where to look."""
