"""The relay: Postfix, HAProxy to the scanner pool, nftables, SQL-backed routes."""

from __future__ import annotations

import socket

import pytest
from towerlib import assert_secret_share

GROUP = "relay"


@pytest.mark.parametrize(
    "package", ["postfix", "postfix-pgsql", "postfix-pcre", "haproxy", "nftables"]
)
def test_package_installed(node, package):
    assert node.package(package).is_installed


@pytest.mark.parametrize(
    "service",
    ["postfix", "haproxy", "nftables", "mailtower-relay-exporter", "mailtower-relay-order"],
)
def test_service_running_and_enabled(node, service):
    svc = node.service(service)
    assert svc.is_enabled
    if service != "nftables":  # a oneshot that loads the rules and exits
        assert svc.is_running


def test_listeners(node, tower):
    s = tower.settings
    for spec in (
        f"tcp://0.0.0.0:{s.ports.smtp}",
        f"tcp://127.0.0.1:{s.ports.filter}",
        f"tcp://{s.hosts.relay}:{s.ports.reinject}",
        f"tcp://{s.hosts.relay}:{s.ports.haproxy_runtime}",
    ):
        assert node.socket(spec).is_listening, spec


def test_postfix_check_is_clean(node):
    result = node.run("postfix check")
    assert result.rc == 0 and not result.stderr.strip(), result.stderr


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("maximal_queue_lifetime", None),
        ("smtpd_forbid_bare_newline", "reject"),
        ("mydestination", ""),
        ("mynetworks", "127.0.0.0/8"),
        ("postscreen_greet_action", "enforce"),
        ("postscreen_access_list", "permit_mynetworks"),
        ("postscreen_dnsbl_sites", ""),
    ],
)
def test_postfix_setting(node, tower, key, expected):
    if expected is None:
        expected = tower.settings.limits.queue_lifetime
    assert node.check_output(f"postconf -h {key}") == expected


def test_relay_restrictions_let_only_the_monitor_reach_the_operators(node, tower):
    """Not an open relay: customer domains, and (with alerts) the monitor's alert mail to the
    operators' mailboxes."""
    s = tower.settings
    middle = (
        f"check_client_access inline:{{ {{ {s.hosts.monitor}=monitor_alerts }} }}, "
        if s.alerts
        else ""
    )
    expected = f"permit_mynetworks, {middle}reject_unauth_destination"
    assert node.check_output("postconf -h smtpd_relay_restrictions") == expected


@pytest.mark.parametrize(
    ("service", "command"),
    [("smtp/inet", "postscreen"), ("smtpd/pass", "smtpd"), ("tlsproxy/unix", "tlsproxy")],
)
def test_port_25_is_screened_by_postscreen(node, service, command):
    """Issue 15 (low): no pregreet test. postscreen takes port 25 and hands a client that
    waited for the greeting to an smtpd (tests/e2e/test_25_relay_limits.py shows both sides)."""
    assert node.check_output(f"postconf -M {service}").split()[7] == command


def test_customer_routes_come_from_sql(node, tower):
    for customer in tower.settings.customers:
        got = node.check_output(
            f"postmap -q {customer.domain} proxy:pgsql:/etc/postfix/pgsql/transport.cf"
        )
        assert got == customer.transport
    assert (
        node.run("postmap -q foreign.example proxy:pgsql:/etc/postfix/pgsql/relay_domains.cf").rc
        == 1
    )


def test_recipients_are_checked_from_sql(node, tower):
    """Issue 17: the relay asks SQL whether a recipient exists (a customer's uploaded list, or
    any local part for a customer without one) and which customers want address
    verification; the verify cache is kept on disk."""
    maps = "proxy:pgsql:/etc/postfix/pgsql"
    for customer in tower.settings.customers:  # the lab's customers check nothing by default
        key = f"@{customer.domain}"
        assert node.check_output(f"postmap -q {key} {maps}/relay_recipients.cf") == "OK"
        assert node.run(f"postmap -q {customer.domain} {maps}/recipient_check.cf").rc == 1
    assert node.run(f"postmap -q @foreign.example {maps}/relay_recipients.cf").rc == 1
    assert node.check_output("postconf -h relay_recipient_maps") == f"{maps}/relay_recipients.cf"
    assert f"{maps}/recipient_check.cf" in node.check_output(
        "postconf -h smtpd_recipient_restrictions"
    )
    assert node.check_output("postconf -h address_verify_map").startswith("btree:")
    assert node.check_output("postconf -M verify/unix").split()[7] == "verify"


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("a" * 617 + "@customer.example", True),
        ("a" * 65 + "@customer.example", True),
        ("us\x1ber@customer.example", True),
        ("us\x7fer@customer.example", True),
        ("a" * 64 + "@customer.example", False),
        ("user@customer.example", False),
    ],
    ids=["617", "65", "ESC", "DEL", "64", "plain"],
)
def test_address_syntax_table_in_the_relays_own_pcre(node, address, refused):
    got = node.run("postmap -q %s pcre:/etc/postfix/address_syntax.pcre", address)
    assert (got.rc == 0 and got.stdout.startswith("REJECT 5.1.3 ")) is refused, got


def test_the_scan_hop_turns_permanent_failures_into_deferrals(node):
    assert node.check_output("postconf -Ph scan/unix/smtp_delivery_status_filter") == (
        "pcre:/etc/postfix/scan_status.pcre"
    )
    status = "5.0.0 host 127.0.0.1[127.0.0.1] said: 500 Command line too long"
    got = node.check_output("postmap -q %s pcre:/etc/postfix/scan_status.pcre", status)
    assert got == "4" + status[1:]


def test_haproxy_config_valid(node):
    assert node.run("haproxy -c -q -f /etc/haproxy/haproxy.cfg").rc == 0


def test_haproxy_pool_lists_every_scanner_enabled(tower):
    states = tower.haproxy_states()
    expected = {tower.settings.scanner_name(i) for i in range(len(tower.settings.hosts.scanners))}
    assert set(states) == expected
    assert {n for n, st in states.items() if st & 1} == set(), "scanners in maintenance"


def test_runtime_api_refuses_anyone_but_the_monitor(tower):
    s = tower.settings
    with (
        pytest.raises(OSError),
        socket.create_connection((str(s.hosts.relay), s.ports.haproxy_runtime), timeout=3) as c,
    ):
        c.sendall(b"show info\n")
        if not c.recv(100):
            raise ConnectionResetError("closed without an answer")


def test_reinjection_port_refuses_anyone_but_scanners(tower):
    s = tower.settings
    with (
        pytest.raises(OSError),
        socket.create_connection((str(s.hosts.relay), s.ports.reinject), timeout=3) as c,
    ):
        if not c.recv(100):
            raise ConnectionResetError("closed without a greeting")


def test_reinjection_port_greets_the_monitor(tower):
    """The monitor re-injects the quarantined messages the portal releases (nftables set
    ``reinjectors``, the listener's mynetworks)."""
    s = tower.settings
    greeting = tower.monitor().check_output(
        f"timeout 10 bash -c 'exec 3<>/dev/tcp/{s.hosts.relay}/{s.ports.reinject}; head -c 3 <&3'"
    )
    assert greeting == "220"


def test_settings_hold_only_this_roles_secrets(node, tower):
    assert_secret_share(node, tower, "relay")


def test_the_queue_exporter_is_not_root_and_still_counts_the_queue(node, tower):
    """Issue 15 (low): the exporter ran as root. It runs as mailtower with only the capability
    to read and search directories, and still reads Postfix's 0700 queue directories."""
    pid = node.check_output("systemctl show -p MainPID --value mailtower-relay-exporter")
    assert node.check_output(f"ps -o user= -p {pid}").strip() == "mailtower"
    # Scraped as Prometheus does, from the monitor (the only host the firewall lets in); a
    # queue directory it could not read would fail the scrape.
    metrics = tower.monitor().check_output(
        f"curl -fsS http://{tower.settings.hosts.relay}:{tower.settings.ports.relay_exporter}"
        "/metrics"
    )
    assert 'mailtower_relay_queue_messages{queue="deferred"}' in metrics


# CAP_DAC_READ_SEARCH, CAP_SETGID, CAP_SETUID (linux/capability.h)
ORDERER_CAPABILITIES = (1 << 2) | (1 << 6) | (1 << 7)


def test_the_orderer_is_root_with_three_capabilities_and_still_reads_the_queue(node):
    """Issue 15 (low): the orderer ran as root with every capability. postsuper, which holds
    and releases its messages, refuses every user but root (the postfix user included), so it
    stays root, bounded to what postsuper and the queue need, unable to gain more.
    tests/pair/test_40_store_and_forward.py shows it still holds and releases in order."""
    pid = node.check_output("systemctl show -p MainPID --value mailtower-relay-order")
    assert node.check_output(f"ps -o user= -p {pid}").strip() == "root"
    status = dict(
        line.split(":", 1) for line in node.check_output(f"cat /proc/{pid}/status").splitlines()
    )
    assert int(status["CapBnd"], 16) == ORDERER_CAPABILITIES, status["CapBnd"]
    assert int(status["CapEff"], 16) == ORDERER_CAPABILITIES, status["CapEff"]
    assert status["NoNewPrivs"].strip() == "1"
    # A pass every 2 s lists the queue (postqueue) and reads postconf; one it could not do is
    # logged as event=step_failed, so the last 10 s of its log hold several passes.
    log = node.check_output("journalctl -q -u mailtower-relay-order --since=-10s")
    assert "event=step_failed" not in log, log
