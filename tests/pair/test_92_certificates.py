"""The relays' certificates from the lab CA (issue 19): the world's sender verifies each relay
it delivers to (smtp_tls_security_level = verify, the MX name in the certificate, the chain
up to the lab root), every relay presents the chain the deploy checked, and its exporter
tells the monitor when the certificate ends."""

from __future__ import annotations

import json
import re
import smtplib
import ssl
import time
from pathlib import Path

from conftest import Pair
from cryptography import x509
from cryptography.hazmat.primitives import serialization

VERIFIED = "Verified TLS connection established to"


def _lab_chain(pair: Pair, tower: str) -> list[x509.Certificate]:
    tls = pair.towers[tower].settings.tls
    assert tls is not None, f"lab-{tower} gives no certificate (inventory/_lab.py)"
    return x509.load_pem_x509_certificates(Path(tls.chain).read_bytes())


def _lab_root(pair: Pair) -> str:
    tls = pair.towers["a"].settings.tls
    assert tls is not None and tls.ca is not None
    return Path(tls.ca).read_text()


def test_the_sender_verifies_every_relay_it_delivers_to(pair: Pair) -> None:
    since = int(time.time()) - 1
    carried: dict[str, int] = {}
    for index in range(len(pair.customers)):
        tokens = pair.submit(pair.rcpt(index), count=10)
        arrived = pair.wait_delivered(tokens, index)
        for token in tokens:
            tower = pair.tower_of(arrived[token][0]["by"])
            assert tower, f"{token} arrived without a tower's Received header"
            carried[tower] = carried.get(tower, 0) + 1
    # Equal MX preferences: 20 messages all through one tower has probability 2^-19.
    assert set(carried) == {"a", "b"}, carried
    log = pair.sender.check_output(
        f"journalctl -q --since @{since} | grep -F 'postfix/smtp['"
        " | grep -F 'TLS connection' || true"
    )
    for key in carried:
        s = pair.towers[key].settings
        wanted = f"{VERIFIED} {s.hostname}[{s.hosts.relay}]:{s.ports.smtp}"
        assert wanted in log, f"no verified TLS to lab-{key}'s relay in the sender's log:\n{log}"
    weaker = [
        line
        for line in log.splitlines()
        if re.search(r"(Untrusted|Anonymous|Trusted) TLS connection", line)
    ]
    assert weaker == [], weaker


def test_each_relay_presents_the_lab_chain_the_deploy_checked(pair: Pair) -> None:
    # Trusting the lab root alone: the handshake succeeds only if the relay sends the
    # intermediate after its own certificate (a complete chain).
    ctx = ssl.create_default_context(cadata=_lab_root(pair))
    ctx.check_hostname = False  # connected by address; the name is checked below
    for key, tower in pair.towers.items():
        s = tower.settings
        with smtplib.SMTP(str(s.hosts.relay), s.ports.smtp, timeout=30) as smtp:
            smtp.ehlo("verify.internet.lab")
            smtp.starttls(context=ctx)
            peer = smtp.sock.getpeercert()
            served = smtp.sock.getpeercert(binary_form=True)
        names = [v for k, v in peer["subjectAltName"] if k == "DNS"]
        assert names == [s.hostname], (key, names)
        leaf = _lab_chain(pair, key)[0]
        assert served == leaf.public_bytes(serialization.Encoding.DER), (
            f"lab-{key}'s relay serves another certificate than .lab/tls/lab-{key}/relay.crt"
        )


def test_the_relays_export_their_certificates_end(pair: Pair) -> None:
    for key, tower in pair.towers.items():
        s = tower.settings
        # The exporter answers the monitor only (the relay's nftables).
        text = tower.monitor().check_output(
            f"curl -fsS http://{s.hosts.relay}:{s.ports.relay_exporter}/metrics"
        )
        found = re.findall(
            r'^mailtower_tls_certificate_not_after_seconds\{names="([^"]*)"\} (\S+)$', text, re.M
        )
        leaf = _lab_chain(pair, key)[0]
        wanted = [(s.hostname, leaf.not_valid_after_utc.timestamp())]
        assert [(n, float(v)) for n, v in found] == wanted, found
        # Prometheus loaded the alert, and a lab certificate (397 days) does not fire it.
        rules = json.loads(
            tower.monitor().check_output(
                f"curl -fsS http://{s.hosts.monitor}:{s.ports.prometheus}/api/v1/rules"
            )
        )
        alerts = {
            r["name"]: r["state"]
            for g in rules["data"]["groups"]
            for r in g["rules"]
            if r.get("type") == "alerting"
        }
        assert alerts.get("TLSCertificateExpiresSoon") == "inactive", alerts
        assert alerts.get("TLSCertificateUnreadable") == "inactive", alerts
