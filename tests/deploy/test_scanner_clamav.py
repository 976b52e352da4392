"""The scanner role with the official ClamAV databases (issue 16): freshclam.conf and clamd.conf
as rendered from settings, and the RAM each scanner needs."""

from __future__ import annotations

import re

import pytest
from conftest import sample_settings
from pyinfra.api.exceptions import DeployError

from mailtower.scand import clamav_apply
from roles.scanner import CLAMAV_PREVIOUS, CLAMAV_STAGED, FRESHCLAM_CONF, clamav_memory

GOC = {"address": "192.0.2.50"}
SECRETS = {
    **{
        k: "s3cret-password-0123456789"
        for k in ("sql_relay", "sql_scanner", "sql_monitor", "sql_replication")
    },
    **{k: "s3cret-password-0123456789" for k in ("sql_sync", "goc_sync", "goc_status", "canary")},
}


def clamav(**kwargs):
    return sample_settings(scanners=2, goc=GOC, secrets=SECRETS, clamav=kwargs)


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def test_paths_are_scands(render):
    assert str(clamav_apply.STAGED_DIR) == CLAMAV_STAGED
    assert str(clamav_apply.PREVIOUS_DIR) == CLAMAV_PREVIOUS
    assert str(clamav_apply.FRESHCLAM_CONF) == FRESHCLAM_CONF
    unit = render("scanner/etc/systemd/system/mailtower-scand.service", clamav())
    paths = re.search(r"^ReadWritePaths=(.*)$", unit, re.M).group(1).split()
    assert {CLAMAV_STAGED, CLAMAV_PREVIOUS, "/var/lib/clamav"} <= set(paths)


def test_freshclam_fetches_from_the_monitor_into_staging_only(render):
    s = clamav(databases=["main", "daily", "bytecode"])
    conf = _lines(render("scanner/etc/mailtower/freshclam.conf", s))
    assert f"DatabaseMirror http://{s.hosts.monitor}:{s.ports.mirror_http}/official" in conf
    for line in (
        "DNSDatabaseInfo no",
        "ScriptedUpdates yes",
        f"DatabaseDirectory {CLAMAV_STAGED}",
        "TestDatabases no",
    ):
        assert line in conf
    assert not any(
        ln.startswith(("NotifyClamd", "ExcludeDatabase", "ExtraDatabase")) for ln in conf
    )
    assert not any("clamav.net" in ln for ln in conf)


def test_freshclam_excludes_and_adds_databases_as_set(render):
    conf = _lines(
        render("scanner/etc/mailtower/freshclam.conf", clamav(databases=["daily", "test"]))
    )
    assert [ln for ln in conf if ln.startswith(("ExcludeDatabase", "ExtraDatabase"))] == [
        "ExcludeDatabase main",
        "ExcludeDatabase bytecode",
        "ExtraDatabase test",
    ]


def test_clamd_never_reloads_on_its_own(render, settings):
    for s in (settings, clamav()):
        conf = _lines(
            render("scanner/etc/clamav/clamd.conf", s, concurrent_reload=False, ram_mib=1)
        )
        assert "SelfCheck 0" in conf


@pytest.mark.parametrize(
    ("ram", "mode", "icap", "concurrent"),
    [
        (2912, "auto", False, True),  # 2 × 1200 + 512
        (2911, "auto", False, False),
        (1712, "auto", False, False),  # exactly one engine + working set
        (1712, "yes", False, True),
        (9000, "no", False, False),
        (4112, "auto", True, True),  # c-icap's libclamav holds an engine of its own
        (4111, "auto", True, False),
    ],
)
def test_concurrent_reload_only_where_ram_holds_two_engines(render, ram, mode, icap, concurrent):
    s = clamav(concurrent_reload=mode, engine_mib=1200, working_set_mib=512)
    memory = clamav_memory(s, "192.0.2.101", ram, icap=icap)
    assert memory.concurrent_reload is concurrent
    conf = _lines(
        render("scanner/etc/clamav/clamd.conf", s, concurrent_reload=concurrent, ram_mib=ram)
    )
    assert f"ConcurrentDatabaseReload {'yes' if concurrent else 'no'}" in conf


def test_a_scanner_too_small_for_the_databases_is_refused(render):
    s = clamav(engine_mib=1200, working_set_mib=512)
    with pytest.raises(DeployError) as refused:
        clamav_memory(s, "10.0.0.7", 1711, icap=False)
    assert str(refused.value).startswith(
        "scanner 10.0.0.7 has 1711 MiB; the ClamAV databases need 1712 MiB "
        "(engine 1200 + working set 512): give it more RAM or fewer databases"
    )
    with pytest.raises(DeployError, match="need 2912 MiB"):
        clamav_memory(s, "10.0.0.7", 2911, icap=True)


def test_bytecode_runs_only_with_the_official_bytecode_database(render, settings):
    conf = _lines(render("scanner/etc/clamav/clamd.conf", settings))
    assert "Bytecode false" in conf
    with_bc = clamav(databases=["main", "bytecode"])
    conf = _lines(
        render("scanner/etc/clamav/clamd.conf", with_bc, concurrent_reload=True, ram_mib=1)
    )
    assert "Bytecode true" in conf


def test_sigsync_does_not_reload_clamd_with_the_official_databases(render, settings):
    unit = "scanner/etc/systemd/system/mailtower-sigsync.service"
    assert "--no-reload" in render(unit, clamav(), icap_control=None)
    assert "--no-reload" not in render(unit, settings, icap_control=None)


def test_the_monitor_may_send_canaries_with_the_official_databases(render):
    rules = render("scanner/etc/nftables.conf", clamav())
    s = clamav()
    assert f"ip saddr != {{ {s.hosts.relay}, {s.hosts.monitor} }}" in rules
