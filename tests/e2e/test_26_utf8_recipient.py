"""Issue 15, high 2: a recipient with a non-ASCII local part, sent without SMTPUTF8, made scand
crash at re-injection and the relay rescan the message for three days. Now it is scanned once
and delivered once (re-injected with SMTPUTF8), and nothing of it stays in the relay's queue."""

from __future__ import annotations

import email.policy
import json

from towerlib import wait_for


def test_a_utf8_recipient_without_smtputf8_is_delivered_once(mail, tower):
    token = mail.token()
    rcpt = f"jörg-{token[:8]}@{mail.customer.domain}"
    msg = mail.message(token)  # the header's To is ASCII; the envelope's recipient is not
    with mail.connect() as smtp:
        smtp.command_encoding = "utf-8"  # 8-bit in RCPT, but no SMTPUTF8 asked for
        assert smtp.mail("sender@internet.lab")[0] == 250
        code, reply = smtp.rcpt(rcpt)
        if code != 250:  # refused at SMTP time is a defined outcome too: never a loop
            assert 500 <= code < 600, (code, reply)
            return
        code, reply = smtp.data(msg.as_bytes(policy=email.policy.SMTP))  # CRLF lines
        assert code == 250, (code, reply)
    wait_for(lambda: mail.delivered()[token] >= 1, 120, "the UTF-8 recipient's message")
    relay = tower.relay()

    def queued() -> list[dict]:
        out = relay.check_output("postqueue -j")
        entries = [json.loads(line) for line in out.splitlines() if line.strip()]
        return [e for e in entries if any(r["address"] == rcpt for r in e["recipients"])]

    wait_for(lambda: not queued(), 60, "the relay's queue to hold nothing for it")
    assert mail.delivered()[token] == 1
