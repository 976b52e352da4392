"""Store and forward: with the customer's server down, mail waits at the relay, then arrives."""

from __future__ import annotations

import json

from towerlib import start_postfix, stop_postfix, wait_for


def _queued_for(tower, rcpt: str) -> list[dict]:
    out = tower.relay().check_output("postqueue -j")
    entries = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [e for e in entries if any(r["address"] == rcpt for r in e["recipients"])]


def test_deferred_while_customer_down_then_delivered(mail, tower):
    local = f"saf-{mail.token()[:12]}"
    rcpt = mail.rcpt(local)
    tokens = [mail.token() for _ in range(3)]
    stop_postfix(mail.server, mail.customer.server, mail.customer.port)
    try:
        for token in tokens:
            mail.send(mail.message(token, rcpt=rcpt), rcpt=rcpt)
        server = mail.customer.server

        def all_deferred_for_the_customer():
            entries = _queued_for(tower, rcpt)
            # Deferred for the customer's server, or already held by the relay's orderer
            # (mailtower-relay-order), which releases them oldest first when it is back.
            waiting = [
                e
                for e in entries
                if e["queue_name"] == "hold"
                or (
                    e["queue_name"] == "deferred"
                    and all(server in r.get("delay_reason", "") for r in e["recipients"])
                )
            ]
            return waiting if len(entries) == len(waiting) == len(tokens) else None

        try:
            deferred = wait_for(
                all_deferred_for_the_customer,
                90,
                "the relay to scan and then defer every message for the stopped server",
            )
        except AssertionError as exc:
            queue = json.dumps(_queued_for(tower, rcpt), indent=1)[-3000:]
            raise AssertionError(f"{exc}; the relay's queue for {rcpt}:\n{queue}") from None
        assert len(deferred) == len(tokens)
        assert mail.delivered().keys().isdisjoint(tokens)
    finally:
        start_postfix(mail.server, mail.customer.server, mail.customer.port)
    # Retried on the relay's own schedule (minimal_backoff_time), no flush needed.
    wait_for(
        lambda: all(mail.delivered()[t] >= 1 for t in tokens),
        120,
        "the deferred messages to arrive after the customer server came back",
    )
    assert _queued_for(tower, rcpt) == []
