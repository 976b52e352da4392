"""Alerts reach a person (issue 19): faults caused in tower lab-a and the alert mail read back
from the operators' mailbox (``alerts.to``: an address in customer 1's catch-all), by both
ways — the tower's own relay and the fallback (the twin tower's relay) — and by the fallback
alone while lab-a's relay is down.

The faults: a scanner's scand stopped; a filesystem filling (a small tmpfs the test mounts on a
scanner and fills: in LXC the root filesystem is the lab machine's disk, which a test must not
fill, while a tmpfs is a filesystem of its own the node exporter reports like any other); the
SQL standby stopped; the GOC unreachable from the monitor (nftables drops its packets there).
Every fault is put back, and the test waits for its alert to clear in Prometheus.

Figure: seconds from fault to mail, per fault and way (tests/output/figures.json,
``alerts_fault_to_mail_s``). The lab's timers (inventory/_lab.py ``alerts``) cap every rule's
``for:`` at 20 s, scrape and evaluate every 10 s and wait 5 s for a group.
"""

from __future__ import annotations

import base64
import calendar
import json
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import pytest
from conftest import Pair
from towerlib import FIGURES, MAILDIR, Tower, record_figure, wait_for

TOWER = "a"
# The test's own tmpfs on a scanner. Not under /mnt: Debian's node exporter leaves out /mnt,
# /media, /run (its mount-points-exclude), and in LXC the root is an overlay (left out by type),
# so a lab host reports only filesystems mounted elsewhere.
DISK_MOUNT = "/srv/mailtower-alert-disk"
GOC_CUT_TABLE = "mailtower_alert_test"  # nftables table on the monitor that drops the GOC
MAIL_TIMEOUT_S = 300
FIGURE = "alerts_fault_to_mail_s"


def tower(pair: Pair) -> Tower:
    return pair.towers[TOWER]


def ops_index(pair: Pair) -> int:
    """Which lab customer holds the operators' mailbox (its catch-all server)."""
    alerts = tower(pair).settings.alerts
    assert alerts is not None, "lab-a has no alerts settings (inventory/_lab.py)"
    domain = alerts.to[0].rsplit("@", 1)[1]
    return next(i for i, c in enumerate(pair.customers) if c.domain == domain)


def routes(pair: Pair) -> set[str]:
    alerts = tower(pair).settings.alerts
    assert alerts is not None
    return {"tower-relay", "fallback"} if alerts.fallback else {"tower-relay"}


# -- reading the operators' mailbox -------------------------------------------------------------


def alert_mails(pair: Pair) -> list[dict]:
    """Every alert mail in the catch-all: its way, subject, body, recipients and arrival time."""
    script = (
        "import os,json,sys,email,email.policy\n"
        "out=[]\n"
        "for sub in ('new','cur'):\n"
        f" d='{MAILDIR}/'+sub\n"
        " for f in (os.listdir(d) if os.path.isdir(d) else []):\n"
        "  p=os.path.join(d,f); raw=open(p,'rb').read()\n"
        "  if b'X-Mailtower-Alert-Route' not in raw[:16384]: continue\n"
        "  m=email.message_from_bytes(raw,policy=email.policy.default)\n"
        "  b=m.get_body(('plain',))\n"
        "  out.append({'route':str(m['X-Mailtower-Alert-Route']),'subject':str(m['Subject']),"
        "'to':str(m['To'] or ''),'body':b.get_content().replace('\\r\\n','\\n') if b else '',"
        "'mtime':os.stat(p).st_mtime})\n"
        "json.dump(out,sys.stdout)\n"
    )
    b64 = base64.b64encode(script.encode()).decode()
    node = pair.customer_node(ops_index(pair))
    return json.loads(node.check_output(f"echo {b64} | base64 -d | python3 -"))


_SINCE = re.compile(r"^- firing since (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC$", re.M)


def names(text: str, needle: str) -> bool:
    """Does ``text`` hold the label ``needle`` (``name=value``) whole (not .12 for .123)?"""
    return re.search(re.escape(needle) + r"(\s|$)", text, re.M) is not None


def fired_after(body: str, needle: str, start: float) -> bool:
    """Does the mail list a firing alert whose labels contain ``needle`` and that began at or
    after ``start`` (an older alert of the same name, repeated, does not count)?"""
    for item in body.split("\n- ")[1:]:
        item = "- " + item
        since = _SINCE.search(item)
        if not since or not names(item, needle):
            continue
        began = calendar.timegm(time.strptime(since.group(1), "%Y-%m-%d %H:%M:%S"))
        if began >= int(start) - 1:
            return True
    return False


def wait_alert_mail(
    pair: Pair, alertname: str, needle: str, start: float, ways: set[str]
) -> dict[str, float]:
    """Wait for the FIRING mail of ``alertname`` naming ``needle``, by every way in ``ways``;
    return way → seconds from ``start`` to its arrival in the mailbox."""
    name = tower(pair).settings.name

    def arrived():
        got: dict[str, float] = {}
        for mail in alert_mails(pair):
            subject = mail["subject"]
            if not subject.startswith("[FIRING") or f"{alertname} at {name}" not in subject:
                continue
            if mail["route"] in ways and fired_after(mail["body"], needle, start):
                seconds = mail["mtime"] - start
                got[mail["route"]] = min(got.get(mail["route"], seconds), seconds)
        return got if set(got) == ways else None

    return wait_for(arrived, MAIL_TIMEOUT_S, f"{alertname} mail ({needle}) by {sorted(ways)}", 2)


# -- Prometheus on the monitor ------------------------------------------------------------------


def firing(pair: Pair, alertname: str) -> list[dict]:
    """The monitor's Prometheus: alerts ``alertname`` pending or firing now."""
    s = tower(pair).settings
    url = f"http://{s.hosts.monitor}:{s.ports.prometheus}/api/v1/alerts"
    with urllib.request.urlopen(url, timeout=10) as resp:
        alerts = json.load(resp)["data"]["alerts"]
    return [a for a in alerts if a["labels"].get("alertname") == alertname]


def matching(alerts: list[dict], needle: str) -> list[dict]:
    """The alerts whose labels hold ``needle``. Prometheus's own API shows no external labels
    (``tower`` is added for Alertmanager): a ``tower=`` needle matches every one."""
    if needle.startswith("tower="):
        return alerts
    return [
        a for a in alerts if names(" ".join(f"{k}={v}" for k, v in a["labels"].items()), needle)
    ]


def assert_quiet(pair: Pair, alertname: str, needle: str) -> None:
    """The alert must not already be on before the fault: then its mail would prove nothing."""
    wait_for(
        lambda: not matching(firing(pair, alertname), needle) or None,
        120,
        f"{alertname} ({needle}) off before the fault",
        2,
    )


def wait_cleared(pair: Pair, alertname: str, needle: str) -> None:
    wait_for(
        lambda: not matching(firing(pair, alertname), needle) or None,
        180,
        f"{alertname} ({needle}) cleared after the fault was put back",
        2,
    )


def prove(
    pair: Pair,
    alertname: str,
    needle: str,
    fault: Callable[[], AbstractContextManager[None]],
    ways: set[str],
) -> dict[str, float]:
    """Cause ``fault``, wait for the mail by every way, put the fault back."""
    assert_quiet(pair, alertname, needle)
    start = time.time()
    with fault():
        took = wait_alert_mail(pair, alertname, needle, start, ways)
    wait_cleared(pair, alertname, needle)
    return took


def keep_figure(fault: str, took: dict[str, float]) -> None:
    figures = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    current = figures.get(FIGURE, {})
    current[fault] = {way: round(s, 1) for way, s in sorted(took.items())}
    record_figure(FIGURE, current)


# -- the faults ---------------------------------------------------------------------------------


def last_scanner(pair: Pair):
    t = tower(pair)
    entry = t.hosts("scanners")[-1]
    return entry, t.node(entry.name)


def last_scanner_name(pair: Pair) -> str:
    """Its name in the monitor's pool."""
    t = tower(pair)
    return t.settings.scanner_name(len(t.hosts("scanners")) - 1)


@contextmanager
def scand_stopped(pair: Pair) -> Iterator[None]:
    entry, node = last_scanner(pair)
    node.check_output("systemctl stop mailtower-scand")
    try:
        yield
    finally:
        node.check_output("systemctl start mailtower-scand")
        wait_for(
            lambda: tower(pair).pool()[last_scanner_name(pair)]["enabled"] or None,
            180,
            f"scanner {entry.address} back in the pool",
            2,
        )


@contextmanager
def disk_filling(pair: Pair) -> Iterator[None]:
    _, node = last_scanner(pair)
    mounted = node.run(
        f"mkdir -p {DISK_MOUNT} && mount -t tmpfs -o size=8m mailtower-alert-disk {DISK_MOUNT}"
    )
    assert mounted.rc == 0, (
        f"cannot mount a tmpfs in the lab scanner ({mounted.stderr.strip()}): the disk fault "
        "needs a filesystem of its own to fill"
    )
    try:
        # 95 % full: below the 10 % free of HostDiskFull.
        node.check_output(f"head -c $((8*1024*1024*95/100)) /dev/zero > {DISK_MOUNT}/fill")
        yield
    finally:
        node.run(f"umount {DISK_MOUNT}; rmdir {DISK_MOUNT}")


def standby_node(pair: Pair):
    t = tower(pair)
    for entry in t.hosts("sql"):
        node = t.node(entry.name)
        if t.psql("SELECT pg_is_in_recovery()", node) == "t":
            return entry, node
    raise AssertionError("lab-a has no SQL standby (pg_is_in_recovery on neither host)")


@contextmanager
def standby_stopped(pair: Pair) -> Iterator[None]:
    entry, node = standby_node(pair)
    node.check_output("systemctl stop postgresql@15-main")
    try:
        yield
    finally:
        node.check_output("systemctl start postgresql@15-main")
        t = tower(pair)
        primary = next(t.node(e.name) for e in t.hosts("sql") if e.name != entry.name)
        wait_for(
            lambda: (
                t.psql(
                    "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
                    " AND application_name NOT LIKE 'mt_%'",
                    primary,
                )
                != "0"
                or None
            ),
            180,
            f"standby {entry.address} streaming again",
            2,
        )


@contextmanager
def goc_cut(pair: Pair) -> Iterator[None]:
    monitor = tower(pair).monitor()
    rules = (
        f"table inet {GOC_CUT_TABLE} {{ chain output {{ type filter hook output priority 0;"
        f" ip daddr {pair.goc_addr} drop; }}; }}"
    )
    b64 = base64.b64encode(rules.encode()).decode()
    monitor.check_output(f"echo {b64} | base64 -d | nft -f -")
    try:
        yield
    finally:
        monitor.run(f"nft delete table inet {GOC_CUT_TABLE}")


# -- the checks ---------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def clean(pair: Pair) -> Iterator[None]:
    """No test fault left over from an interrupted run."""
    _, scanner = last_scanner(pair)
    scanner.run(f"umount {DISK_MOUNT} 2>/dev/null; rmdir {DISK_MOUNT} 2>/dev/null")
    tower(pair).monitor().run(f"nft delete table inet {GOC_CUT_TABLE} 2>/dev/null")
    yield


def test_a_stopped_scanner_is_mailed_by_both_ways(pair: Pair):
    entry, _ = last_scanner(pair)
    took = prove(
        pair, "ScannerDown", f"address={entry.address}", lambda: scand_stopped(pair), routes(pair)
    )
    keep_figure("scanner_stopped", took)


def test_a_filling_disk_is_mailed(pair: Pair):
    took = prove(
        pair, "HostDiskFull", f"mountpoint={DISK_MOUNT}", lambda: disk_filling(pair), routes(pair)
    )
    keep_figure("disk_filling", took)


def test_a_stopped_sql_standby_is_mailed(pair: Pair):
    name = tower(pair).settings.name
    took = prove(
        pair,
        "SqlStandbyNotStreaming",
        f"tower={name}",
        lambda: standby_stopped(pair),
        routes(pair),
    )
    keep_figure("sql_standby_stopped", took)


def test_an_unreachable_goc_is_mailed(pair: Pair):
    name = tower(pair).settings.name
    took = prove(pair, "GocUnreachable", f"tower={name}", lambda: goc_cut(pair), routes(pair))
    keep_figure("goc_unreachable", took)


def test_the_fallback_delivers_while_the_towers_relay_is_down(pair: Pair):
    """lab-a's Postfix stopped: the alert still reaches the operators through lab-b's relay."""
    if "fallback" not in routes(pair):
        pytest.fail("lab-a's alerts have no fallback (inventory/_lab.py alerts.fallback)")
    entry, _ = last_scanner(pair)

    @contextmanager
    def relay_down_and_scanner_stopped() -> Iterator[None]:
        with pair.relay_stopped(TOWER), scand_stopped(pair):
            yield

    took = prove(
        pair,
        "ScannerDown",
        f"address={entry.address}",
        relay_down_and_scanner_stopped,
        {"fallback"},
    )
    keep_figure("scanner_stopped_relay_down", took)
