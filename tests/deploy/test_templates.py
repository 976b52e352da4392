"""Every template renders from the one settings model, and says what the settings say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import all_templates, sample_settings

from mailtower.goc.eye.status import status_role
from mailtower.goc.sync.names import goc_sync_role
from mailtower.scanning.engines.icap import parse_icap_url
from mailtower.settings import AlertSettings, Backup, DnsServer, GocSettings, LabSender
from roles.dns import zone_file

# Data of the lab internet's roles (roles/dns.py, roles/lab_sender.py), as the inventory gives.
DNS = {
    "zones": ["lab", "201.10.in-addr.arpa"],
    "ns_name": "ns.lab",
    "ns_address": "10.201.0.53",
    "update_from": "10.201.0.1",
    "tsig": {"name": "mailtower-update", "algorithm": "hmac-sha256", "secret": "c2VjcmV0"},
}
SENDER = {"domain": "internet.lab", "resolver": "10.201.0.53", "submit_from": "10.201.0.1"}


# The GOC's mirror of ClamAV's official databases, with one database added beside the three.
CLAMAV = {
    "databases": {"main": 1, "daily": 2, "bytecode": 7, "extra": 0},
    "url": "https://mirror.example/clamav/",
    "nameserver": "192.0.2.53",
    "check_interval": "1h",
}


# The customers' quarantine portal (issue 18), on the GOC's address with its own certificate.
PORTAL = {
    "listen": "10.201.9.10:8027",
    "public_url": "https://portal.goc.example:8027",
    "mail_from": "quarantine@goc.example",
    "relays": ["10.1.0.21", "10.1.0.22:25"],
    "tls_self_signed": ["portal.goc.example", "10.201.9.10"],
}


def _goc() -> GocSettings:
    return GocSettings.model_validate(
        {
            "towers": [
                {"name": "tower-a", "sql": ["10.1.0.12", "10.1.0.13"], "monitor": "10.1.0.11"}
            ],
            "customers": [{"domain": "customer.example", "server": "192.0.2.25"}],
            "operators": {"operator": "operator-password-1"},
            "eye_tls_self_signed": ["eye.goc.example"],
            "portal": PORTAL,
            "secrets": {
                "eye_db": "e" * 16,
                "portal_db": "p" * 16,
                "portal_session_key": "k" * 64,
                "towers": {
                    "tower-a": {"sql_sync": "a" * 16, "goc_sync": "s" * 16, "goc_status": "t" * 16}
                },
            },
            "bundles": _bundle_keys(),
            "bundle_readers": ["10.201.0.1"],
            "clamav": CLAMAV,
        }
    )


def _bundle_keys() -> dict[str, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return {"signing_key": private.decode(), "public_key": public.decode()}


def _internet(path: str) -> dict:
    if path.startswith("goc/"):
        from roles.goc import CLAMAV_DIR, cvdupdate_run

        g = _goc()
        return {
            "goc": g,
            "publish_dir": "/srv/mailtower/bundles",
            "clamav_dir": CLAMAV_DIR,
            "port": 8026,
            "cvd": cvdupdate_run(g),
            "sync_role": goc_sync_role,
            "status_role": status_role,
        }
    if path.startswith("lab_clamav_upstream/"):
        return {
            "address": "10.201.0.53",
            "port": 80,
            "root": "/srv/clamav-upstream",
            "readers": ["10.201.9.10", "10.201.0.1"],
        }
    if path.startswith("dns/etc/bind/mailtower-update.key"):
        return {"key": DnsServer.model_validate(DNS).tsig}
    if path.startswith("scanner/etc/c-icap"):
        return {"icap": parse_icap_url("icap://127.0.0.1:1344/avscan"), "sig_dir": "/var/lib/x"}
    if path.startswith("dns/"):
        return {
            "internet": DnsServer.model_validate(DNS),
            "zone_file": zone_file,
            "zone": "lab",
        }
    if path.startswith("lab_sender/"):
        return {"internet": LabSender.model_validate(SENDER)}
    return {}


@pytest.mark.parametrize("path", all_templates())
def test_every_template_renders(render, settings, path):
    extra = {
        "tls_pem": "/t",
        "domain": "customer.example",
        "icap_control": None,
        "address": "192.0.2.12",  # a host's own tower address (the node exporter's)
        "alerts": AlertSettings(to=["ops@example.net"]),
        "backup": Backup(tls_dir="/t"),  # the backups' alert rules (monitor, with backup)
        "packages": ["clamav-daemon"],  # mailtower-engines-upgrade (roles/scanner.py)
        "record": "/var/lib/mailtower/engines-packages",
        "transport": "scan",  # mailtower-relay-upgrade (roles/relay.py)
        "drain_s": 120,
        **_internet(path),
    }
    out = render(path, settings, **extra)
    assert out.strip()
    assert not re.search(r"\{\{\s*s\.|\{%", out), "unrendered Jinja left in the output"


def test_dns_zones_take_signed_updates_from_the_controller_only(render, settings):
    local = render("dns/etc/bind/named.conf.local", settings, **_internet("dns/"))
    for zone in DNS["zones"]:
        block = local.split(f'zone "{zone}"')[1].split("\n};")[0]
        assert 'allow-update { !{ !10.201.0.1; any; }; key "mailtower-update"; };' in block
    options = render("dns/etc/bind/named.conf.options", settings, **_internet("dns/"))
    assert "recursion no;" in options


def test_dns_zone_seed_has_soa_ns_and_glue(render, settings):
    seed = render("dns/var/lib/bind/db.zone", settings, **_internet("dns/"))
    assert re.search(r"^@\s+IN SOA\s+ns\.lab\. ", seed, re.M)
    assert re.search(r"^ns\s+IN A\s+10\.201\.0\.53$", seed, re.M)


def test_sender_relays_only_for_the_controller(render, settings):
    cf = render("lab_sender/etc/postfix/main.cf", settings, **_internet("lab_sender/"))
    conf = dict(re.findall(r"^(\w+) = ?(.*)$", cf, re.M))
    assert conf["mynetworks"] == "127.0.0.0/8 10.201.0.1/32"
    assert conf["smtpd_relay_restrictions"] == "permit_mynetworks, reject"
    assert conf["relayhost"] == ""


def test_main_cf_follows_settings(render):
    s = sample_settings(limits={"queue_lifetime": "5d", "minimal_backoff": "1m"})
    cf = render("relay/etc/postfix/main.cf", s, tls_pem="/t")
    conf = dict(re.findall(r"^(\w+) = ?(.*)$", cf, re.M))
    assert conf["maximal_queue_lifetime"] == "5d"
    assert conf["minimal_backoff_time"] == "1m"
    assert conf["content_filter"] == f"scan:[127.0.0.1]:{s.ports.filter}"
    assert conf["smtpd_forbid_bare_newline"] == "reject"
    assert conf["mynetworks"] == "127.0.0.0/8"
    assert conf["mydestination"] == ""
    assert int(conf["queue_minfree"]) >= s.limits.message_size_bytes * 1.5


def test_reinjection_listener_trusts_only_scanners_and_the_monitor(render, settings):
    master = render("relay/etc/postfix/master.cf", settings)
    block = master.split(f"{settings.hosts.relay}:{settings.ports.reinject} inet")[1].split(
        "\npickup"
    )[0]
    scanners = ",".join(str(ip) for ip in settings.hosts.scanners)
    # the monitor re-injects the quarantined messages the portal releases
    assert f"-o mynetworks={scanners},{settings.hosts.monitor}\n" in block
    # XFORWARD (a message's original client) is believed from the scanners only
    assert f"-o smtpd_authorized_xforward_hosts={scanners}\n" in block
    assert "-o content_filter=" in block
    assert "smtpd_client_restrictions=permit_mynetworks,reject" in block


@pytest.mark.parametrize("count", [1, 23])
def test_reinjection_listener_has_a_process_for_every_kept_connection(render, count):
    s = sample_settings(scanners=count)
    master = render("relay/etc/postfix/master.cf", s)
    line = next(ln for ln in master.splitlines() if ln.startswith(f"{s.hosts.relay}:"))
    maxproc = int(line.split()[6])
    # scand keeps up to scan_concurrency (+ one per worker, rounding) connections per scanner
    assert maxproc >= count * (s.limits.scan_concurrency + 2)
    assert line.split()[7] == "smtpd"


@pytest.mark.parametrize("count", [1, 5, 23])
def test_haproxy_pool_has_every_scanner(render, count):
    s = sample_settings(scanners=count)
    cfg = render("relay/etc/haproxy/haproxy.cfg", s)
    servers = re.findall(r"^\s+server (s\d\d) ([\d.]+):(\d+)$", cfg, re.M)
    assert [name for name, _, _ in servers] == [s.scanner_name(i) for i in range(count)]
    assert {port for _, _, port in servers} == {str(s.ports.filter)}
    assert f"ipv4@{s.hosts.relay}:{s.ports.haproxy_runtime} level admin" in cfg


def test_nftables_restricts_runtime_api_to_the_monitor(render, settings):
    rules = render("relay/etc/nftables.conf", settings)
    assert (
        f"tcp dport {settings.ports.haproxy_runtime} ip saddr != {settings.hosts.monitor} reject"
        in rules
    )
    assert f"tcp dport {settings.ports.reinject} ip saddr != @reinjectors reject" in rules
    reinjectors = rules.split("set reinjectors {")[1].split("}")[0]
    addresses = {str(ip) for ip in (*settings.hosts.scanners, settings.hosts.monitor)}
    assert set(re.findall(r"[\d.]+\.\d+", reinjectors)) == addresses


def test_pg_hba_lists_only_tower_hosts(render, settings):
    hba = render("sql/etc/postgresql/15/main/pg_hba.conf", settings)
    addresses = set(re.findall(r"(\d+\.\d+\.\d+\.\d+)/32", hba)) - {"127.0.0.1"}
    tower = {
        str(settings.hosts.relay),
        str(settings.hosts.monitor),
        *map(str, settings.hosts.sql),
        *map(str, settings.hosts.scanners),
    }
    assert addresses == tower
    assert "trust" not in hba and " md5" not in hba


def test_customers_sql_routes_each_customer(render):
    s = sample_settings(
        customers=[
            {"domain": "a.example", "server": "10.0.0.5", "port": 2525},
            {"domain": "b.example", "server": "mx.b.example"},
        ]
    )
    sql = render("sql/etc/mailtower/sql/customers.sql", s)
    assert "'smtp:[10.0.0.5]:2525'" in sql and "'smtp:[mx.b.example]:25'" in sql


def test_prometheus_scrapes_every_scanner(render, settings):
    cfg = render("monitor/etc/prometheus/prometheus.yml", settings)
    for ip in settings.hosts.scanners:
        assert f'"{ip}:{settings.ports.scanner_http}"' in cfg


def test_clamd_stream_limit_follows_message_size(render):
    s = sample_settings(limits={"message_size_bytes": 12345678})
    conf = render("scanner/etc/clamav/clamd.conf", s)
    # The whole message as scand has it: the relay's limit with the relay's headers.
    assert s.limits.filter_message_bytes > 12345678
    assert f"StreamMaxLength {s.limits.filter_message_bytes}\n" in conf
    assert f"MaxFileSize {s.limits.filter_message_bytes}\n" in conf


def test_scanner_takes_mail_from_the_relay_only(render, settings):
    rules = render("scanner/etc/nftables.conf", settings)
    relay, monitor = settings.hosts.relay, settings.hosts.monitor
    assert f"tcp dport {settings.ports.filter} ip saddr != {{ {relay} }} reject" in rules
    # With rule bundles, the monitor sends its canaries to the filter port too.
    with_bundles = settings.model_copy(update={"bundles": object()})
    rules_b = render("scanner/etc/nftables.conf", with_bundles)
    port = settings.ports.filter
    assert f"tcp dport {port} ip saddr != {{ {relay}, {monitor} }} reject" in rules_b
    health = f"tcp dport {settings.ports.scanner_http} ip saddr != {{ {settings.hosts.monitor},"
    assert health in rules


def test_c_icap_scans_everything_in_simple_mode_and_fails_closed(render, settings):
    conf = render("scanner/etc/c-icap/c-icap.conf", settings, **_internet("scanner/etc/c-icap"))
    assert "Port 127.0.0.1:1344" in conf
    assert "virus_scan.PassOnError off" in conf
    assert "ServiceAlias avscan virus_scan?allow204=on&sizelimit=off&mode=simple" in conf
    assert "virus_scan.DefaultEngine clamav" in conf


def test_sigsync_reloads_c_icap_only_when_it_runs_one(render, settings):
    unit = "scanner/etc/systemd/system/mailtower-sigsync.service"
    assert "--icap-control" not in render(unit, settings, icap_control=None)
    with_icap = render(unit, settings, icap_control="/run/c-icap/c-icap.ctl")
    assert "--icap-control /run/c-icap/c-icap.ctl" in with_icap


def test_goc_lets_each_tower_host_in_by_address_only(render, settings):
    g = _goc()
    hba = render(
        "goc/etc/postgresql/15/main/pg_hba.conf",
        settings,
        goc=g,
        sync_role=goc_sync_role,
        status_role=status_role,
    )
    rows = [line.split() for line in hba.splitlines() if line and not line.startswith("#")]
    # Each tower logs in as its own roles: no role (and so no password) shared between towers.
    assert ["host", "goc", "mt_sync_tower_a", "10.1.0.12/32", "scram-sha-256"] in rows
    assert ["host", "goc", "mt_sync_tower_a", "10.1.0.13/32", "scram-sha-256"] in rows
    assert ["host", "goc", "mt_status_tower_a", "10.1.0.11/32", "scram-sha-256"] in rows
    assert not any(r[2] in ("mt_sync", "mt_status") for r in rows if r[0] == "host")
    assert ["host", "goc", "mt_eye", "127.0.0.1/32", "scram-sha-256"] in rows
    assert not any(r[0] == "host" and r[3].endswith("/0") for r in rows)
    conf = render("goc/etc/postgresql/15/main/conf.d/mailtower.conf", settings, goc=g)
    assert "wal_level = logical" in conf
    assert "tcp_keepalives_idle = 60" in conf


def test_tower_sql_has_room_for_stranded_connections_and_ends_them(render, settings):
    """A site cut strands each scanner's two connections (the lab's CI filled 100 slots: the
    relay's lookups then failed over to the standby): room for three generations, and TCP
    keepalives end stranded backends in minutes, not the kernel's 2 h."""
    conf = render("sql/etc/postgresql/15/main/conf.d/mailtower.conf", settings)
    scanners = len(settings.hosts.scanners)
    assert f"max_connections = {max(100, 6 * scanners + 50)}" in conf
    for line in ("tcp_keepalives_idle = 60", "tcp_keepalives_interval = 10"):
        assert line in conf
    many = settings.model_copy(
        update={
            "hosts": settings.hosts.model_copy(
                update={"scanners": [f"10.9.0.{i}" for i in range(1, 24)]}
            )
        }
    )
    conf = render("sql/etc/postgresql/15/main/conf.d/mailtower.conf", many)
    assert "max_connections = 188" in conf


def test_goc_serves_bundles_read_only_to_monitors_and_readers(render, settings):
    site = render(
        "goc/etc/nginx/sites-enabled/mailtower-bundles",
        settings,
        goc=_goc(),
        publish_dir="/srv/mailtower/bundles",
        clamav_dir="/srv/mailtower/clamav",
        port=8026,
    )
    assert "listen 0.0.0.0:8026;" in site
    assert "root /srv/mailtower/bundles;" in site
    lines = [line.split("#")[0].strip() for line in site.splitlines()]
    allowed = [line.split()[1].rstrip(";") for line in lines if line.startswith("allow ")]
    assert allowed == ["10.1.0.11", "10.201.0.1", "127.0.0.1"]
    # Every address not allowed is refused, and only reads are served.
    assert lines.index("deny all;") > lines.index("allow 127.0.0.1;")
    assert "limit_except GET {" in lines
    assert "location ~ /\\. {" in lines


def _tls_pair(tmp_path) -> tuple[str, str]:
    """A certificate and its key as PEM text, as an operator would paste them into secrets."""
    import subprocess

    from roles.goc import self_signed_commands

    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    for command in self_signed_commands(["eye.example"], str(cert), str(key)):
        subprocess.run(command, shell=True, check=True, capture_output=True)
    return cert.read_text(), key.read_text()


def _goc_with(**tls) -> GocSettings:
    """The test GOC with only these VirusEye TLS settings."""
    data = _goc().model_dump(mode="json")
    data.pop("eye_tls_self_signed")
    return GocSettings.model_validate({**data, **tls})


@pytest.mark.parametrize(
    ("tls", "expected"),
    [
        (
            {"eye_tls_self_signed": ["eye.goc.example", "10.201.9.10"]},
            "--tls-cert /etc/mailtower/eye/tls.crt --tls-key /etc/mailtower/eye/tls.key",
        ),
        (
            {"eye_tls_cert": "/etc/ssl/eye.pem", "eye_tls_key": "/etc/ssl/eye.key"},
            "--tls-cert /etc/ssl/eye.pem --tls-key /etc/ssl/eye.key",
        ),
        (
            {"eye_origin": "https://eye.goc.example", "eye_listen": "127.0.0.1:8025"},
            "--listen 127.0.0.1:8025 --origin https://eye.goc.example",
        ),
    ],
)
def test_viruseye_serves_https_only(render, settings, tls, expected):
    unit = render("goc/etc/systemd/system/mailtower-eye.service", settings, goc=_goc_with(**tls))
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_start.endswith(expected)
    # What the unit runs is what the server accepts (no plain HTTP off loopback).
    from mailtower.goc.eye.__main__ import plain_http_refused

    listen = exec_start.split("--listen ")[1].split()[0]
    origin = exec_start.split("--origin ")[1] if "--origin" in exec_start else None
    assert plain_http_refused(listen.rpartition(":")[0], "--tls-cert" in exec_start, origin) is None


def test_viruseye_certificate_given_as_pem_text(render, settings, tmp_path):
    cert, key = _tls_pair(tmp_path)
    g = _goc_with(eye_tls_cert=cert, eye_tls_key=key)
    assert g.eye_tls() == ("/etc/mailtower/eye/tls.crt", "/etc/mailtower/eye/tls.key")
    unit = render("goc/etc/systemd/system/mailtower-eye.service", settings, goc=g)
    assert "BEGIN" not in unit  # the key goes to a 0600 file, never into the unit


@pytest.mark.parametrize(
    ("tls", "error"),
    [
        ({}, "HTTPS only"),
        ({"eye_tls_cert": "/etc/ssl/eye.pem"}, "go together"),
        (
            {"eye_tls_cert": "/c", "eye_tls_key": "/k", "eye_tls_self_signed": ["eye.example"]},
            "exactly one",
        ),
        ({"eye_tls_self_signed": ["eye.example"], "eye_origin": "https://e.x"}, "exactly one"),
        ({"eye_tls_self_signed": ["eye.example'; rm -rf /"]}, "not a DNS name or an address"),
        ({"eye_origin": "https://eye.example", "eye_listen": "0.0.0.0:8025"}, "must be loopback"),
        ({"eye_origin": "http://eye.example"}, "should match pattern"),
    ],
)
def test_viruseye_tls_settings_checked(tls, error):
    with pytest.raises(ValueError, match=error):
        _goc_with(**tls)


def test_viruseye_pem_text_checked(tmp_path):
    cert, key = _tls_pair(tmp_path)
    _other_cert, other_key = _tls_pair(tmp_path)  # a second pair (the files are rewritten)
    with pytest.raises(ValueError, match="is not the key of eye_tls_cert"):
        _goc_with(eye_tls_cert=cert, eye_tls_key=other_key)
    with pytest.raises(ValueError, match="both PEM text"):
        _goc_with(eye_tls_cert=cert, eye_tls_key="/etc/ssl/eye.key")
    with pytest.raises(ValueError, match="both PEM text"):  # the key would go into the unit
        _goc_with(eye_tls_cert="/etc/ssl/eye.pem", eye_tls_key=key)
    with pytest.raises(ValueError, match="not a PEM certificate and an unencrypted key"):
        _goc_with(eye_tls_cert="-----BEGIN CERTIFICATE-----\nnope\n", eye_tls_key=key)


def test_self_signed_certificate_names_addresses_as_ip():
    from roles.goc import self_signed_commands

    command = self_signed_commands(["eye.goc.example", "10.201.9.10", "fe80::1"], "/c", "/k")[0]
    assert "-subj '/CN=eye.goc.example'" in command
    assert "subjectAltName=DNS:eye.goc.example,IP:10.201.9.10,IP:fe80::1" in command


def test_goc_bundle_keys_must_be_one_pair():
    from mailtower.settings import BundleKeys

    one, other = _bundle_keys(), _bundle_keys()
    BundleKeys(**one)
    with pytest.raises(ValueError, match="is not the public half of signing_key"):
        BundleKeys(signing_key=one["signing_key"], public_key=other["public_key"])
    with pytest.raises(ValueError, match="not PEM"):
        BundleKeys(signing_key="nope", public_key=one["public_key"])


def test_lab_goc_data_serves_bundles_to_the_controller(monkeypatch, tmp_path):
    from inventory._lab import goc_data
    from mailtower.controller.lab import plan

    monkeypatch.setattr(plan, "STATE_DIR", tmp_path / "lab")  # not the real lab's keys
    g = GocSettings.model_validate(goc_data())
    assert g.bundles is not None and g.bundles.port == 8026
    assert [str(ip) for ip in g.bundle_readers] == ["10.201.0.1"]
    assert (tmp_path / "lab" / "bundle-keys" / "signing.pub").read_text() == g.bundles.public_key
    # VirusEye over HTTPS, for the address the controller's checks and browser use.
    assert g.eye_tls() == ("/etc/mailtower/eye/tls.crt", "/etc/mailtower/eye/tls.key")
    assert g.eye_tls_self_signed[0] == str(plan.goc_host().address)


def test_lab_goc_admits_each_tower_as_its_own_roles_only(monkeypatch, tmp_path, render, settings):
    from inventory._lab import goc_data
    from mailtower.controller.lab import plan
    from roles.goc import sync_side

    monkeypatch.setattr(plan, "STATE_DIR", tmp_path / "lab")  # not the real lab's secrets
    g = GocSettings.model_validate(goc_data())
    rendered = {
        path: render(path, settings, **{**_internet(path), "goc": g})
        for path in all_templates()
        if path.startswith("goc/")
    }
    hba = rendered["goc/etc/postgresql/15/main/pg_hba.conf"]
    rows = [line.split() for line in hba.splitlines() if line and not line.startswith("#")]
    hosts = [r for r in rows if r[0] == "host"]
    want = [["host", "goc", "mt_eye", "127.0.0.1/32", "scram-sha-256"]]
    # the lab serves the quarantine portal, whose role connects from the GOC itself only
    assert g.portal is not None
    want.append(["host", "goc", "mt_portal", "127.0.0.1/32", "scram-sha-256"])
    for t in g.towers:
        key = t.name.replace("-", "_")
        want += [["host", "goc", f"mt_sync_{key}", f"{ip}/32", "scram-sha-256"] for ip in t.sql]
        want.append(["host", "goc", f"mt_status_{key}", f"{t.monitor}/32", "scram-sha-256"])
    assert hosts == want
    assert {t.name for t in g.towers} == {"lab-a", "lab-b"}
    # goc.json: each tower's own passwords, none shared with another tower.
    side = sync_side(g)
    passwords = [
        p for t in side.towers for p in (t.sync_password, t.goc_sync_password, t.status_password)
    ]
    assert len(set(passwords)) == len(passwords) == 6


def test_rule_bundle_alerts_only_with_bundles(render, settings):
    import re

    from mailtower.settings import Bundles, Goc

    pem = (
        "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n"
    )
    with_bundles = settings.model_copy(
        update={
            "goc": Goc(address="10.0.9.10"),
            "rules_dir": "/var/lib/mailtower/rules",
            "bundles": Bundles(public_key=pem + "-----END PUBLIC KEY-----\n"),
        }
    )

    def alerts(s) -> dict[str, str]:
        """Alert name → its block of the rendered rules file."""
        text = render("monitor/etc/prometheus/rules/mailtower.yml", s)
        blocks = re.split(r"\n(?=      - alert: )", text)[1:]
        return {b.split()[2]: b for b in blocks}

    plain, bundled = alerts(settings), alerts(with_bundles)
    for s in (settings, with_bundles):  # one alert of that name, whichever applies
        text = render("monitor/etc/prometheus/rules/mailtower.yml", s)
        assert text.count("- alert: ScannerRulesBehind\n") == 1
    assert "mailtower_rules_bundle_version" in plain["ScannerRulesBehind"]
    assert "mailtower_rules_target" in bundled["ScannerRulesBehind"]
    assert "for: 15m" in bundled["ScannerRulesBehind"]
    added = {"RuleBundleRejected", "RuleBundlesUnreachable", "ScannerStuckAfterRuleUpdate"}
    assert added <= set(bundled) and not added & set(plain)


def test_clamav_alerts_and_mirror_only_with_clamav(render, settings):
    from mailtower.settings import ClamavMirror, Goc

    with_clamav = settings.model_copy(
        update={"goc": Goc(address="10.0.9.10"), "clamav": ClamavMirror(max_age="2d")}
    )

    def alerts(s) -> dict[str, str]:
        text = render("monitor/etc/prometheus/rules/mailtower.yml", s)
        blocks = re.split(r"\n(?=      - alert: )", text)[1:]
        return {b.split()[2]: b for b in blocks}

    plain, clamav = alerts(settings), alerts(with_clamav)
    added = {
        "ScannerClamavBehind",
        "ClamavMirrorOld",
        "ClamavUpstreamRefusing",
        "ClamavSetRejected",
        "ScannerStuckAfterClamavUpdate",
        "ClamavMirrorUnreachable",
    }
    assert added <= set(clamav) and not added & set(plain)
    assert "for: 2h" in clamav["ScannerClamavBehind"]  # lag_alert_after
    assert "mailtower_clamav_mirror_age_seconds > 172800\n" in clamav["ClamavMirrorOld"]
    assert "http://10.0.9.10:8026/clamav" in clamav["ClamavMirrorUnreachable"]
    unit = _unit_service(
        render("monitor/etc/systemd/system/mailtower-monitor.service", with_clamav)
    )
    assert unit["ReadWritePaths"] == "/srv/mailtower/mirror/official"
    assert unit["StateDirectory"] == "mailtower-monitor" and unit["PrivateTmp"] == "yes"
    assert "ReadWritePaths" not in _unit_service(
        render("monitor/etc/systemd/system/mailtower-monitor.service", settings)
    )


FIREWALLS = [
    "relay/etc/nftables.conf",
    "scanner/etc/nftables.conf",
    "monitor/etc/nftables.conf",
    "sql/etc/nftables.conf",
]


@pytest.mark.parametrize("path", FIREWALLS)
def test_ssh_answers_only_the_operators(render, path):
    """Root SSH on a tower host is for its operators, not the internet (issue 15, low)."""
    s = sample_settings(operator_networks=["198.51.100.0/28", "203.0.113.7/32"])
    rules = render(path, s)
    assert (
        "tcp dport 22 ct state new ip saddr != { 198.51.100.0/28, 203.0.113.7/32 } "
        "reject with tcp reset" in rules
    )
    # Without operator networks SSH is left as it was: a deploy must not lock its own
    # controller out.
    assert "dport 22" not in render(path, sample_settings())


def test_monitor_operator_interfaces_answer_operators_and_itself_only(render):
    s = sample_settings(operator_networks=["198.51.100.0/28"])
    rules = render("monitor/etc/nftables.conf", s)
    assert (
        f"tcp dport {{ {s.ports.prometheus}, {s.ports.alertmanager}, {s.ports.monitor_http} }}"
        " ip saddr != "
        f"{{ 127.0.0.1, {s.hosts.monitor}, 198.51.100.0/28 }} reject with tcp reset" in rules
    )
    mirror = next(ln for ln in rules.splitlines() if f"dport {s.ports.mirror_http}" in ln)
    assert all(str(ip) in mirror for ip in s.hosts.scanners)
    assert "198.51.100" not in mirror and str(s.hosts.relay) + "," not in mirror


@pytest.mark.parametrize("path", FIREWALLS)
def test_firewalls_are_valid_nft(render, path, tmp_path):
    """nft itself checks each rendered ruleset (as the deploy does before loading it)."""
    import shutil
    import subprocess

    if shutil.which("nft") is None:
        import needs

        needs.missing("nft (package nftables)")
    s = sample_settings(operator_networks=["198.51.100.0/28", "203.0.113.7/32"], bundles=None)
    conf = tmp_path / "nftables.conf"
    conf.write_text(render(path, s))
    done = subprocess.run(["nft", "-c", "-f", str(conf)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_message_set_aside_alerts(render, settings):
    text = render("monitor/etc/prometheus/rules/mailtower.yml", settings)
    block = text.split("- alert: MessageSetAside\n")[1].split("- alert:")[0]
    assert 'mailtower_messages_total{verdict="unprocessable"}' in block
    assert "3600 s" in block  # the limit as the settings give it


def _unit_service(text: str) -> dict[str, str]:
    """The [Service] section of a systemd unit (one value per key)."""
    section = text.split("[Service]\n", 1)[1].split("\n[", 1)[0]
    return dict(
        line.split("=", 1) for line in section.splitlines() if line and not line.startswith("#")
    )


def test_the_relay_orderer_is_root_with_only_what_postsuper_needs(render, settings):
    """Issue 15 (low): the orderer ran as root with every capability. postsuper refuses any
    other user, so it stays root, with the capabilities postsuper and the queue need, a
    read-only system, and no way to gain more."""
    from mailtower.relay import order

    unit = _unit_service(render("relay/etc/systemd/system/mailtower-relay-order.service", settings))
    assert "User" not in unit
    assert set(unit["CapabilityBoundingSet"].split()) == {
        "CAP_SETUID",  # postsuper becomes the postfix user to move queue files
        "CAP_SETGID",
        "CAP_DAC_READ_SEARCH",  # the 0700 queue directories, postqueue's sockets
    }
    assert unit["NoNewPrivileges"] == "yes"
    assert unit["ProtectSystem"] == "strict"
    assert unit["ReadWritePaths"].split() == [str(order.SPOOL)]
    # Its state file is in the one other place it may write.
    assert order.STATE.parent == Path("/var/lib") / unit["StateDirectory"]


def test_the_relay_exporter_is_not_root(render, settings):
    unit = _unit_service(
        render("relay/etc/systemd/system/mailtower-relay-exporter.service", settings)
    )
    assert unit["User"] == "mailtower"
    assert unit["CapabilityBoundingSet"] == "CAP_DAC_READ_SEARCH"


def test_every_monitor_metric_an_alert_reads_is_exported_under_that_name(render, settings):
    """An alert on a name the monitor does not export never fires: a Counter is exported as
    <name>_total (the rule-bundle and ClamAV pull alerts once read <name>)."""
    from mailtower.monitor.metrics import MonitorMetrics
    from mailtower.monitor.pool import Pool
    from mailtower.settings import Bundles, ClamavMirror, Goc

    pem = (
        "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n"
        "-----END PUBLIC KEY-----\n"
    )
    full = settings.model_copy(
        update={
            "goc": Goc(address="10.0.9.10"),
            "rules_dir": "/var/lib/mailtower/rules",
            "bundles": Bundles(public_key=pem),
            "clamav": ClamavMirror(databases=["test"]),
        }
    )
    text = render("monitor/etc/prometheus/rules/mailtower.yml", full)
    read = {
        name
        for line in text.splitlines()
        if line.strip().startswith("expr:")
        for name in re.findall(r"mailtower_[a-z_]+", line)
    }
    pool = Pool([("s01", "10.0.0.5")], fail_after=2, recover_after=2)
    metrics = MonitorMetrics(pool, goc=True, bundles=True, clamav=["test"])
    families = {f.name: f for f in metrics.registry.collect()}
    exported = {s.name for f in families.values() for s in f.samples} | set(families)
    ours = {n for n in read if n.removesuffix("_total") in families}
    assert ours, read  # the check reads the monitor's own metrics at all
    # a counter's family name is not a series: <name>_total is
    counters = {name for name, family in families.items() if family.type == "counter"}
    wrong = {n for n in ours if n not in exported or n in counters}
    assert not wrong, sorted(wrong)


def test_scand_may_write_its_policy_snapshot_and_nothing_new_beside(render, settings):
    """scand rewrites the customers' policy snapshot by a rename in its directory: that
    directory must be writable under ProtectSystem=strict (else: 451 for every message)."""
    unit = _unit_service(render("scanner/etc/systemd/system/mailtower-scand.service", settings))
    assert unit["ProtectSystem"] == "strict"
    writable = unit["ReadWritePaths"].split()
    assert settings.policy_snapshot_dir == "/var/lib/mailtower"
    assert writable[:2] == [settings.spool_dir, settings.policy_snapshot_dir]


# -- the quarantine portal (issue 18) ----------------------------------------------------------


def _goc_portal(**portal) -> GocSettings:
    data = _goc().model_dump(mode="json")
    data["portal"] = {k: v for k, v in {**PORTAL, **portal}.items() if v is not None}
    return GocSettings.model_validate(data)


@pytest.mark.parametrize(
    ("tls", "expected"),
    [
        ({}, "--tls-cert /etc/mailtower/portal/tls.crt --tls-key /etc/mailtower/portal/tls.key"),
        (
            {"tls_self_signed": None, "tls_cert": "/etc/ssl/p.pem", "tls_key": "/etc/ssl/p.key"},
            "--tls-cert /etc/ssl/p.pem --tls-key /etc/ssl/p.key",
        ),
        (
            {
                "tls_self_signed": None,
                "origin": "https://portal.goc.example",
                "listen": "127.0.0.1:8027",
            },
            "--origin https://portal.goc.example",
        ),
    ],
)
def test_portal_unit_serves_https_only(render, settings, tls, expected):
    from mailtower.goc.eye.__main__ import plain_http_refused
    from mailtower.goc.portal.__main__ import main

    g = _goc_portal(**tls)
    unit = render("goc/etc/systemd/system/mailtower-portal.service", settings, goc=g)
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert expected in exec_start
    assert "user=mt_portal" in exec_start and "PGPASSFILE=/etc/mailtower/portal/pgpass" in unit
    assert "--relay 10.1.0.21 --relay 10.1.0.22:25" in exec_start
    assert "--public-url https://portal.goc.example:8027" in exec_start
    assert "NoNewPrivileges=yes" in unit and "ProtectSystem=strict" in unit
    listen = exec_start.split("--listen ")[1].split()[0]
    assert (
        plain_http_refused(listen.rpartition(":")[0], "--tls-cert" in exec_start, g.portal.origin)
        is None
    )
    # The unit's arguments are the program's: --help parses them all or exits 2.
    import shlex

    argv = shlex.split(exec_start.removeprefix("ExecStart="))[1:]
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--help"])
    assert exited.value.code == 0


def test_portal_role_in_pg_hba_only_with_the_portal(render, settings):
    from mailtower.goc.eye.status import status_role as status

    def rows(g):
        hba = render(
            "goc/etc/postgresql/15/main/pg_hba.conf",
            settings,
            goc=g,
            sync_role=goc_sync_role,
            status_role=status,
        )
        return [line.split() for line in hba.splitlines() if line and not line.startswith("#")]

    assert ["host", "goc", "mt_portal", "127.0.0.1/32", "scram-sha-256"] in rows(_goc())
    data = _goc().model_dump(mode="json")
    data.pop("portal")
    assert not any("mt_portal" in r for r in rows(GocSettings.model_validate(data)))


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"portal_db": None}, "secrets.portal_db"),
        ({"portal_session_key": None}, "secrets.portal_session_key"),
        ({"portal_db": "e" * 16}, "shared with no role"),
    ],
)
def test_portal_needs_its_own_secrets(change, error):
    data = _goc().model_dump(mode="json")
    data["secrets"].update(change)
    with pytest.raises(ValueError, match=error):
        GocSettings.model_validate(data)


@pytest.mark.parametrize(
    ("portal", "error"),
    [
        ({"listen": "10.201.9.10:8025"}, "port 8025 is eye_listen's"),
        ({"listen": "10.201.9.10:8026"}, "the bundles' port"),
        ({"origin": "https://p.example"}, "exactly one"),
        ({"relays": ["relay.example:smtp"]}, "not HOST or HOST:PORT"),
        ({"relays": []}, "at least 1"),
        ({"tls_self_signed": ["x'; rm -rf /"]}, "not a DNS name"),
        ({"public_url": "http://portal.example"}, "should match pattern"),
    ],
)
def test_portal_settings_checked(portal, error):
    with pytest.raises(ValueError, match=error):
        _goc_portal(**portal)


def test_backup_port_admits_only_the_other_side(render) -> None:
    s = sample_settings(backup={"tls_dir": "/tmp/x", "port": 8432})
    sql = render("sql/etc/nftables.conf", s)
    assert f"tcp dport 8432 ip saddr != {{ 127.0.0.1, {s.hosts.monitor} }} reject" in sql
    monitor = render("monitor/etc/nftables.conf", s)
    pair = ", ".join(str(a) for a in s.hosts.sql)
    assert f"tcp dport 8432 ip saddr != {{ 127.0.0.1, {pair} }} reject" in monitor
    none = sample_settings()
    assert "8432" not in render("sql/etc/nftables.conf", none)
    assert "8432" not in render("monitor/etc/nftables.conf", none)


def test_relay_reload_decision_matches_the_rendered_listening_lines(render, settings):
    """roles/relay reloads Postfix (the queue and sessions kept) unless main.cf's listening
    lines differ from these, which only a restart applies: they must be what is rendered."""
    from roles.relay import LISTENING

    # cert/key: this template's arguments before issue 19's certificates, tls_pem after
    cf = render("relay/etc/postfix/main.cf", settings, cert="/c", key="/k", tls_pem="/t")
    assert sorted(re.findall(r"^inet_\w+ = .*$", cf, re.M)) == LISTENING


def test_monitor_keeps_its_records_with_or_without_clamav(render, settings):
    """The rolling upgrade's record of scanners kept out lives in the monitor's StateDirectory
    (mailtower.monitor.rollout.stack.STATE_DIR), so every monitor has one."""
    from mailtower.monitor.rollout.stack import STATE_DIR

    unit = _unit_service(render("monitor/etc/systemd/system/mailtower-monitor.service", settings))
    assert STATE_DIR.parent == Path("/var/lib") / unit["StateDirectory"]
    rules = render("monitor/etc/prometheus/rules/mailtower.yml", settings)
    assert "expr: mailtower_upgrade_scanners_stuck > 0" in rules
