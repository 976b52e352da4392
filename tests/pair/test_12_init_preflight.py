"""Issue 21 on the twin lab: the preflight passes on the lab's hosts, through the lab's own
inventories and through the ones ``mailtower init`` writes for the lab's answers (same SSH,
same hosts), and refuses, each with its message: a host with too little RAM, a port closed
between the relay and a scanner, and an SSH failure. Read-only but for one nftables table on
one scanner, removed at the end. Figure: preflight_lab_s in tests/output/figures.json."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
from conftest import Pair
from towerlib import ROOT, record_figure

from mailtower.controller.dns.server import TsigKey
from mailtower.controller.firstpair import answers, write
from mailtower.controller.firstpair.lab import lab_answers, lab_inventory
from mailtower.controller.lab import lxc
from mailtower.controller.preflight import checks, preflight, targets
from mailtower.controller.preflight.runner import SshRunner
from mailtower.controller.preflight.sizing import Size

# the inventories the lab was deployed from (init's when `invoke lab` built it)
LAB = [lab_inventory(ROOT, n) for n in ("lab_goc.py", "lab_a.py", "lab_b.py")]
DROP_TABLE = "mailtower_preflight_test"


def test_the_preflight_passes_on_the_lab(pair: Pair) -> None:
    report = preflight(LAB)
    assert [f.line() for f in report.findings] == []
    print("\n".join(report.notes))  # unverified paths (refused, no listener possible), if any
    assert report.hosts == 2 * (4 + len(pair.towers["a"].settings.hosts.scanners)) + 2
    record_figure("preflight_lab_s", round(report.seconds, 1))


def test_the_inventories_init_writes_for_the_lab_pass_too(pair: Pair, tmp_path: Path) -> None:
    tsig = tmp_path / "lab-update.key"  # the lab DNS server's key, in BIND syntax
    key = json.loads(lxc.tsig_key_file().read_text())
    tsig.write_text(TsigKey(key["name"], key["secret"], key["algorithm"]).to_bind())
    scanners = len(pair.towers["a"].settings.hosts.scanners)
    a = answers.from_data(lab_answers(scanners))
    write.run(a, tmp_path / "inventory", tmp_path / "secrets", tsig_file=tsig)
    paths = [tmp_path / "inventory" / n for n in ("lab_goc.py", "lab_a.py", "lab_b.py")]
    # init's GOC takes ClamAV's official databases (database.clamav.net); the lab's GOC has no
    # way out but to its stand-in upstream, which only the lab's own inventory names.
    report = preflight(paths, skip={"way out"})
    assert [f.line() for f in report.findings] == []


def _tower_a() -> list[checks.HostCheck]:
    found, _ = targets.tower_targets(lab_inventory(ROOT, "lab_a.py"))
    return found


def test_a_host_with_too_little_ram_is_refused(pair: Pair) -> None:
    found = _tower_a()
    scanner = next(t for t in found if t.role == "scanners")
    memtotal_mib = int(
        pair.towers["a"]
        .node(scanner.address)
        .check_output("awk '/^MemTotal:/ {print int($2/1024)}' /proc/meminfo")
    )
    too_big = Size(1, 2 * memtotal_mib, 1, "more than the host has")
    failed = checks.check_host(dataclasses.replace(scanner, size=too_big))
    assert [f.check for f in failed] == ["ram"], [f.line() for f in failed]
    line = failed[0].line()
    assert line.startswith(f"{scanner.address} (scanners): ram: {memtotal_mib} MiB of RAM")
    assert "fix: give the host more RAM" in line
    print(line)


@pytest.fixture
def filtered_scanner(pair: Pair):
    """One scanner drops the relay's connections to its scan port (as a firewall between
    them would), until the test ends."""
    tower = pair.towers["a"]
    s = tower.settings
    scanner = str(s.hosts.scanners[4])
    node = tower.node(scanner)
    node.check_output(
        f"nft add table inet {DROP_TABLE} && nft add chain inet {DROP_TABLE} input"
        " '{ type filter hook input priority -10; }' &&"
        f" nft add rule inet {DROP_TABLE} input ip saddr {s.hosts.relay}"
        f" tcp dport {s.ports.filter} drop"
    )
    try:
        yield scanner
    finally:
        node.run(f"nft delete table inet {DROP_TABLE}")


def test_a_port_closed_between_the_relay_and_a_scanner_is_refused(
    pair: Pair, filtered_scanner: str
) -> None:
    relay = next(t for t in _tower_a() if t.role == "relay")
    failed = checks.check_host(relay)
    port = pair.towers["a"].settings.ports.filter
    assert [f.line() for f in failed] == [
        f"{relay.address} (relay): port: TCP {filtered_scanner}:{port} (the scan hop: HAProxy"
        f" to scand) timed out (filtered); fix: open TCP {port} from {relay.address} to"
        f" {filtered_scanner} in every firewall between them"
    ]
    print(failed[0].line())


def test_an_ssh_failure_is_refused_and_the_other_hosts_still_checked(
    pair: Pair, tmp_path: Path
) -> None:
    stranger = tmp_path / "id_ed25519"  # a key no lab host authorises
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    found = _tower_a()
    victim = found[1]  # the monitor
    found[1] = dataclasses.replace(
        victim,
        runner=SshRunner(
            victim.address, "root", str(stranger), str(lxc.known_hosts()), strict="yes"
        ),
    )
    report = checks.run_all(found)
    assert [(f.host, f.check) for f in report.findings] == [(f"{victim.address} (monitor)", "ssh")]
    assert "Permission denied" in report.findings[0].detail
    assert report.hosts == len(found)
    print(report.findings[0].line())


def test_ci_deployed_the_lab_from_the_inventories_init_wrote(pair: Pair) -> None:
    """Issue 21's proof: `invoke lab` (CI) built the lab through init and the guide's commands,
    so the towers run with init's secrets and the GOC signs with init's bundle key."""
    from mailtower.controller.firstpair.lab import generated_dir, inventory_source, lab_secrets_dir

    if inventory_source() != "init":
        pytest.skip("this lab was deployed from its own inventories (MAILTOWER_LAB_INVENTORY=repo)")
    for key, tower in pair.towers.items():
        assert tower.inventory_path == generated_dir() / f"lab_{key}.py"
        own = json.loads((lab_secrets_dir() / f"lab-{key}" / "secrets.json").read_text())
        held = json.loads(tower.relay().check_output("cat /etc/mailtower/tower.json"))["secrets"]
        assert held["sql_relay"] == own["sql_relay"], f"lab-{key}'s relay: not init's secret"
        public = (lab_secrets_dir() / "goc" / "bundle-keys" / "signing.pub").read_text()
        assert tower.settings.bundles and tower.settings.bundles.public_key == public
    assert pair.goc_hosts.inventory_path == generated_dir() / "lab_goc.py"
    goc = json.loads((lab_secrets_dir() / "goc" / "secrets.json").read_text())
    assert pair.goc_data["operators"]["operator"] == goc["eye_operator"]
