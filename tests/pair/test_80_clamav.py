"""Official ClamAV databases from the GOC to every scanner of both towers (issue 16).

The lab has no internet: its stand-in upstream (nginx on the lab's DNS host, and the
``current.cvd.clamav.net`` TXT record in the lab's BIND) serves ClamAV's own officially signed
test databases (``test-N.cvd``, ``test-N.cdiff``; mailtower.controller.lab.clamav_testfiles).
The lab deploy leaves the upstream at version 2. The GOC's cvdupdate mirrors it, the GOC
verifies and serves it, each monitor pulls and verifies it, and rolls it across its scanners
in windows (drain, apply: freshclam from the monitor + clamd reload, canary, back).

In order (the tests share the lab's state and run in file order):

1. 2 → 4 through CDIFFs under steady mail: every scanner of both towers runs test 4, built by
   freshclam from CDIFFs (``test.cld``, not a downloaded ``test.cvd``), 0 tempfails, 0 lost.
2. Version 5 with one flipped byte in its CVD at the upstream: the GOC refuses it and every
   scanner stays at 4; then the clean version 5 reaches every scanner.
3. A flipped CVD and CDIFF injected into one monitor's mirror: that tower's scanners refuse them
   (freshclam checks ClamAV's signatures) and keep version 5, in service.
4. Version 6 with one flipped byte in its CDIFF at the upstream, while one scanner is down: the
   GOC refuses the CDIFF (and serves the signed CVD alone); every scanner but the stopped one
   gets 6 (by the whole CVD); the stopped one, started again, catches up.
5. Through all of it: no clamd reloaded outside one of its scanner's windows.

Figures: tests/output/figures.json (clamav_databases).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import time

import pytest
from conftest import Pair
from test_70_rule_bundles import Load, send_direct, tempfails_since, verdicts_at_goc
from towerlib import ROOT, record_figure, remote_python, wait_for

from mailtower.controller.lab import clamav_testfiles, clamav_upstream

DB = "test"
ROLL_TIMEOUT_S = 900
GOC_SERVED = "/srv/mailtower/clamav"
MONITOR_MIRROR = "/srv/mailtower/mirror/official"
FIGURES: dict[str, object] = {}
STARTED: list[float] = []


def versions(pair: Pair) -> dict[str, dict[str, int | None]]:
    """Tower key → scanner → the test database's version its monitor last heard of."""
    return {
        key: {n: (s.get("clamav") or {}).get(DB) for n, s in tower.pool().items()}
        for key, tower in pair.towers.items()
    }


def wait_everywhere(pair: Pair, version: int, skip: frozenset[str] = frozenset()) -> float:
    started = time.monotonic()

    def done() -> bool:
        return all(
            v == version for t in versions(pair).values() for n, v in t.items() if n not in skip
        )

    wait_for(done, ROLL_TIMEOUT_S, f"every scanner of both towers on {DB} {version}", 2)
    return time.monotonic() - started


def goc_check(pair: Pair) -> int:
    """Have the GOC look at the upstream now (its timer would, within check_interval); the
    unit's exit status (non-zero when it refused a file: the tests read what it served)."""
    return pair.goc().run("systemctl start mailtower-cvdupdate.service").rc


def goc_index(pair: Pair) -> dict:
    return json.loads(pair.goc().file(f"{GOC_SERVED}/index.json").content_string)


def served_version(pair: Pair) -> int | None:
    return (goc_index(pair).get("databases", {}).get(DB) or {}).get("version")


def scanner_names(pair: Pair, key: str) -> list[str]:
    return [h.name for h in pair.towers[key].inventory.groups["scanners"]]


def staged_files(pair: Pair, key: str, name: str) -> set[str]:
    out = pair.towers[key].node(name).check_output("ls /var/lib/mailtower/clamav-staged")
    return set(out.split())


def put(node, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` on a lab host, keeping the file's owner and mode."""
    b64 = base64.b64encode(data).decode()
    node.check_output(
        f"echo {b64} | base64 -d > {path}.new && cat {path}.new > {path} && rm {path}.new"
    )


def _unix(line: str) -> float:
    return float(line.split(" ", 1)[0])


def reloads(pair: Pair, since: float) -> dict[str, list[float]]:
    """Scanner address → when its clamd finished loading new databases, since ``since``."""
    out: dict[str, list[float]] = {}
    for key, tower in pair.towers.items():
        for name in scanner_names(pair, key):
            text = tower.node(name).check_output(
                f"journalctl -q -o short-unix --since @{int(since)} -t clamd"
                " | grep -F 'Database correctly reloaded' | grep -v -F -- '->' || true"
            )
            # clamd logs each reload twice (syslog, and its log file's "date -> " copy)
            out[name] = [_unix(line) for line in text.splitlines() if line.strip()]
    return out


def windows(pair: Pair, since: float) -> dict[str, list[tuple[float, float]]]:
    """Scanner address → its windows (start, end) from the monitors' logs, since ``since``: the
    bundle windows and the ClamAV ones (each logs its end and its length)."""
    out: dict[str, list[tuple[float, float]]] = {}
    pattern = re.compile(
        r"event=(?:rules|clamav)_updated scanner=\S+ address=(\S+) .*seconds=([\d.]+)"
    )
    for tower in pair.towers.values():
        text = tower.monitor().check_output(
            f"journalctl -q -o short-unix --since @{int(since)} -u mailtower-monitor"
            " | grep -E 'event=(rules|clamav)_(updated|rolled_back|update_failed)' || true"
        )
        for line in text.splitlines():
            m = pattern.search(line)
            if m:
                end = _unix(line)
                out.setdefault(m.group(1), []).append((end - float(m.group(2)) - 1.0, end + 1.0))
    return out


@pytest.fixture(scope="module", autouse=True)
def _record(pair: Pair):
    STARTED.append(time.time())
    yield
    record_figure("clamav_databases", FIGURES)


def test_the_goc_mirrors_with_pinned_cvdupdate_as_its_own_user(pair: Pair) -> None:
    goc = pair.goc()
    pinned = next(
        line.split("==", 1)[1].strip()
        for line in (ROOT / "requirements-cvdupdate.txt").read_text().splitlines()
        if line.lower().startswith("cvdupdate==")
    )
    shown = goc.check_output("/opt/mailtower/cvdupdate/bin/pip show cvdupdate")
    assert f"Version: {pinned}" in shown
    assert goc.service("mailtower-cvdupdate.timer").is_enabled
    unit = goc.check_output("systemctl show -p User mailtower-cvdupdate.service")
    assert unit.strip() == "User=mtcvd"
    # served to the towers' monitors only: the sender (the internet) is refused
    probe = (
        "import urllib.request as u, urllib.error as e\n"
        "try:\n"
        f"    u.urlopen('http://{pair.goc_addr}:8026/clamav/index.json', timeout=5)\n"
        "    print(200)\n"
        "except e.HTTPError as x:\n"
        "    print(x.code)\n"
        "except OSError:\n"
        "    print(0)\n"
    )
    code = remote_python(pair.sender, probe).strip()
    assert code == "403", code  # nginx answers, and refuses


def test_version_2_then_4_through_cdiffs_under_mail(pair: Pair) -> None:
    clamav_upstream.publish(2)
    goc_check(pair)
    FIGURES["first_version_to_all_46_s"] = round(wait_everywhere(pair, 2), 1)

    started = time.time()
    with Load(pair) as load:
        time.sleep(3)
        t0 = time.monotonic()
        clamav_upstream.publish(4)
        goc_check(pair)
        wait_for(lambda: served_version(pair) == 4, 120, "the GOC serving test 4", 1)
        FIGURES["goc_check_to_all_46_s"] = round(wait_everywhere(pair, 4) + 0, 1)
        FIGURES["upstream_to_all_46_s"] = round(time.monotonic() - t0, 1)
        time.sleep(3)
    assert not load.errors, load.errors[:3]
    lost = len(set(load.sent) - set(pair.wait_delivered(load.sent, timeout=300)))
    tempfails = tempfails_since(pair, started)
    FIGURES.update(messages_during_roll=len(load.sent), tempfailed=tempfails, lost=lost)
    assert lost == 0 and tempfails == 0

    served = goc_index(pair)["databases"][DB]
    assert {"test-3.cdiff", "test-4.cdiff"} <= set(served["cdiffs"]), served
    for key in pair.towers:
        name = scanner_names(pair, key)[0]
        # freshclam built version 4 from the CDIFFs: a .cld; a whole CVD download is a .cvd
        assert "test.cld" in staged_files(pair, key, name), (key, name)


def test_flipped_cvd_refused_at_the_goc(pair: Pair) -> None:
    clamav_upstream.publish(5, corrupt="test.cvd")
    goc_check(pair)

    def refused() -> bool:
        up = goc_index(pair).get("upstream", {})
        return bool(up.get("refusals")) and "test" in up.get("last_error", "")

    wait_for(refused, 120, "the GOC to refuse the flipped test.cvd", 1)
    assert served_version(pair) == 4
    time.sleep(10)  # a monitor poll or more
    assert all(v == 4 for t in versions(pair).values() for v in t.values()), versions(pair)

    clamav_upstream.publish(5)
    goc_check(pair)
    wait_for(lambda: served_version(pair) == 5, 180, "the GOC serving the clean test 5", 2)
    wait_everywhere(pair, 5)


def test_flipped_files_at_a_monitor_refused_by_its_scanners(pair: Pair) -> None:
    tower = pair.towers["a"]
    monitor = tower.monitor()
    files = clamav_testfiles.ensure()
    flipped = {
        "test.cvd": clamav_upstream.flip_byte((files / "test-6.cvd").read_bytes()),
        "test-6.cdiff": clamav_upstream.flip_byte((files / "test-6.cdiff").read_bytes()),
    }
    since = time.time()
    monitor.check_output("systemctl stop mailtower-monitor")
    try:
        index = json.loads(monitor.file(f"{MONITOR_MIRROR}/index.json").content_string)
        entry = index["databases"][DB]
        entry["version"] = 6
        entry["sha256"] = hashlib.sha256(flipped["test.cvd"]).hexdigest()
        entry["cdiffs"]["test-6.cdiff"] = hashlib.sha256(flipped["test-6.cdiff"]).hexdigest()
        for name, data in flipped.items():
            put(monitor, f"{MONITOR_MIRROR}/{name}", data)
        put(monitor, f"{MONITOR_MIRROR}/index.json", json.dumps(index).encode())
    finally:
        monitor.check_output("systemctl start mailtower-monitor")

    def failed_once() -> bool:
        out = monitor.check_output(
            f"journalctl -q --since @{int(since)} -u mailtower-monitor"
            " | grep -c -E 'event=clamav_update_failed' || true"
        )
        return int(out.strip() or 0) >= 1

    wait_for(failed_once, 300, "a scanner of lab-a to refuse the flipped files", 2)
    now = versions(pair)
    assert all(v == 5 for v in now["a"].values()), now["a"]
    # refused by ClamAV's own checks on the scanner, and still in service
    pool = tower.pool()
    assert all(s.get("enabled", True) for s in pool.values()), pool
    # put the monitor's mirror back: it pulls the GOC's verified files again
    monitor.check_output(
        f"systemctl stop mailtower-monitor && rm -rf {MONITOR_MIRROR}/*"
        " && systemctl start mailtower-monitor"
    )
    time.sleep(5)
    wait_everywhere(pair, 5)


def test_flipped_cdiff_refused_and_a_down_scanner_catches_up(pair: Pair) -> None:
    host = pair.towers["b"].inventory.groups["scanners"][-1]
    container = host.data["lab_name"]
    down = next(n for n, e in pair.towers["b"].pool().items() if e.get("address") == host.name)
    subprocess.run(["lxc-stop", "-k", "-n", container], check=True)
    try:
        clamav_upstream.publish(6, corrupt="test-6.cdiff")
        goc_check(pair)
        wait_for(lambda: served_version(pair) == 6, 180, "the GOC serving test 6", 2)
        served = goc_index(pair)
        assert "test-6.cdiff" not in served["databases"][DB]["cdiffs"], served
        assert "test-6.cdiff" in served["upstream"].get("last_error", ""), served["upstream"]
        wait_everywhere(pair, 6, skip=frozenset({down}))
    finally:
        subprocess.run(["lxc-start", "-n", container, "-d"], check=True)
    t0 = time.monotonic()
    wait_everywhere(pair, 6)
    FIGURES["down_scanner_caught_up_s"] = round(time.monotonic() - t0, 1)


def feeds_at(pair: Pair) -> dict[str, dict[str, int | None]]:
    return {
        key: {n: (s.get("clamav") or {}).get("feeds") for n, s in tower.pool().items()}
        for key, tower in pair.towers.items()
    }


def test_a_third_party_feed_reaches_every_scanner_and_a_bad_one_is_refused(pair: Pair) -> None:
    """The lab GOC's Fangfrisch takes the stand-in's URLhaus-shaped feed (checked against its
    .sha256); the next revision adds a signature for one more URL, which both towers then
    find."""
    served = pair.goc().run(f"grep -c . {GOC_SERVED}/feeds/{clamav_upstream.FEED_FILE}")
    revision = int(served.stdout.strip() or 0) + 1  # revision N has N signatures
    url = clamav_upstream.FEED_URL.format(n=revision)
    before = {send_direct(pair, k, f"get it at {url}") for k in pair.towers}
    pair.wait_delivered(sorted(before), timeout=180)  # nobody knows that URL yet

    serial_before = goc_index(pair).get("feeds_serial", 0)
    clamav_upstream.publish(6, feed_revision=revision)
    goc_check(pair)
    index = wait_for(
        lambda: (i := goc_index(pair)).get("feeds_serial", 0) > serial_before and i,
        180,
        f"the GOC serving the feed's revision {revision}",
        2,
    )
    serial = index["feeds_serial"]
    assert any(n.endswith(clamav_upstream.FEED_FILE) for n in index["feeds"]), index["feeds"]
    wait_for(
        lambda: all(v == serial for t in feeds_at(pair).values() for v in t.values()),
        ROLL_TIMEOUT_S,
        f"every scanner of both towers on feed set {serial}",
        2,
    )
    after = {k: send_direct(pair, k, f"get it at {url}") for k in pair.towers}
    found = wait_for(
        lambda: (v := verdicts_at_goc(pair, set(after.values()))) and len(v) == 2 and v,
        120,
        "the verdicts of the URL messages at the GOC",
        1,
    )
    for key, token in after.items():
        tower, verdict, findings = found[token]
        assert tower == pair.towers[key].name and verdict == "virus", found[token]
        assert f"Urlhaus.Lab.Url-{revision}" in findings, findings

    # the next revision with a flipped byte: Fangfrisch's checksum refuses it, the set stays
    clamav_upstream.publish(6, corrupt=clamav_upstream.FEED_FILE, feed_revision=revision + 1)
    goc_check(pair)
    time.sleep(5)
    index = goc_index(pair)
    assert index["feeds_serial"] == serial, index
    assert "urlhaus" in index["upstream"].get("last_error", ""), index["upstream"]
    assert all(v == serial for t in feeds_at(pair).values() for v in t.values())
    FIGURES["feed_set_served"] = serial


def test_no_clamd_reloaded_outside_a_window(pair: Pair) -> None:
    since = STARTED[0]
    seen, opened = reloads(pair, since), windows(pair, since)
    outside = {
        name: [t for t in times if not any(a <= t <= b for a, b in opened.get(name, []))]
        for name, times in seen.items()
    }
    outside = {n: t for n, t in outside.items() if t}
    FIGURES["clamd_reloads"] = sum(len(t) for t in seen.values())
    FIGURES["reloads_outside_a_window"] = sum(len(t) for t in outside.values())
    assert sum(len(t) for t in seen.values()) >= 46 * 3, seen
    assert not outside, outside
