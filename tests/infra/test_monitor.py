"""The monitor: pool health, the signature mirror, Prometheus with the tower's alert rules."""

from __future__ import annotations

import json
import socket
import time

import pytest
from towerlib import assert_secret_share, wait_for

GROUP = "monitor"


@pytest.mark.parametrize("service", ["mailtower-monitor", "nginx", "prometheus"])
def test_service_running_and_enabled(node, service):
    svc = node.service(service)
    assert svc.is_running and svc.is_enabled


def test_pool_all_healthy_and_enabled(tower):
    pool = tower.pool()
    assert len(pool) == len(tower.settings.hosts.scanners)
    bad = {n: s for n, s in pool.items() if not (s["healthy"] and s["enabled"])}
    assert not bad


def test_mirror_serves_the_signature_index(node, tower):
    s = tower.settings
    index = json.loads(node.check_output(f"curl -fsS {s.mirror_url}/clamav/index.json"))
    assert "mailtower-test.ndb" in index["files"]


def test_prometheus_scrapes_every_target(node, tower):
    s = tower.settings
    url = f"http://{s.hosts.monitor}:{s.ports.prometheus}/api/v1/targets"

    def down_targets():
        targets = json.loads(node.check_output(f"curl -fsS {url}"))["data"]["activeTargets"]
        # scanners + monitor + relay exporter + haproxy + prometheus itself, the node exporter
        # of every host (relay, monitor, two SQL, scanners), Alertmanager, and the GOC's backup
        # repository's exporter where this tower watches it
        nodes = len(s.hosts.scanners) + 4
        extra = (1 if s.alerts else 0) + (1 if s.goc_backup_metrics else 0)
        assert len(targets) == len(s.hosts.scanners) + 4 + nodes + extra
        return [t["scrapeUrl"] for t in targets if t["health"] != "up"]

    # Right after a deploy a target may not have been scraped since its service started:
    # allow two scrape intervals (15 s each) for every target to answer.
    deadline = time.monotonic() + 40
    while (down := down_targets()) and time.monotonic() < deadline:
        time.sleep(2)
    assert not down


def test_alert_rules_loaded(node, tower):
    s = tower.settings
    out = json.loads(
        node.check_output(f"curl -fsS http://{s.hosts.monitor}:{s.ports.prometheus}/api/v1/rules")
    )
    names = {r["name"] for g in out["data"]["groups"] for r in g["rules"]}
    assert {"ScannerDown", "RelayQueueGrowing", "SqlReplicationLag", "ScannerRulesBehind"} <= names
    assert {"HostDown", "HostDiskFull", "HostMemoryLow", "HostClockNotSynchronised"} <= names
    assert {"HostTemperatureHigh", "HostFanFailing", "GocUnreachable"} <= names
    if s.bundles is not None:
        assert {
            "RuleBundleRejected",
            "RuleBundlesUnreachable",
            "ScannerStuckAfterRuleUpdate",
        } <= names
    if s.clamav is not None:
        assert {
            "ScannerClamavBehind",
            "ClamavMirrorOld",
            "ClamavUpstreamRefusing",
            "ClamavSetRejected",
            "ScannerStuckAfterClamavUpdate",
            "ClamavMirrorUnreachable",
        } <= names


def test_monitor_mirrors_rule_bundles_for_its_scanners_only(node, tower):
    """The rollout's mirror: served to the scanners under <mirror>/rules, written by the
    monitor (mailtower); the GOC's bundles readable from the monitor."""
    s = tower.settings
    if s.bundles is None:
        pytest.skip("this tower takes no rule bundles")
    assert node.run("runuser -u mailtower -- test -w /srv/mailtower/mirror/rules").rc == 0
    # The GOC answers the monitor: 200 once something is published, 404 before.
    code = node.check_output(
        f"curl -s -o /dev/null -w '%{{http_code}}' {s.bundle_source}/latest.json"
    )
    assert code in ("200", "404"), code
    pool = json.loads(node.check_output(f"curl -fsS http://127.0.0.1:{s.ports.monitor_http}/pool"))
    assert pool["rules"]["source"] == s.bundle_source


def test_prometheus_knows_the_rule_bundle_every_scanner_runs(node, tower):
    """What the ScannerRulesBehind alert reads: one version per scanner (0 = shipped rules)."""
    s = tower.settings
    base = f"http://{s.hosts.monitor}:{s.ports.prometheus}"

    query = "mailtower_rules_bundle_version"

    def every_scanner():
        out = json.loads(node.check_output(f"curl -fsS '{base}/api/v1/query?query={query}'"))
        seen = {r["metric"]["instance"]: r["value"][1] for r in out["data"]["result"]}
        return seen if len(seen) == len(s.hosts.scanners) else None

    seen = wait_for(every_scanner, 60, "a scraped rule-bundle version from every scanner")
    assert set(seen) == {f"{ip}:{s.ports.scanner_http}" for ip in s.hosts.scanners}


def test_monitor_sees_sql_replication(node, tower):
    """What the SqlReplicationLag / SqlStandbyNotStreaming alerts read."""
    out = node.check_output(
        f"curl -fsS http://127.0.0.1:{tower.settings.ports.monitor_http}/metrics"
    )
    metrics = dict(
        line.split(" ", 1) for line in out.splitlines() if line.startswith("mailtower_sql_")
    )
    assert float(metrics["mailtower_sql_up"]) == 1
    assert float(metrics["mailtower_sql_standbys_streaming"]) == 1
    assert (
        float(metrics["mailtower_sql_replication_lag_seconds"])
        < tower.settings.limits.replication_lag_alert_s
    )


def test_monitor_reports_the_tower_to_the_goc(node, tower):
    """What VirusEye shows of this tower, and what the GocUnreachable alert reads."""
    if tower.settings.goc is None:
        pytest.skip("this tower has no GOC")
    out = node.check_output(
        f"curl -fsS http://127.0.0.1:{tower.settings.ports.monitor_http}/metrics"
    )
    metrics = dict(
        line.split(" ", 1) for line in out.splitlines() if line.startswith("mailtower_goc_")
    )
    assert float(metrics["mailtower_goc_status_up"]) == 1


def test_settings_hold_only_this_roles_secrets(node, tower):
    assert_secret_share(node, tower, "monitor")


def test_monitor_mirrors_the_official_databases_for_its_scanners(node, tower):
    """The GOC's verified ClamAV databases, pulled into <mirror>/official by the monitor's
    service user; sigtool there (clamavdb verifies with it) but no clamd or freshclam."""
    s = tower.settings
    if s.clamav is None:
        pytest.skip("this tower takes no official ClamAV databases")
    assert node.run("runuser -u mailtower -- test -w /srv/mailtower/mirror/official").rc == 0
    assert node.exists("sigtool")
    assert not node.package("clamav-daemon").is_installed
    assert not node.service("clamav-freshclam").is_enabled
    code = node.check_output(
        f"curl -s -o /dev/null -w '%{{http_code}}' "
        f"http://{s.goc.address}:{s.goc.bundle_port}/clamav/index.json"
    )
    assert code == "200", code
    pool = json.loads(node.check_output(f"curl -fsS http://127.0.0.1:{s.ports.monitor_http}/pool"))
    assert pool["clamav"]["source"].endswith("/clamav")


def test_prometheus_sends_its_alerts_to_the_towers_alertmanager(node, tower):
    s = tower.settings
    if s.alerts is None:
        pytest.skip("this tower mails no alerts")
    url = f"http://{s.hosts.monitor}:{s.ports.prometheus}/api/v1/alertmanagers"
    active = json.loads(node.check_output(f"curl -fsS {url}"))["data"]["activeAlertmanagers"]
    assert [a["url"] for a in active] == [
        f"http://{s.hosts.monitor}:{s.ports.alertmanager}/api/v2/alerts"
    ]


def test_alertmanager_routes_every_alert_to_both_ways(node, tower):
    """amtool, as an operator runs it on the monitor (docs/runbook.md, "Alerts")."""
    s = tower.settings
    if s.alerts is None:
        pytest.skip("this tower mails no alerts")
    assert node.service("prometheus-alertmanager").is_running
    out = node.check_output(
        "amtool config routes test --config.file=/etc/prometheus/alertmanager.yml"
        " alertname=ScannerDown severity=page"
    )
    want = "tower-relay,fallback" if s.alerts.fallback else "tower-relay"
    assert out.strip() == want
    # The cluster port is off: one Alertmanager per tower, nothing listening on 9094.
    assert not node.socket("tcp://0.0.0.0:9094").is_listening


def test_node_exporters_answer_the_monitor_only(node, tower):
    """Every tower host's node exporter: scraped by the monitor (test above), refused to anyone
    else (here the controller, which the operator networks admit to SSH and Prometheus)."""
    s = tower.settings
    hosts = [s.hosts.relay, s.hosts.monitor, *s.hosts.sql, *s.hosts.scanners[:2]]
    for address in hosts:
        url = f"http://{address}:{s.ports.node_exporter}/metrics"
        # node_load1, not a filesystem metric: a lab host reports none (its root is an overlay,
        # which the exporter leaves out by type)
        assert "\nnode_load1 " in node.check_output(f"curl -fsS {url}")
        with pytest.raises(OSError):
            socket.create_connection((str(address), s.ports.node_exporter), timeout=5).close()
