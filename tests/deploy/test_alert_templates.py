"""Alerts (issue 19): the monitor's Alertmanager configuration, checked by amtool and run for
real against two local SMTP servers (the tower's relay and the fallback); the rules checked by
promtool; node exporter ports open to the monitor only; the relay letting the monitor reach
the operators' mailboxes and nothing else."""

from __future__ import annotations

import contextlib
import email
import email.policy
import json
import re
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from conftest import sample_settings
from needs import missing

from mailtower.settings import AlertSettings, Bundles, Goc, TowerSettings

ALERTMANAGER = "/usr/bin/prometheus-alertmanager"
AMTOOL = "/usr/bin/amtool"
PROMTOOL = "/usr/bin/promtool"
POSTMAP = "/usr/sbin/postmap"
TMPL = "/etc/prometheus/alertmanager_templates/mailtower.tmpl"
OPS = ["ops@example.net", "oncall@example.org"]


def alert_settings(**alerts) -> TowerSettings:
    return sample_settings(alerts={"to": OPS, **alerts})


def program(path: str, package: str) -> str:
    if not Path(path).exists():
        missing(f"{Path(path).name} (package {package})")
    return path


def write_alertmanager(render, s: TowerSettings, tmp_path: Path) -> Path:
    """alertmanager.yml and its mail templates as the deploy writes them, in ``tmp_path``."""
    (tmp_path / "mailtower.tmpl").write_text(
        render("monitor/etc/prometheus/alertmanager_templates/mailtower.tmpl", s)
    )
    yml = render("monitor/etc/prometheus/alertmanager.yml", s, alerts=s.alerts)
    assert TMPL in yml
    path = tmp_path / "alertmanager.yml"
    path.write_text(yml.replace(TMPL, str(tmp_path / "mailtower.tmpl")))
    return path


def amtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [program(AMTOOL, "prometheus-alertmanager"), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


# -- settings -----------------------------------------------------------------------------------


def test_the_fallback_cannot_be_the_towers_own_relay():
    for own in ("192.0.2.10", "mx.tower-x.example.net"):
        with pytest.raises(ValueError, match="does not depend on the tower"):
            alert_settings(fallback={"host": own})


def test_alert_durations_need_a_unit():
    with pytest.raises(ValueError):
        AlertSettings.model_validate({"to": OPS, "group_wait": "30"})


def test_for_max_caps_every_rules_for(render):
    capped = alert_settings(for_max="20s")
    rules = render("monitor/etc/prometheus/rules/mailtower.yml", capped)
    rules += render("monitor/etc/prometheus/rules/hosts.yml", capped)
    fors = re.findall(r"^\s+for: (\S+)$", rules, re.M)
    assert fors and set(fors) == {"20s"}
    plain = render("monitor/etc/prometheus/rules/mailtower.yml", alert_settings())
    scanner_down = plain.split("alert: ScannerDown")[1].split("- alert:")[0]
    assert "for: 1m" in scanner_down


# -- Alertmanager -------------------------------------------------------------------------------


@pytest.mark.parametrize("fallback", [None, {"host": "mx.tower-y.example.net"}])
def test_alertmanager_config_passes_amtool(render, tmp_path, fallback):
    s = alert_settings(fallback=fallback)
    path = write_alertmanager(render, s, tmp_path)
    checked = amtool("check-config", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    routes = amtool("config", "routes", "test", f"--config.file={path}", "alertname=HostDown")
    assert routes.returncode == 0, routes.stderr
    assert routes.stdout.strip() == ("tower-relay,fallback" if fallback else "tower-relay")


def test_every_receiver_mails_all_operators_through_its_smarthost(render, tmp_path):
    s = alert_settings(fallback={"host": "smtp.ops.example", "port": 587, "require_tls": True})
    yml = render("monitor/etc/prometheus/alertmanager.yml", s, alerts=s.alerts)
    blocks = dict(re.findall(r"- name: (\S+)\n(.*?)(?=\n  - name: |\Z)", yml, re.S))
    assert set(blocks) == {"tower-relay", "fallback"}
    for block in blocks.values():
        assert 'to: "ops@example.net, oncall@example.org"' in block
        assert 'html: ""' in block  # plain text only
    assert f'smarthost: "{s.hosts.relay}:{s.ports.smtp}"' in blocks["tower-relay"]
    assert "require_tls: false" in blocks["tower-relay"]
    assert 'smarthost: "smtp.ops.example:587"' in blocks["fallback"]
    assert "require_tls: true" in blocks["fallback"]


def test_alertmanager_runs_alone_on_the_monitors_address(render):
    s = alert_settings()
    args = render("monitor/etc/default/prometheus-alertmanager", s)
    assert f"--web.listen-address={s.hosts.monitor}:{s.ports.alertmanager}" in args
    assert '--cluster.listen-address="' in args  # no gossip port
    prom = render("monitor/etc/prometheus/prometheus.yml", s)
    assert f'targets: ["{s.hosts.monitor}:{s.ports.alertmanager}"]' in prom.split("alerting:")[1]
    assert "alerting:" not in render("monitor/etc/prometheus/prometheus.yml", sample_settings())


class Sink:
    """A local SMTP server that keeps what it is given."""

    def __init__(self, host: str) -> None:
        self.messages: list[tuple[list[str], bytes]] = []
        sink = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):
                sink.messages.append((list(envelope.rcpt_tos), envelope.content))
                return "250 OK"

        self.controller = Controller(Handler(), hostname=host, port=free_port(host))
        self.host, self.port = host, self.controller.port


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@pytest.fixture
def sinks() -> Iterator[tuple[Sink, Sink]]:
    relay, fallback = Sink("127.0.0.1"), Sink("127.0.0.2")
    relay.controller.start()
    fallback.controller.start()
    try:
        yield relay, fallback
    finally:
        for sink in (relay, fallback):
            with contextlib.suppress(AssertionError):  # stopped by the test already
                sink.controller.stop()


def post_alert(url: str, name: str) -> None:
    body = json.dumps([{"labels": {"alertname": name, "tower": "tower-x", "severity": "page"}}])
    req = urllib.request.Request(
        f"{url}/api/v2/alerts",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


@pytest.mark.integration
def test_real_alertmanager_mails_by_both_ways_and_by_the_fallback_alone(render, tmp_path, sinks):
    """Alertmanager 0.25 with the rendered configuration: each alert reaches the operators
    through the relay and the fallback; with the relay's SMTP gone, through the fallback."""
    binary = program(ALERTMANAGER, "prometheus-alertmanager")
    relay, fallback = sinks
    s = sample_settings(
        hosts={
            "relay": relay.host,
            "monitor": "127.0.0.3",
            "sql": ["192.0.2.12", "192.0.2.13"],
            "scanners": ["192.0.2.101"],
        },
        ports={"smtp": relay.port},
        alerts={
            "to": OPS,
            "fallback": {"host": fallback.host, "port": fallback.port},
            "group_wait": "1s",
            "group_interval": "2s",
        },
    )
    config = write_alertmanager(render, s, tmp_path)
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _ready(url), 20, "Alertmanager ready")
        post_alert(url, "ScannerDown")
        for sink in (relay, fallback):
            wait_until(lambda sink=sink: sink.messages, 30, f"mail at {sink.host}")
            rcpts, raw = sink.messages[0]
            assert rcpts == OPS
            assert b"[FIRING:1] ScannerDown at tower-x" in raw
            assert b"Content-Type: text/html" not in raw
            text = plain_text(raw)
            # tests/pair/test_96_alerts.py reads each alert's start and labels from these
            assert re.search(r"^- firing since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$", text, re.M)
            assert "labels: alertname=ScannerDown severity=page tower=tower-x\n" in text
            assert "amtool silence add alertname=ScannerDown" in text
        routes = {
            m.group(1)
            for sink in (relay, fallback)
            for _, raw in sink.messages
            if (m := re.search(rb"^X-Mailtower-Alert-Route: (\S+)", raw, re.M))
        }
        assert routes == {b"tower-relay", b"fallback"}

        relay.controller.stop()  # the tower's relay is down
        post_alert(url, "HostDown")
        wait_until(
            lambda: any(b"HostDown" in raw for _, raw in fallback.messages),
            30,
            "HostDown by the fallback while the relay is down",
        )
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def plain_text(raw: bytes) -> str:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    body = msg.get_body(("plain",))
    assert body is not None, "no text/plain part"
    return str(body.get_content()).replace("\r\n", "\n")  # type: ignore[attr-defined]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


# -- Prometheus ---------------------------------------------------------------------------------


PEM = (
    "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n"
    "-----END PUBLIC KEY-----\n"
)
VARIANTS = {
    "alone": {},
    "alerts": {"alerts": {"to": OPS, "for_max": "20s"}},
    # the lab and every GOC-fed tower (as test_templates: the GOC's secrets left out)
    "bundles": {},
}


def variant_settings(variant: str) -> TowerSettings:
    s = sample_settings(**VARIANTS[variant])
    if variant == "bundles":
        s = s.model_copy(
            update={
                "goc": Goc(address="10.0.9.10"),
                "rules_dir": "/var/lib/mailtower/rules",
                "bundles": Bundles(public_key=PEM),
            }
        )
    return s


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rules_and_config_pass_promtool(render, tmp_path, variant):
    promtool = program(PROMTOOL, "prometheus")
    s = variant_settings(variant)
    rule_files = []
    for name in ("mailtower", "hosts"):
        path = tmp_path / f"{name}.yml"
        path.write_text(render(f"monitor/etc/prometheus/rules/{name}.yml", s))
        rule_files.append(path)
    checked = subprocess.run(
        [promtool, "check", "rules", *map(str, rule_files)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # a scanner kept out by the rolling upgrade pages on every tower, bundles or not
    assert "alert: ScannerStuckAfterUpgrade" in rule_files[0].read_text()
    prom = render("monitor/etc/prometheus/prometheus.yml", s)
    for path in rule_files:
        prom = prom.replace(f"/etc/prometheus/rules/{path.name}", str(path))
    (tmp_path / "prometheus.yml").write_text(prom)
    checked = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_prometheus_scrapes_every_hosts_node_exporter(render):
    s = sample_settings(scanners=3)
    prom = render("monitor/etc/prometheus/prometheus.yml", s)
    node = prom.split("job_name: node")[1].split("job_name:")[0]
    for ip in [s.hosts.relay, s.hosts.monitor, *s.hosts.sql, *s.hosts.scanners]:
        assert f"{ip}:{s.ports.node_exporter}" in node


# -- firewalls and the relay --------------------------------------------------------------------


@pytest.mark.parametrize("role", ["relay", "sql", "scanner", "monitor"])
def test_node_exporter_answers_the_monitor_only(render, settings, role):
    nft = render(f"{role}/etc/nftables.conf", settings)
    rule = next(ln for ln in nft.splitlines() if f"tcp dport {settings.ports.node_exporter} " in ln)
    assert "reject" in rule
    allowed = re.search(r"ip saddr != \{?([^}]*?)\}? reject", rule).group(1)  # type: ignore[union-attr]
    assert {a.strip() for a in allowed.split(",")} <= {str(settings.hosts.monitor), "127.0.0.1"}
    assert str(settings.hosts.monitor) in allowed


def test_node_exporter_listens_on_the_hosts_tower_address(render, settings):
    args = render("common/etc/default/prometheus-node-exporter", settings, address="192.0.2.12")
    assert f'--web.listen-address=192.0.2.12:{settings.ports.node_exporter}"' in args


def test_the_relay_lets_the_monitor_mail_the_operators_only(render, tmp_path):
    s = alert_settings()
    cf = render("relay/etc/postfix/main.cf", s, tls_pem="/p")
    conf = dict(re.findall(r"^(\w+) = ?(.*)$", cf, re.M))
    client = f"inline:{{ {{ {s.hosts.monitor}=monitor_alerts }} }}"
    assert conf["smtpd_relay_restrictions"] == (
        f"permit_mynetworks, check_client_access {client}, reject_unauth_destination"
    )
    assert conf["smtpd_restriction_classes"] == "monitor_alerts"
    table = conf["monitor_alerts"].removeprefix("check_recipient_access ")
    postmap = program(POSTMAP, "postfix")
    (tmp_path / "main.cf").write_text("compatibility_level = 3.6\n")
    postmap_q = [postmap, "-c", str(tmp_path), "-q"]
    for address in OPS:
        got = subprocess.run([*postmap_q, address, table], capture_output=True, text=True)
        assert got.stdout.strip() == "OK", got.stderr
    other = subprocess.run([*postmap_q, "else@example.net", table], capture_output=True)
    assert other.returncode == 1 and not other.stdout  # not found: reject_unauth_destination
    got = subprocess.run([*postmap_q, str(s.hosts.monitor), client], capture_output=True, text=True)
    assert got.stdout.strip() == "monitor_alerts"
    plain = render("relay/etc/postfix/main.cf", sample_settings(), tls_pem="/p")
    assert "monitor_alerts" not in plain
