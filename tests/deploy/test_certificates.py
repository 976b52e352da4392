"""The relay's certificate in its configuration (issue 19): Postfix serves the file the role
uploads (a real TLS handshake against it, trusting only the root), the lab's sender verifies,
and the alert two weeks before expiry (promtool checks and unit-tests the rule file)."""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import sample_settings
from needs import missing

from mailtower.controller import certs
from mailtower.controller.lab import ca
from mailtower.settings import LabSender
from roles import lab_sender, relay

NAME = "mx.tower-x.example.net"
POSTCONF = "/usr/sbin/postconf"
MASTER = Path("/etc/postfix/master.cf")
SENDER = {"domain": "internet.lab", "resolver": "10.201.0.53", "submit_from": "10.201.0.1"}


def _conf(text: str) -> dict[str, str]:
    return dict(re.findall(r"^(\w+) = ?(.*)$", text, re.M))


@pytest.fixture(scope="module")
def pki() -> dict:
    root_key, mid_key, leaf_key = ca.new_key(), ca.new_key(), ca.new_key()
    root = ca.issue("Test Root", root_key, ca=True, days=3650)
    mid = ca.issue("Test Intermediate", mid_key, (root, root_key), ca=True, days=1000)
    leaf = ca.issue(NAME, leaf_key, (mid, mid_key), names=(NAME,))
    chain, key = ca.cert_pem(leaf, mid), ca.key_pem(leaf_key)
    report = certs.require(chain, key, [NAME], what="test", trust_pem=ca.cert_pem(root))
    return {"root": root, "given": certs.Given(chain, key, report)}


def test_postfix_serves_one_file_key_first(render, settings):
    conf = _conf(render("relay/etc/postfix/main.cf", settings, tls_pem=relay.TLS_PEM))
    assert conf["smtpd_tls_chain_files"] == relay.TLS_PEM
    # the legacy pair would be used beside the chain files: one source only
    assert "smtpd_tls_cert_file" not in conf and "smtpd_tls_key_file" not in conf
    assert relay.CERT != relay.TLS_PEM  # the exporter reads the chain alone, never the key


def test_the_served_file_completes_a_verified_handshake(tmp_path, pki):
    """The bytes the role uploads, loaded as a TLS server does (key, then chain from one
    file), verified by a client that trusts only the root and checks the MX name."""
    pem = tmp_path / "relay.pem"
    pem.write_bytes(relay.served_pem(pki["given"]))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pem)
    client_ctx = ssl.create_default_context(cadata=ca.cert_pem(pki["root"]).decode())
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            tls.recv(1)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname=NAME) as tls,
        ):
            names = [v for k, v in tls.getpeercert()["subjectAltName"] if k == "DNS"]
            tls.sendall(b"x")
        assert names == [NAME]
    finally:
        thread.join(timeout=10)
        listener.close()


def test_the_lab_sender_verifies_with_the_lab_ca(render, settings):
    sender = LabSender.model_validate({**SENDER, "tls_ca": "-----BEGIN CERTIFICATE-----\n"})
    conf = _conf(
        render(
            "lab_sender/etc/postfix/main.cf",
            settings,
            internet=sender,
            ca_file=lab_sender.CA_FILE,
        )
    )
    assert conf["smtp_tls_security_level"] == "verify"
    assert conf["smtp_tls_verify_cert_match"] == "hostname"  # the MX name, from DNS
    assert conf["smtp_tls_CAfile"] == lab_sender.CA_FILE
    assert int(conf["smtp_tls_loglevel"]) >= 1  # "Verified TLS connection established"
    plain = _conf(render("lab_sender/etc/postfix/main.cf", settings, internet=LabSender(**SENDER)))
    assert "smtp_tls_security_level" not in plain


def test_postconf_knows_every_tls_parameter(render, settings, tmp_path):
    """Real postconf reads the relay's and the sender's main.cf without an unknown name."""
    if not (Path(POSTCONF).exists() and MASTER.exists()):
        missing("postconf and master.cf (package postfix)")
    sender = LabSender.model_validate({**SENDER, "tls_ca": "-----BEGIN CERTIFICATE-----\n"})
    files = {
        "relay": (
            render("relay/etc/postfix/main.cf", settings, tls_pem=relay.TLS_PEM),
            render("relay/etc/postfix/master.cf", settings),
        ),
        "sender": (
            render(
                "lab_sender/etc/postfix/main.cf",
                settings,
                internet=sender,
                ca_file=lab_sender.CA_FILE,
            ),
            MASTER.read_text(),
        ),
    }
    for name, (main, master) in files.items():
        conf_dir = tmp_path / name
        conf_dir.mkdir()
        (conf_dir / "main.cf").write_text(main)
        (conf_dir / "master.cf").write_text(master)
        proc = subprocess.run(
            [POSTCONF, "-c", str(conf_dir), "-n"], capture_output=True, text=True, timeout=30
        )
        assert proc.returncode == 0, proc.stderr
        tls_warnings = [line for line in proc.stderr.splitlines() if "tls" in line]
        assert tls_warnings == [], tls_warnings


# -- the alert ----------------------------------------------------------------------------


def test_the_expiry_alert_reads_what_the_relay_exports(render, settings, tmp_path):
    from mailtower.relay.exporter import registry

    rules = render("monitor/etc/prometheus/rules/mailtower.yml", settings)
    block = rules.split("alert: TLSCertificateExpiresSoon")[1].split("- alert:")[0]
    assert f"< {14 * 86400}" in block  # limits.tls_expiry_alert_days, two weeks by default
    read = set(re.findall(r"mailtower_tls_[a-z_]+", block))
    (tmp_path / "spool").mkdir()
    cert = tmp_path / "relay.crt"
    key = ca.new_key()
    cert.write_bytes(ca.cert_pem(ca.issue(NAME, key, names=(NAME,))))
    exported = {f.name for f in registry(tmp_path / "spool", cert).collect() if f.samples}
    assert read and read <= exported, (read, exported)


def _promtool() -> str:
    found = shutil.which("promtool")
    if not found:
        missing("promtool (package prometheus)")
    assert found
    return found


PROMTOOL_TEST = r"""
rule_files: [mailtower.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      # Unix time 0 is the test's start: these end 13 and 15 days after it.
      - series: 'mailtower_tls_certificate_not_after_seconds{job="relay",names="mx.a"}'
        values: '1123200x30'
      - series: 'mailtower_tls_certificate_not_after_seconds{job="relay",names="mx.b"}'
        values: '1296000x30'
      - series: 'up{job="relay"}'
        values: '1x30'
    alert_rule_test:
      - eval_time: 15m
        alertname: TLSCertificateExpiresSoon
        exp_alerts:
          - exp_labels: {severity: warn, job: relay, names: mx.a}
            exp_annotations:
              summary: "the relay's TLS certificate (mx.a) expires in 12d 23h 45m 0s:\
                \ renew it and re-deploy (runbook: Certificates)"
      - eval_time: 15m
        alertname: TLSCertificateUnreadable
        exp_alerts: []
  - interval: 1m
    input_series:
      - series: 'up{job="relay"}'
        values: '1x30'
    alert_rule_test:
      - eval_time: 15m
        alertname: TLSCertificateUnreadable
        exp_alerts:
          - exp_labels: {severity: warn}
            exp_annotations:
              summary: "the relay exporter cannot read the relay's TLS certificate\
                \ (runbook: Certificates)"
"""


def test_promtool_accepts_the_rules_and_the_alert_fires_within_two_weeks(render, tmp_path):
    promtool = _promtool()
    # Every optional group rendered (GOC, bundles, ClamAV), as the fullest tower has them.
    from mailtower.settings import Bundles, ClamavMirror, Goc

    pem = (
        "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n"
        "-----END PUBLIC KEY-----\n"
    )
    full = sample_settings().model_copy(
        update={
            "goc": Goc(address="10.0.9.10"),
            "rules_dir": "/var/lib/mailtower/rules",
            "bundles": Bundles(public_key=pem),
            "clamav": ClamavMirror(databases=["test"]),
        }
    )
    for s, name in ((sample_settings(), "plain"), (full, "full")):
        out = tmp_path / name
        out.mkdir()
        (out / "mailtower.yml").write_text(render("monitor/etc/prometheus/rules/mailtower.yml", s))
        (out / "test.yml").write_text(PROMTOOL_TEST)
        for args in (["check", "rules", "mailtower.yml"], ["test", "rules", "test.yml"]):
            proc = subprocess.run(
                [promtool, *args], cwd=out, capture_output=True, text=True, timeout=60
            )
            assert proc.returncode == 0, f"{name}: promtool {args[0]}: {proc.stdout}{proc.stderr}"
