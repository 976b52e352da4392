"""The controller's errors: the lab, its prerequisites, publishing, SQL failover."""

from __future__ import annotations

from mailtower.errors import MailtowerError


class ControllerError(MailtowerError):
    """What the controller cannot do, naming the host, the step and the fix."""


class LabError(ControllerError):
    """A lab step failed; the message names the host, the step and what to do."""

    def __init__(self, host: str, step: str, fix: str, detail: str = "") -> None:
        self.host, self.step, self.fix = host, step, fix
        text = f"lab host {host}: {step} failed"
        if detail:
            text += f": {detail.strip()[-800:]}"
        super().__init__(f"{text}\n  fix: {fix}")


class PrerequisiteError(ControllerError):
    """The controller lacks programs the lab or the tests call; the message names each."""


class PublishError(ControllerError):
    """Publishing at the GOC failed: the message names the host, the step and the fix."""


class StepFailed(ControllerError):
    """A command on the GOC exited non-zero (or could not be run); ``output`` says why."""

    def __init__(self, returncode: int, output: str) -> None:
        super().__init__(output)
        self.returncode = returncode
        self.output = output


class PairError(ControllerError):
    """The command cannot go on; the message names the host, the step and the fix."""


class CertificateError(ControllerError):
    """A TLS certificate chain or key the deploy must refuse; the message lists every reason."""


class InitError(ControllerError):
    """``mailtower init`` refuses: bad answers (each field named) or files it will not
    overwrite (each named); nothing was written."""


class PreflightError(ControllerError):
    """The preflight cannot run at all (an inventory it cannot read); failed checks are
    reported, not raised."""
