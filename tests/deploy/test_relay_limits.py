"""The relay refuses at SMTP time what the filter cannot take, and the scan hop never bounces
(issue 15): its Postfix config, rendered from settings, and its pcre tables applied in Python
to hostile addresses."""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import sample_settings

from mailtower.settings import TowerSettings

# Postfix 3.7's default parent_domain_matches_subdomains (postconf -d).
POSTFIX_PARENT_DEFAULT = {
    "debug_peer_list",
    "fast_flush_domains",
    "mynetworks",
    "permit_mx_backup_networks",
    "qmqpd_authorized_clients",
    "relay_domains",
    "smtpd_access_maps",
}


def _conf(text: str) -> dict[str, str]:
    return dict(re.findall(r"^(\w+) = ?(.*)$", text, re.M))


def _items(value: str) -> list[str]:
    return [v for v in re.split(r"[\s,]+", value) if v]


def _options(master: str, start: str) -> dict[str, str]:
    lines = master.split(f"\n{start}", 1)[1].split("\n")[1:]
    opts: dict[str, str] = {}
    for line in lines:
        if line and not line[0].isspace():
            break
        m = re.match(r"\s+-o (\w+)=(.*)$", line)
        if m:
            opts[m.group(1)] = m.group(2)
    return opts


class PcreTable:
    """A Postfix pcre table as Postfix applies it: the first pattern that matches wins."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[re.Pattern[str], str]] = []
        for line in text.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            m = re.match(r"^/(.*)/([a-zA-Z]*)\s+(.*)$", line)
            assert m, f"not a pcre table line: {line!r}"
            pattern, flags, result = m.groups()
            assert set(flags) <= {"i"}, flags
            self.rules.append((re.compile(pattern, re.I if "i" in flags else 0), result))

    def lookup(self, key: str) -> str | None:
        for pattern, result in self.rules:
            found = pattern.search(key)
            if found:
                return re.sub(r"\$(\d)", lambda g, f=found: f.group(int(g.group(1))) or "", result)
        return None


@pytest.fixture
def relay(render):
    def _relay(s: TowerSettings) -> dict[str, str]:
        return {
            "main": render("relay/etc/postfix/main.cf", s, tls_pem="/t"),
            "master": render("relay/etc/postfix/master.cf", s),
            "address_syntax": render("relay/etc/postfix/address_syntax.pcre", s),
            "scan_status": render("relay/etc/postfix/scan_status.pcre", s),
        }

    return _relay


# -- the scan hop never bounces ------------------------------------------------------------------


FILTER = "host 127.0.0.1[127.0.0.1]"


@pytest.mark.parametrize(
    "status",
    [
        f"5.0.0 {FILTER} said: 500 Command line too long (in reply to RCPT TO command)",
        f"5.1.3 {FILTER} said: 553 5.1.3 Error: malformed address (in reply to RCPT TO command)",
        f"5.3.4 {FILTER} said: 552 5.3.4 message exceeds the size limit (in reply to end of DATA)",
        "5.3.4 message size 70000000 exceeds size limit 69915990 of server 127.0.0.1[127.0.0.1]",
        "5.4.6 mail for [127.0.0.1]:10024 loops back to myself",
    ],
)
def test_every_permanent_failure_to_the_filter_is_a_deferral(relay, settings, status):
    out = relay(settings)
    assert _options(out["master"], "scan ")["smtp_delivery_status_filter"] == (
        "pcre:/etc/postfix/scan_status.pcre"
    )
    table = PcreTable(out["scan_status"])
    assert table.lookup(status) == "4" + status[1:]


@pytest.mark.parametrize("status", ["4.4.1 connect to 127.0.0.1 refused", "2.0.0 OK scanned"])
def test_deferrals_and_successes_of_the_scan_hop_stay_as_they_are(relay, settings, status):
    assert PcreTable(relay(settings)["scan_status"]).lookup(status) is None


def test_deliveries_to_customers_keep_their_permanent_failures(relay, settings):
    # The filter is the scan transport's alone: a customer's 5xx (for scanned mail) still ends
    # the delivery, with a notice that carries none of the content.
    out = relay(settings)
    assert "smtp_delivery_status_filter" not in _conf(out["main"])
    assert "smtp_delivery_status_filter" not in _options(out["master"], "relay ")


def test_a_notice_never_carries_the_content(relay, settings):
    # bounce_size_limit: a message over it is returned as text/rfc822-headers (postconf(5)),
    # cut at that size; every message is over 1 byte.
    conf = _conf(relay(settings)["main"])
    assert conf["bounce_size_limit"] == "1"
    # And no DSN from the internet (no RET=FULL, no success notices to forged senders).
    assert "dsn" in _items(conf["smtpd_discard_ehlo_keywords"])


# -- addresses: refused at MAIL and RCPT time ---------------------------------------------------


def _address_table(relay, settings) -> PcreTable:
    out = relay(settings)
    conf = _conf(out["main"])
    check = "pcre:/etc/postfix/address_syntax.pcre"
    assert f"check_sender_access {check}" in conf["smtpd_sender_restrictions"]
    recipient = conf["smtpd_recipient_restrictions"]
    assert f"check_recipient_access {check}" in recipient
    assert recipient.index("check_recipient_access") < recipient.index("permit")
    return PcreTable(out["address_syntax"])


HOSTILE = {
    "617-character local part": "a" * 617 + "@customer.example",
    "65-character local part": "a" * 65 + "@customer.example",
    "65-character local part, no domain": "a" * 65,
    "local part of 65 with an @ in it": "a@" + "b" * 63 + "@customer.example",
    "255-character address": "x@" + "d" * 236 + ".customer.example",
    "ESC": "us\x1ber@customer.example",
    "BEL": "us\x07er@customer.example",
    "DEL": "us\x7fer@customer.example",
    "NUL": "us\x00er@customer.example",
    "CR": "us\rer@customer.example",
    "LF": "us\ner@customer.example",
    "TAB": "us\ter@customer.example",
    "ESC in the domain": "user@cus\x1btomer.example",
}

ORDINARY = {
    "plain": "user@customer.example",
    "64-character local part": "a" * 64 + "@customer.example",
    "254-character address": "x@" + "d" * 235 + ".customer.example",
    "quoted @ in a local part of 64": "a@" + "b" * 62 + "@customer.example",
    "UTF-8": "jürgen@customer.example",
    "bare postmaster": "postmaster",
    "null sender": "<>",
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_addresses_are_refused(relay, settings, name):
    result = _address_table(relay, settings).lookup(HOSTILE[name])
    assert result is not None and re.match(r"REJECT 5\.1\.3 ", result), result


@pytest.mark.parametrize("name", ORDINARY)
def test_ordinary_addresses_pass(relay, settings, name):
    assert _address_table(relay, settings).lookup(ORDINARY[name]) is None


def test_address_limits_follow_settings(relay):
    s = sample_settings(limits={"address_local_part_max": 10, "address_path_max": 40})
    table = _address_table(relay, s)
    assert table.lookup("a" * 10 + "@customer.example") is None
    assert table.lookup("a" * 11 + "@customer.example") is not None
    assert table.lookup("a@" + "d" * 36) is None  # 38 characters, 40 with "<>"
    assert table.lookup("a@" + "d" * 37) is not None


def test_relay_installs_and_uploads_its_pcre_tables():
    from roles import relay as relay_role

    assert "postfix-pcre" in relay_role.PACKAGES
    text = Path(relay_role.__file__ or "").read_text()
    for table in ("address_syntax.pcre", "scan_status.pcre"):
        assert f'template("relay/etc/postfix/{table}")' in text


# -- every limit aligned with the filter's ------------------------------------------------------


def test_limits_are_the_settings_and_the_filter_takes_them(relay):
    s = sample_settings(
        limits={
            "message_size_bytes": 12_000_000,
            "recipients_per_message": 500,
            "filter_line_bytes": 900,
        }
    )
    limits = s.limits
    out = relay(s)
    conf = _conf(out["main"])
    scan = _options(out["master"], "scan ")
    reinject = _options(out["master"], f"{s.hosts.relay}:{s.ports.reinject} ")
    assert conf["message_size_limit"] == "12000000"
    # One scan per message, with every recipient the relay took.
    assert conf["smtpd_recipient_limit"] == "500"
    assert conf["scan_destination_recipient_limit"] == "500"
    # Lines folded at the width scand allows for (one stuffed dot, CRLF).
    assert scan["smtp_line_length_limit"] == "900"
    assert limits.filter_line_length == 900 + 1 + 2
    # What the relay sends the filter: its limit, its headers, dot-stuffing at worst.
    assert limits.filter_message_bytes >= (12_000_000 + limits.relay_header_bytes) * 4 / 3
    # What scand sends back (with its verdict header) fits the re-injection listener.
    assert int(reinject["message_size_limit"]) == limits.reinject_message_bytes
    # cleanup limits the queue file to its own message_size_limit: scanned mail has its own.
    cleanup = _options(out["master"], reinject["cleanup_service_name"] + " unix ")
    assert int(cleanup["message_size_limit"]) == limits.reinject_message_bytes
    assert limits.reinject_message_bytes >= limits.filter_message_bytes + 1024
    assert int(conf["queue_minfree"]) >= limits.reinject_message_bytes * 1.5


def test_the_longest_command_the_relay_can_send_fits_the_filter(settings):
    limits = settings.limits
    # A path at its limit in characters: a quoted local part (quotes, worst case every other
    # character escaped), every character 4 bytes of UTF-8, and MAIL's parameters.
    local = 2 + 4 * limits.address_local_part_max
    domain = 4 * (limits.address_path_max - 2 - limits.address_local_part_max - 1)
    mail = len("MAIL FROM:<@> SIZE= BODY=8BITMIME SMTPUTF8") + local + domain + 20
    assert mail <= limits.filter_command_bytes


# -- customer domains exactly -------------------------------------------------------------------


def _relay_domains_lookups(domain: str, parent_matches: bool) -> list[str]:
    """The keys Postfix looks a domain up with in a relay_domains table (postconf(5),
    parent_domain_matches_subdomains): with the feature listed, the parents as they are,
    else with a leading dot."""
    labels = domain.split(".")
    parents = [".".join(labels[i:]) for i in range(1, len(labels))]
    return [domain] + (parents if parent_matches else ["." + p for p in parents])


def test_subdomains_of_customers_are_not_customers(relay, settings, render):
    conf = _conf(relay(settings)["main"])
    listed = set(_items(conf["parent_domain_matches_subdomains"]))
    assert "relay_domains" not in listed
    assert listed == POSTFIX_PARENT_DEFAULT - {"relay_domains"}  # nothing else changed
    # The SQL table answers a key that is exactly a customer domain (no pattern match).
    query = render("relay/etc/postfix/pgsql/relay_domains.cf", settings)
    assert "WHERE name = '%s' AND active" in query
    customers = {c.domain for c in settings.customers}
    parent_matches = "relay_domains" in listed
    for domain, relayed in [("customer.example", True), ("sub.customer.example", False)]:
        keys = _relay_domains_lookups(domain, parent_matches)
        assert bool(customers & set(keys)) is relayed, keys


# -- clients: rates, trickle, ETRN, TLS ----------------------------------------------------------


def test_clients_are_rate_limited_except_the_towers_own(relay):
    s = sample_settings(
        limits={"client_connection_rate": 30, "client_limit_exempt": ["10.201.0.1/32"]}
    )
    conf = _conf(relay(s)["main"])
    assert conf["anvil_rate_time_unit"] == "60s"
    assert conf["smtpd_client_connection_rate_limit"] == "30"
    assert conf["smtpd_client_message_rate_limit"] == str(s.limits.client_message_rate)
    assert conf["smtpd_client_recipient_rate_limit"] == str(s.limits.client_recipient_rate)
    assert conf["smtpd_client_connection_count_limit"] == str(s.limits.client_connection_count)
    assert int(conf["smtpd_client_message_rate_limit"]) > 0
    assert _items(conf["smtpd_client_event_limit_exceptions"]) == ["$mynetworks", "10.201.0.1/32"]


def test_a_data_trickle_ends_within_about_a_request_timeout(relay, settings):
    conf = _conf(relay(settings)["main"])
    assert conf["smtpd_per_request_deadline"] == "yes"
    timeout = re.fullmatch(r"\$\{stress\?\{10s\}:\{(\d+)s\}\}", conf["smtpd_timeout"])
    assert timeout, conf["smtpd_timeout"]
    rate = int(conf["smtpd_min_data_rate"])
    # One byte a second earns 1/rate s a second: the deadline of DATA runs out after
    # timeout / (1 - 1/rate) seconds (issue 15: a session had lasted 13 minutes).
    assert int(timeout.group(1)) / (1 - 1 / rate) < 120


def test_etrn_is_refused(relay, settings):
    conf = _conf(relay(settings)["main"])
    assert conf["smtpd_etrn_restrictions"] == "reject"
    assert "etrn" in _items(conf["smtpd_discard_ehlo_keywords"])


def _postfix_cipherlist(conf: dict[str, str]) -> str:
    """The OpenSSL cipher list Postfix builds for a grade and its exclusions (tls_high_cipherlist
    of Postfix 3.7, then one "!name" per excluded cipher)."""
    assert conf["smtpd_tls_ciphers"] == "high"
    excluded = _items(conf["smtpd_tls_exclude_ciphers"])
    return "aNULL:-aNULL:HIGH:@STRENGTH" + "".join(f":!{name}" for name in excluded)


def test_tls_offers_only_authenticated_forward_secret_ciphers(relay, settings):
    conf = _conf(relay(settings)["main"])
    assert conf["smtpd_tls_mandatory_ciphers"] == "high"
    assert {"aNULL", "eNULL", "kRSA"} <= set(_items(conf["smtpd_tls_exclude_ciphers"]))
    assert conf["smtpd_tls_protocols"] == ">=TLSv1.2"
    # Expanded by the same OpenSSL library (Python's ssl), as Postfix's server would.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.set_ciphers(_postfix_cipherlist(conf))
    offered = {(c["kea"], c["auth"]) for c in ctx.get_ciphers()}
    assert offered
    assert {kea for kea, _ in offered} <= {"kx-ecdhe", "kx-dhe", "kx-any"}, offered  # 1.3: any
    assert not {auth for _, auth in offered} & {"auth-null", "auth-psk", "auth-srp"}, offered
    # Without the exclusions, the same grade would offer both kinds (what the finding saw).
    ctx.set_ciphers(_postfix_cipherlist({**conf, "smtpd_tls_exclude_ciphers": ""}))
    plain = {(c["kea"], c["auth"]) for c in ctx.get_ciphers()}
    assert ("kx-rsa", "auth-rsa") in plain and any(auth == "auth-null" for _, auth in plain)


# -- postmaster ----------------------------------------------------------------------------------


def test_postmaster_mail_reaches_the_operators(relay):
    s = sample_settings(postmaster="ops@customer.example")
    conf = _conf(relay(s)["main"])
    assert conf["virtual_alias_maps"] == (
        f"inline:{{ {{postmaster@{s.hostname}=ops@customer.example}} }}"
    )
    assert not conf["transport_maps"].startswith("inline:")
    # Notices go to "postmaster" (Postfix's default), which the alias above catches.
    for name in ("bounce_notice_recipient", "2bounce_notice_recipient", "error_notice_recipient"):
        assert name not in conf


def test_without_a_postmaster_its_mail_is_discarded_not_stuck(relay, settings):
    assert settings.postmaster is None
    conf = _conf(relay(settings)["main"])
    assert "virtual_alias_maps" not in conf
    first = _items(conf["transport_maps"])[0:3]
    assert first == ["inline:{", f"{settings.hostname}=discard:no-postmaster-mailbox", "}"]


# -- postscreen: the pregreet test, on port 25 only ---------------------------------------------

# Every postscreen parameter Postfix 3.7.11 knows (postconf -d on Debian 12): any other name is
# one Postfix only warns about ("unused parameter") and otherwise ignores. The 3.5 names
# (postscreen_blacklist_action, …) are not in it: 3.6 renamed them.
_POSTSCREEN_37 = """
    access_list allowlist_interfaces bare_newline_action bare_newline_enable bare_newline_ttl
    cache_cleanup_interval cache_map cache_retention_time client_connection_count_limit
    command_count_limit command_filter command_time_limit denylist_action disable_vrfy_command
    discard_ehlo_keyword_address_maps discard_ehlo_keywords dnsbl_action
    dnsbl_allowlist_threshold dnsbl_max_ttl dnsbl_min_ttl dnsbl_reply_map dnsbl_sites
    dnsbl_threshold dnsbl_timeout enforce_tls expansion_filter forbidden_commands greet_action
    greet_banner greet_ttl greet_wait helo_required non_smtp_command_action
    non_smtp_command_enable non_smtp_command_ttl pipelining_action pipelining_enable
    pipelining_ttl post_queue_limit pre_queue_limit reject_footer reject_footer_maps
    tls_security_level upstream_proxy_protocol upstream_proxy_timeout use_tls watchdog_timeout
"""
POSTSCREEN_PARAMETERS = set(_POSTSCREEN_37.split())


@dataclass
class Service:
    """One master.cf entry: its fields after name and type, and its -o options."""

    fields: list[str]
    options: dict[str, str]

    @property
    def command(self) -> str:
        return self.fields[5]


def _services(master: str) -> dict[tuple[str, str], Service]:
    """master.cf's services by (name, type), as `postconf -M` lists them."""
    services: dict[tuple[str, str], Service] = {}
    current: Service | None = None
    for line in master.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace():
            assert current is not None, line
            m = re.match(r"\s+-o (\w+)=(.*)$", line)
            assert m, f"not an option line: {line!r}"
            current.options[m.group(1)] = m.group(2)
            continue
        name, kind, *fields = line.split()
        assert (name, kind) not in services, f"{name}/{kind} twice"
        current = services[(name, kind)] = Service(fields, {})
    return services


def test_port_25_is_postscreen_handing_clients_to_an_smtpd(relay, settings):
    services = _services(relay(settings)["master"])
    screen = services[("smtp", "inet")]
    assert screen.command == "postscreen"
    assert screen.fields[4] == "1"  # one process screens every connection
    assert screen.options == {}  # it reads main.cf's mynetworks: the relay only
    assert services[("smtpd", "pass")].command == "smtpd"
    # postscreen's own engine offers STARTTLS to a client that failed, through tlsproxy.
    assert services[("tlsproxy", "unix")].command == "tlsproxy"
    # No DNS blocklist is queried, so there is no dnsblog to query it with.
    assert ("dnsblog", "unix") not in services


def test_only_port_25_is_screened(relay, settings):
    """The scanners' re-injection listener and the scan hop never pass through postscreen:
    it would make every scanner wait out the greeting, and hold scanned mail to its tests."""
    s = settings
    services = _services(relay(s)["master"])
    assert [key for key, svc in services.items() if svc.command == "postscreen"] == [
        ("smtp", "inet")
    ]
    assert services[(f"{s.hosts.relay}:{s.ports.reinject}", "inet")].command == "smtpd"
    assert services[("scan", "unix")].command == "smtp"
    assert "smtpd_service_name" not in _conf(relay(s)["main"])  # postscreen hands to "smtpd"


def test_the_screened_smtpd_is_the_public_listener_it_replaces(relay, settings):
    """The port 25 listener had no -o options: every restriction, limit and TLS setting of it
    is in main.cf, and the smtpd postscreen hands a client to (with the client's own
    connection, so its own address) applies all of them, overriding none."""
    out = relay(settings)
    assert _services(out["master"])[("smtpd", "pass")].options == {}
    conf = _conf(out["main"])
    for key in (
        "smtpd_relay_restrictions",
        "smtpd_recipient_restrictions",
        "smtpd_client_connection_rate_limit",
        "smtpd_client_event_limit_exceptions",
        "smtpd_tls_security_level",
        "smtpd_forbid_bare_newline",
        "content_filter",
    ):
        assert conf[key], key


def test_a_client_that_talks_before_the_greeting_is_refused(relay, settings):
    conf = _conf(relay(settings)["main"])
    assert conf["postscreen_greet_action"] == "enforce"  # 550 to every RCPT, logged
    assert conf["postscreen_greet_banner"]  # empty: no "220-" line, so nothing to talk before
    wait = re.fullmatch(r"\$\{stress\?\{(\d+)\}:\{(\d+)\}\}s", conf["postscreen_greet_wait"])
    assert wait and 0 < int(wait.group(1)) <= int(wait.group(2)) <= 10, conf
    # The tests that make a new client hang up and come back stay off.
    for test in ("pipelining", "non_smtp_command", "bare_newline"):
        assert conf[f"postscreen_{test}_enable"] == "no", test
    # A client in postscreen's own engine gets smtpd's time per command.
    assert conf["postscreen_command_time_limit"] == conf["smtpd_timeout"]


def test_postscreen_depends_on_no_outside_service(relay, settings):
    conf = _conf(relay(settings)["main"])
    assert conf["postscreen_dnsbl_sites"] == ""
    assert conf["postscreen_cache_map"] == "btree:$data_directory/postscreen_cache"
    assert conf["postscreen_greet_ttl"] and conf["postscreen_cache_retention_time"]


def test_clients_exempt_from_the_limits_still_take_the_pregreet_test(relay):
    """client_limit_exempt (the lab's controller and sender) are MTAs and test clients on the
    internet: they wait for the greeting like any client, and the lab's checks rely on it."""
    s = sample_settings(limits={"client_limit_exempt": ["10.201.0.1/32"]})
    conf = _conf(relay(s)["main"])
    assert _items(conf["postscreen_access_list"]) == ["permit_mynetworks"]
    assert conf["mynetworks"] == "127.0.0.0/8"
    assert "10.201.0.1/32" in _items(conf["smtpd_client_event_limit_exceptions"])
    assert conf["postscreen_denylist_action"] == "drop"


def test_postscreen_settings_are_postfix_37_parameters(relay, settings):
    conf = _conf(relay(settings)["main"])
    used = {k.removeprefix("postscreen_") for k in conf if k.startswith("postscreen_")}
    assert used, "no postscreen settings"
    assert used <= POSTSCREEN_PARAMETERS, used - POSTSCREEN_PARAMETERS
