"""The scanning library's errors: engines, rules, containers."""

from __future__ import annotations

from mailtower.errors import MailtowerError


class ScanningError(MailtowerError):
    """What the scanning library cannot do: an engine, its rules or its data."""


class EngineError(ScanningError):
    """An engine could not give a full answer; the message must not pass (fail closed)."""


class EngineProtocolError(EngineError):
    """The engine answered something this client does not understand."""


class EngineScanError(EngineError):
    """The engine reported an error scanning this message (e.g. a size limit)."""


class YaraRuleError(EngineError):
    """A rule set could not be loaded: a file does not compile, or there are no rules."""


class ReputationDataError(EngineError):
    """A reputation list could not be loaded (a malformed line, a missing directory)."""


class RuleError(ScanningError):
    """The rule data is unusable (syntax, unknown kind, bad parameter); nothing was loaded."""


class EngineUnavailable(EngineError):
    """The engine cannot be reached (daemon down, socket missing, connection refused)."""


class EngineTimeout(EngineError):
    """The engine did not answer within its timeout."""
