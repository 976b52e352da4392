"""Hand a message back to the relay's re-injection listener with its original envelope.

Used by scand for clean mail and by ``mailtower quarantine release``.
"""

from __future__ import annotations

import smtplib
from collections.abc import Sequence

from mailtower.settings import TowerSettings


class ReinjectError(Exception):
    """The relay did not take the message back."""


def relay_address(settings: TowerSettings) -> str:
    """``host:port`` of the relay's re-injection listener."""
    return f"{settings.hosts.relay}:{settings.ports.reinject}"


def reinject(
    settings: TowerSettings,
    raw: bytes,
    mail_from: str,
    rcpt_tos: list[str],
    mail_options: Sequence[str] = (),
    *,
    header: bytes,
    local_hostname: str | None = None,
) -> str:
    """Send ``header + raw`` to the relay with the same envelope; return the relay's answer.

    ``header`` is one or more complete header lines ending in CRLF. Raise ReinjectError when
    the relay refuses the sender, any recipient or the data, or cannot be reached.
    """
    try:
        with smtplib.SMTP(
            str(settings.hosts.relay),
            settings.ports.reinject,
            local_hostname=local_hostname,
            timeout=settings.limits.reinject_timeout_s,
        ) as smtp:
            smtp.ehlo()
            # Keep the body type and SMTPUTF8 of the original transaction.
            options = [
                opt
                for opt in mail_options
                if (opt.startswith("BODY=") and smtp.has_extn("8bitmime"))
                or (opt == "SMTPUTF8" and smtp.has_extn("smtputf8"))
            ]
            code, text = smtp.mail(mail_from, options)
            if code != 250:
                raise ReinjectError(f"MAIL FROM answered {code} {text!r}")
            for rcpt in rcpt_tos:
                code, text = smtp.rcpt(rcpt)
                # Any refused recipient fails the whole message: the relay retries it
                # (a duplicate for the others is tolerated; a loss is not).
                if code not in (250, 251):
                    raise ReinjectError(f"RCPT TO:<{rcpt}> answered {code} {text!r}")
            code, text = smtp.data(header + raw)
            if code != 250:
                raise ReinjectError(f"DATA answered {code} {text!r}")
            return text.decode("utf-8", errors="replace")
    except (smtplib.SMTPException, OSError) as exc:
        raise ReinjectError(f"{relay_address(settings)}: {exc}") from exc
