"""Sign-in links mailed to users: plain text, built with the email package, submitted by SMTP
to the first of the configured relays that takes it (in the lab: the towers' relays, port 25,
so the mail is scanned and routed as any customer mail)."""

from __future__ import annotations

import logging
import smtplib
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import make_msgid

log = logging.getLogger("mailtower.goc.portal")


@dataclass(frozen=True)
class RelayAddress:
    host: str
    port: int = 25

    @classmethod
    def parse(cls, text: str) -> RelayAddress:
        host, sep, port = text.rpartition(":")
        if not sep:
            return cls(text)
        return cls(host.strip("[]"), int(port))


def link_message(sender: str, address: str, url: str, minutes: int) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = address
    msg["Subject"] = "Your sign-in link to the quarantine"
    msg["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or None)
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(
        "Someone (we hope you) asked to see the quarantined mail addressed to\n"
        f"{address}.\n\n"
        f"Open this link within {minutes} minutes to sign in; it works once:\n\n"
        f"{url}\n\n"
        "If you did not ask for it, ignore this message.\n"
    )
    return msg


@dataclass(frozen=True)
class SmtpMailer:
    relays: tuple[RelayAddress, ...]
    timeout_s: float = 20.0

    def __call__(self, msg: EmailMessage) -> None:
        """Submit ``msg`` to the first relay that accepts it (blocking); OSError if none did."""
        errors = []
        for relay in self.relays:
            try:
                with smtplib.SMTP(relay.host, relay.port, timeout=self.timeout_s) as smtp:
                    smtp.send_message(msg)
                return
            except (OSError, smtplib.SMTPException) as exc:
                errors.append(f"{relay.host}:{relay.port}: {exc}")
                log.warning(
                    "event=link_relay_failed relay=%s:%d error=%r", relay.host, relay.port, str(exc)
                )
        raise OSError("no relay took the sign-in link: " + "; ".join(errors or ["none configured"]))
