"""Store and forward at one tower of the pair: expiry notifies the genuine sender once; a nearly
full queue disk answers 452 and the world's mail moves to the twin; the queue's capacity."""

from __future__ import annotations

import json
import re
import smtplib
import time
from collections.abc import Iterator
from contextlib import contextmanager

from conftest import Pair
from towerlib import MAILDIR, record_figure, start_postfix, stop_postfix, wait_for

MAIN_CF = "/etc/postfix/main.cf"


@contextmanager
def relay_overrides(pair: Pair, tower: str, **params: str) -> Iterator[None]:
    """Change relay parameters for one test; put the deployed main.cf back byte for byte."""
    relay = pair.towers[tower].relay()
    before = relay.check_output(f"sha256sum {MAIN_CF}")
    relay.check_output(f"cp -p {MAIN_CF} {MAIN_CF}.verify-saved")
    try:
        relay.check_output("postconf -e " + " ".join(f"{k}={v}" for k, v in params.items()))
        relay.check_output("postfix reload")
        yield
    finally:
        relay.check_output(f"mv {MAIN_CF}.verify-saved {MAIN_CF} && postfix reload")
        assert relay.check_output(f"sha256sum {MAIN_CF}") == before


@contextmanager
def customer_down(pair: Pair, index: int) -> Iterator[None]:
    node = pair.customer_node(index)
    customer = pair.customers[index]
    stop_postfix(node, customer.server, customer.port)
    try:
        yield
    finally:
        start_postfix(node, customer.server, customer.port)


def _send_direct(
    pair: Pair, tower: str, sender: str, rcpt: str, token: str, body: str = ""
) -> None:
    settings = pair.towers[tower].settings
    msg = pair.message(token, rcpt, sender)
    if body:
        msg.set_content(body)
    with smtplib.SMTP(str(settings.hosts.relay), settings.ports.smtp, timeout=30) as smtp:
        smtp.send_message(msg, sender, [rcpt])


def _queued(pair: Pair, tower: str, rcpt: str) -> list[dict]:
    out = pair.towers[tower].relay().check_output("postqueue -j")
    entries = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [e for e in entries if any(r["address"] == rcpt for r in e["recipients"])]


def test_expired_mail_notifies_the_genuine_sender_once(pair: Pair) -> None:
    token = pair.token()
    sender = pair.rcpt(1, local=f"genuine-{token[:8]}")  # a customer's own address
    rcpt = pair.rcpt(0, local="expires")
    bounces = pair.customer_node(1)
    with (
        customer_down(pair, 0),
        relay_overrides(pair, "a", maximal_queue_lifetime="20s", bounce_queue_lifetime="20s"),
    ):
        body = f"the content {token[::-1]}, which no notice may carry\n"
        _send_direct(pair, "a", sender, rcpt, token, body=body)

        def notified():
            # Found by its recipient (the sender's address is unique to this run).
            out = bounces.run(f"grep -l '{sender}' -r {MAILDIR}/new {MAILDIR}/cur")
            return out.stdout.split() or None

        files = wait_for(notified, 120, "the sender's non-delivery notice", 1)
        wait_for(lambda: not _queued(pair, "a", rcpt), 60, "the expired message to leave")
    assert len(files) == 1, f"{len(files)} notices for one expired message"
    text = bounces.check_output(f"cat {files[0]}")
    assert "Undelivered Mail Returned to Sender" in text
    assert rcpt in text  # the notice names the recipient it could not reach
    # Of the original it returns the header block only (text/rfc822-headers), never the
    # body: nothing the sender put in the content leaves the tower this way.
    assert "Content-Type: text/rfc822-headers" in text
    assert token[::-1] not in text
    # Back up, the customer never gets the expired message.
    assert token not in pair.arrivals(0)


def test_nearly_full_queue_disk_refuses_with_452_and_the_world_moves_to_the_twin(
    pair: Pair,
) -> None:
    relay = pair.towers["a"].relay()
    free = int(relay.check_output("df -B1 --output=avail /var/spool/postfix | tail -1"))
    with relay_overrides(pair, "a", queue_minfree=str(free + 1024**3)):
        settings = pair.towers["a"].settings
        with smtplib.SMTP(str(settings.hosts.relay), settings.ports.smtp, timeout=30) as smtp:
            smtp.ehlo("verify.internet.lab")
            code, text = smtp.mail("someone@internet.lab")
        assert code == 452, (code, text)
        assert b"Insufficient system storage" in text
        tokens = pair.submit(pair.rcpt(0, local="full"), count=20)
        arrived = pair.wait_delivered(tokens, 0, 180)
    assert {pair.tower_of(arrived[t][0]["by"]) for t in tokens} == {"b"}


def test_queue_capacity(pair: Pair) -> None:
    """How much deferred mail a relay holds per GB of queue disk."""
    rcpt = pair.rcpt(0, local="capacity")
    relay = pair.towers["a"].relay()
    count, size = 100, 100 * 1024
    body = ("x" * 76 + "\n") * (size // 77)
    tokens = [pair.token() for _ in range(count)]
    with customer_down(pair, 0):
        for token in tokens:
            _send_direct(pair, "a", "someone@internet.lab", rcpt, token, body)
        wait_for(
            lambda: len(_waiting(pair, rcpt)) == count,
            120,
            "every message scanned and deferred (or held) for the stopped customer",
        )
        used = int(
            relay.check_output(
                "du -sB1 /var/spool/postfix/deferred /var/spool/postfix/hold "
                "/var/spool/postfix/defer | awk '{s+=$1} END {print s}'"
            )
        )
        payload = sum(e["message_size"] for e in _waiting(pair, rcpt))
        free = int(relay.check_output("df -B1 --output=avail /var/spool/postfix | tail -1"))
    pair.wait_delivered(tokens, 0, 180)
    mb_per_gb = payload / used * 1024
    record_figure(
        "queue_capacity",
        {
            "messages": count,
            "payload_mb": round(payload / 1024**2, 1),
            "disk_used_mb": round(used / 1024**2, 1),
            "deferred_mb_per_gb_of_disk": round(mb_per_gb),
            "queue_disk_free_gb": round(free / 1024**3, 1),
        },
    )
    assert 500 < mb_per_gb <= 1024


def test_deferred_mail_arrives_in_order_when_the_customer_is_back(pair: Pair) -> None:
    """Mail queued while a customer is down arrives in the order the tower received it once
    the server is back (the relay's orderer holds it, then releases it oldest first)."""
    rcpt = pair.rcpt(0, local="order")
    tokens = [pair.token() for _ in range(10)]
    with customer_down(pair, 0):
        for token in tokens:
            _send_direct(pair, "a", "someone@internet.lab", rcpt, token)
            # One message at a time through the scanners, so the tower's order is the sent one.
            wait_for(lambda t=token: t in _tokens_waiting(pair, rcpt), 60, "the message queued")
        wait_for(
            lambda: [e["queue_name"] for e in _waiting(pair, rcpt)] == ["hold"] * len(tokens),
            60,
            "every message held by the relay's orderer while the customer is down",
        )
    started = time.monotonic()
    arrived = pair.wait_delivered(tokens, 0, 180)
    assert all(len(arrived[t]) == 1 for t in tokens)
    # Maildir names start with the delivery time (seconds.Musec), the finest order there is.
    landed = sorted(tokens, key=lambda t: _maildir_time(arrived[t][0]["path"]))
    in_place = sum(1 for a, b in zip(landed, tokens, strict=True) if a == b)
    record_figure(
        "store_and_forward_order",
        {
            "messages": len(tokens),
            "arrived_in_sent_position": in_place,
            "all_delivered_after_back_s": round(time.monotonic() - started, 1),
        },
    )
    assert landed == tokens


def _waiting(pair: Pair, rcpt: str) -> list[dict]:
    """The relay's copies for ``rcpt`` that wait for the customer (deferred, or held)."""
    return [e for e in _queued(pair, "a", rcpt) if e["queue_name"] in ("deferred", "hold")]


def _tokens_waiting(pair: Pair, rcpt: str) -> set[str]:
    """Tokens of the scanned copies waiting for ``rcpt`` (read from their queue files)."""
    relay = pair.towers["a"].relay()
    found = set()
    for e in _waiting(pair, rcpt):
        out = relay.run(f"postcat -hq {e['queue_id']} | grep -m1 '^X-Test-Token: '")
        if out.stdout.strip():
            found.add(out.stdout.split(": ", 1)[1].strip())
    return found


def _maildir_time(path: str) -> tuple[int, int]:
    """Postfix names Maildir files ``<seconds>.V<dev>I<inode>M<usec>.<host>``."""
    name = path.rsplit("/", 1)[1]
    match = re.match(r"^(\d+)\.\S*?M(\d+)\.", name)
    assert match, f"not a Postfix Maildir name: {name}"
    return int(match.group(1)), int(match.group(2))
