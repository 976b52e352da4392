"""Scanners: clamd with the tower's signatures and mailtower-scand on the filter port."""

from __future__ import annotations

import json
import time

import pytest
from towerlib import assert_secret_share

GROUP = "scanners"
ICAP_CONTROL = "/run/c-icap/c-icap.ctl"  # roles/scanner.py ICAP_CONTROL


@pytest.mark.parametrize("package", ["clamav-daemon", "python3-venv"])
def test_package_installed(node, package):
    assert node.package(package).is_installed


@pytest.mark.parametrize("service", ["clamav-daemon", "mailtower-scand", "mailtower-sigsync.timer"])
def test_service_running_and_enabled(node, service):
    svc = node.service(service)
    assert svc.is_running and svc.is_enabled


def test_freshclam_is_off(node):
    assert not node.service("clamav-freshclam").is_running


def test_listeners(node, tower):
    s = tower.settings
    assert node.socket(f"tcp://0.0.0.0:{s.ports.filter}").is_listening
    assert node.socket(f"tcp://0.0.0.0:{s.ports.scanner_http}").is_listening
    assert node.socket(f"unix://{s.clamd_socket}").is_listening


def test_signatures_from_the_mirror(node):
    assert node.file("/var/lib/clamav/mailtower-test.ndb").contains("Mailtower.Test.EICAR")


def test_clamd_answers(node, tower):
    out = node.check_output(
        "python3 -c \"import socket;s=socket.socket(socket.AF_UNIX);s.connect('%s');"
        "s.sendall(b'zPING\\0');print(s.recv(16).rstrip(b'\\0').decode())\""
        % tower.settings.clamd_socket
    )
    assert out == "PONG"


def test_health_endpoint(node, tower):
    out = node.check_output(f"curl -sS http://127.0.0.1:{tower.settings.ports.scanner_http}/health")
    doc = json.loads(out)
    assert doc["status"] == "ok"
    # scand runs what the deploy installed (a rolling upgrade has restarted it, or none was due)
    assert doc["stack"] is not None and doc["stack"] == doc["stack_installed"], doc


def test_the_customers_policies_are_loaded_from_sql(node, tower):
    """Issue 17: scand's poller wrote the policy snapshot (every customer SQL lists, for the
    workers to read per message), readable by scand and by nobody's writes but its own."""
    path = tower.settings.policy_snapshot
    snapshot = node.file(path)
    assert snapshot.exists and snapshot.user == "mailtower" and snapshot.mode == 0o644
    doc = json.loads(snapshot.content_string)
    for customer in tower.settings.customers:
        assert customer.domain in doc["domains"]
    metrics = node.check_output(
        f"curl -sS http://127.0.0.1:{tower.settings.ports.scanner_http}/metrics"
    )
    assert "mailtower_policy_customers" in metrics


def test_settings_are_the_towers(node, tower):
    got = json.loads(node.file("/etc/mailtower/tower.json").content_string)
    assert got["name"] == tower.settings.name
    assert got["hosts"]["relay"] == str(tower.settings.hosts.relay)


def _local_icap(tower):
    from mailtower.scanning.engines.icap import parse_icap_url

    s = tower.settings
    if "icap" not in s.engines or not s.icap_url:
        return None
    url = parse_icap_url(s.icap_url)
    return url if url.host in ("127.0.0.1", "localhost") else None


def test_c_icap_serves_the_icap_engine_on_loopback_only(node, tower):
    icap = _local_icap(tower)
    if icap is None:
        assert not node.service("c-icap").is_running  # installed, but not this tower's engine
        return
    assert node.service("c-icap").is_running and node.service("c-icap").is_enabled
    assert node.socket(f"tcp://127.0.0.1:{icap.port}").is_listening
    assert not node.socket(f"tcp://0.0.0.0:{icap.port}").is_listening
    health = json.loads(
        node.check_output(f"curl -sS http://127.0.0.1:{tower.settings.ports.scanner_http}/health")
    )
    assert health["icap"].startswith("C-ICAP/"), health  # scand reached it through OPTIONS


def test_c_icap_takes_new_signatures_without_restart(tower):
    """A signature added to the scanner's database is found by c-icap after sigsync's reload
    (mailtower.scand.sigsync.reload_icap), with no restart: what every signature update
    relies on."""
    s = tower.settings
    icap = _local_icap(tower)
    if icap is None:
        pytest.skip("this tower scans without a local c-icap")
    node = tower.node(tower.hosts(GROUP)[0].name)
    marker = f"MAILTOWER-INFRA-RELOAD-{s.name}-4e1f"
    sig = "/var/lib/clamav/zz-mailtower-infra-reload.ndb"  # not sigsync-managed: left alone
    scan = (
        f"printf 'text {marker} text\\n' > /tmp/reload-probe.txt && c-icap-client -i 127.0.0.1"
        f" -p {icap.port} -s {icap.service} -f /tmp/reload-probe.txt -resp x -v 2>&1"
        " | grep -a -c 'VIRUS FOUND' || true"
    )
    reload = (
        "/opt/mailtower/venv/bin/python -c 'from mailtower.scand.sigsync import reload_icap;"
        f' print(reload_icap("{ICAP_CONTROL}"))\''
    )
    assert node.check_output(scan) == "0"
    try:
        node.check_output(
            f"echo 'Mailtower.Test.InfraReload:0:*:{marker.encode().hex()}' > {sig}"
            f" && chown clamav: {sig}"
        )
        assert node.check_output(reload) == "True"
        deadline = time.monotonic() + 60
        while node.check_output(scan) == "0":
            assert time.monotonic() < deadline, "c-icap did not take the new signature in 60 s"
            time.sleep(1)
    finally:
        node.run(f"rm -f {sig}")
        node.run(reload)


def test_scand_may_apply_rule_bundles(node, tower):
    """What POST /rules/apply needs on the host: scand (user mailtower) writes its rules root
    and clamd's database directory, and may reload c-icap through its command pipe."""
    s = tower.settings
    if s.bundles is None:
        pytest.skip("this tower takes no rule bundles")
    as_scand = "runuser -u mailtower -- test -w"
    assert node.run(f"{as_scand} {s.rules_dir}").rc == 0
    assert node.run(f"{as_scand} {s.clamav_db_dir}").rc == 0
    if _local_icap(tower) is not None:
        assert node.run(f"{as_scand} {ICAP_CONTROL}").rc == 0


def test_settings_hold_only_this_roles_secrets(node, tower):
    assert_secret_share(node, tower, "scanners")


def test_official_databases_come_from_the_monitor_in_windows_only(node, tower):
    """freshclam only for scand's /clamav/apply, from the monitor's mirror; clamd never reloads
    on its own (SelfCheck 0), so new databases load only inside a window."""
    s = tower.settings
    if s.clamav is None:
        pytest.skip("this tower takes no official ClamAV databases")
    conf = node.file("/etc/mailtower/freshclam.conf").content_string
    assert f"DatabaseMirror http://{s.hosts.monitor}:{s.ports.mirror_http}/official" in conf
    assert not [ln for ln in conf.splitlines() if ln.strip().startswith("NotifyClamd")]
    assert not node.service("clamav-freshclam").is_enabled
    assert "\nSelfCheck 0\n" in node.file("/etc/clamav/clamd.conf").content_string
    for d in ("/var/lib/mailtower/clamav-staged", "/var/lib/mailtower/clamav-previous"):
        assert node.file(d).user == "mailtower"
    health = json.loads(
        node.check_output(f"curl -fsS http://127.0.0.1:{s.ports.scanner_http}/health")
    )
    # the configured databases, and the GOC's feed set when it serves one
    assert set(health["clamav"]) <= {*s.clamav.databases, "feeds"} and "clamav_busy" in health
