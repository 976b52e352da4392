"""Store and forward: with the customer's server down, mail waits at the relay, then arrives."""

from __future__ import annotations

import json

from towerlib import wait_for


def _queued_for(tower, rcpt: str) -> list[dict]:
    out = tower.relay().check_output("postqueue -j")
    entries = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [e for e in entries if any(r["address"] == rcpt for r in e["recipients"])]


def test_deferred_while_customer_down_then_delivered(mail, tower):
    local = f"saf-{mail.token()[:12]}"
    rcpt = mail.rcpt(local)
    tokens = [mail.token() for _ in range(3)]
    mail.server.check_output("systemctl stop postfix")
    try:
        for token in tokens:
            mail.send(mail.message(token, rcpt=rcpt), rcpt=rcpt)
        deferred = wait_for(
            lambda: [e for e in _queued_for(tower, rcpt) if e["queue_name"] == "deferred"
                     and any("delay_reason" in r for r in e["recipients"])] if len(
                _queued_for(tower, rcpt)) == len(tokens) else None,
            90, "the relay to defer the messages for the stopped customer server")
        assert len(deferred) == len(tokens)
        assert mail.delivered().keys().isdisjoint(tokens)
    finally:
        mail.server.check_output("systemctl start postfix")
    # Retried on the relay's own schedule (minimal_backoff_time), no flush needed.
    wait_for(lambda: all(mail.delivered()[t] >= 1 for t in tokens), 120,
             "the deferred messages to arrive after the customer server came back")
    assert _queued_for(tower, rcpt) == []
