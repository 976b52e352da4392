"""The relay is not an open relay: foreign domains and the classic routing tricks are refused."""

from __future__ import annotations

import smtplib

import pytest

TRICKS = [
    "victim@foreign.example",  # plain relaying
    "victim%foreign.example@{domain}",  # %-hack
    '"victim@foreign.example"@{domain}',  # quoted local part
    "@{domain}:victim@foreign.example",  # source route
    "victim@foreign.example@{domain}",  # double @
    "foreign.example!victim@{domain}",  # bang path
    "victim@foreign.example.",  # trailing dot
    "victim@[10.201.0.9]",  # address literal
]


@pytest.mark.parametrize("rcpt", TRICKS)
def test_relaying_refused(mail, tower, rcpt):
    rcpt = rcpt.format(domain=mail.customer.domain)
    with smtplib.SMTP(
        str(tower.settings.hosts.relay), tower.settings.ports.smtp, timeout=30
    ) as smtp:
        smtp.ehlo("verify.internet.lab")
        smtp.mail("sender@internet.lab")
        code, reply = smtp.rcpt(f"<{rcpt}>" if not rcpt.startswith("<") else rcpt)
    assert 500 <= code < 600, f"RCPT TO:<{rcpt}> answered {code} {reply!r}"


def test_customer_domain_accepted(mail, tower):
    with smtplib.SMTP(
        str(tower.settings.hosts.relay), tower.settings.ports.smtp, timeout=30
    ) as smtp:
        smtp.ehlo("verify.internet.lab")
        smtp.mail("sender@internet.lab")
        code, _ = smtp.rcpt(mail.rcpt())
    assert code == 250
