"""Real mail through the tower: clean mail arrives intact, a virus is quarantined and recorded."""

from __future__ import annotations

import email
import email.policy
import hashlib
import smtplib
import ssl

from rawsmtp import RawSmtp
from towerlib import wait_for

from mailtower.scanning import testdata


def test_clean_mail_reaches_the_customer_intact(mail, tower):
    token = mail.token()
    body = "Quarterly report attached.\n" + "Lorem ipsum dolor sit amet. " * 200 + f"\n{token}\n"
    sent = mail.message(
        token, body=body, attachment=("report.pdf", b"%PDF-1.4\n" + token.encode() * 100)
    )
    mail.send(sent)
    wait_for(lambda: mail.delivered()[token] >= 1, 60, f"clean message {token} at the customer")
    got = email.message_from_bytes(mail.fetch(token), policy=email.policy.default)
    for sent_part, got_part in zip(sent.walk(), got.walk(), strict=True):
        if not sent_part.is_multipart():
            assert (
                hashlib.sha256(got_part.get_payload(decode=True)).hexdigest()
                == hashlib.sha256(sent_part.get_payload(decode=True)).hexdigest()
            )
    verdict = got["X-Mailtower-Verdict"]
    assert verdict and verdict.startswith("clean") and f"tower={tower.settings.name}" in verdict
    row = wait_for(
        lambda: tower.psql(
            f"SELECT verdict FROM verdict_events WHERE message_id = '{sent['Message-ID']}'"
        ),
        30,
        "the clean verdict event in SQL",
    )
    assert row == "clean"


def test_eicar_is_quarantined_recorded_and_not_delivered(mail, tower):
    token = mail.token()
    sent = mail.message(token, attachment=("invoice.com", testdata.eicar()))
    mail.send(sent)  # accepted: the relay answers 250, the scanner decides after the queue
    row = wait_for(
        lambda: tower.psql(
            "SELECT verdict || '|' || scanner || '|' || quarantine_id || '|' || findings::text "
            f"FROM verdict_events WHERE message_id = '{sent['Message-ID']}'"
        ),
        60,
        "the virus verdict event in SQL",
    )
    verdict, scanner, quarantine_id, findings = row.split("|", 3)
    assert verdict == "virus"
    assert "EICAR" in findings
    # The quarantine is the SQL row with the message's bytes (docs/quarantine.md), not a file
    # on the scanner.
    held = tower.psql(
        f"SELECT position(convert_to('{token}', 'UTF8') in message) > 0 AND expires_at IS NOT"
        f" NULL FROM verdict_events WHERE quarantine_id = '{quarantine_id}'"
    )
    assert held == "t"
    node = tower.node(tower.entry(scanner).name)
    assert not node.file(f"{tower.settings.spool_dir}/quarantine/{quarantine_id}.eml").exists
    assert mail.delivered()[token] == 0


def test_starttls_with_the_towers_certificate(tower):
    s = tower.settings
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP(str(s.hosts.relay), s.ports.smtp, timeout=30) as smtp:
        smtp.ehlo("verify.internet.lab")
        assert smtp.has_extn("starttls")
        smtp.starttls(context=ctx)
        cert = smtp.sock.getpeercert(binary_form=True)
        assert cert
        assert s.hostname.encode() in cert
        assert smtp.ehlo("verify.internet.lab")[0] == 250


def test_smtp_smuggling_bare_newline_is_refused(mail, tower):
    """CVE-2023-51764: a bare LF before '.' must not end the message or start another."""
    s = tower.settings
    with RawSmtp(str(s.hosts.relay), s.ports.smtp) as smtp:
        assert smtp.reply().startswith(b"220")  # the whole greeting: never talk before it
        assert smtp.say(b"EHLO verify.internet.lab").startswith(b"250")
        assert smtp.say(b"MAIL FROM:<sender@internet.lab>").startswith(b"250")
        assert smtp.say(f"RCPT TO:<{mail.rcpt()}>".encode()).startswith(b"250")
        assert smtp.say(b"DATA").startswith(b"354")
        smuggled = (
            b"Subject: first\r\n\r\nbody\n.\nMAIL FROM:<evil@internet.lab>\r\n"
            b"RCPT TO:<" + mail.rcpt("victim").encode() + b">\r\n"
        )
        smtp.send(smuggled + b".\r\n")
        reply = smtp.reply()
    assert reply.startswith(b"5"), reply


def test_banned_attachment_quarantined_then_released(mail, tower):
    """Policy stops a banned file type; an operator's release delivers the original."""
    token = mail.token()
    sent = mail.message(token, attachment=("invoice.pdf.exe", b"not really a program\n"))
    mail.send(sent)
    row = wait_for(
        lambda: tower.psql(
            "SELECT verdict || '|' || scanner || '|' || quarantine_id "
            f"FROM verdict_events WHERE message_id = '{sent['Message-ID']}'"
        ),
        60,
        "the banned verdict event in SQL",
    )
    verdict, scanner, quarantine_id = row.split("|")
    assert verdict == "banned"
    assert mail.delivered()[token] == 0
    node = tower.node(tower.entry(scanner).name)
    out = node.check_output(f"/opt/mailtower/venv/bin/mailtower quarantine release {quarantine_id}")
    assert quarantine_id in out
    wait_for(lambda: mail.delivered()[token] >= 1, 60, f"released message {token} at the customer")
    got = email.message_from_bytes(mail.fetch(token), policy=email.policy.default)
    assert got["X-Mailtower-Released"]
    assert "was=banned" in got["X-Mailtower-Verdict"]
    # A second release is refused: the customer gets the message once.
    assert node.run(f"/opt/mailtower/venv/bin/mailtower quarantine release {quarantine_id}").rc == 1
