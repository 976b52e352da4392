"""New Postfix and HAProxy packages on tower A's running relay, while mail flows (issue 19).

``invoke deploy --tower lab-a --relay-packages='--reinstall postfix haproxy'`` runs
mailtower-relay-upgrade on the relay (the lab's mirror has no newer package: a reinstall
replaces the binaries and runs the packages' scripts as an upgrade does). HAProxy is reloaded,
not restarted: the same master re-executes the new binary and the old worker finishes the
open filter sessions. Postfix restarts only after the filter transport is held and drained;
its port 25 refuses connections for those seconds (the sender retries, at tower B too: both
are MX). Meanwhile the sender hands a message to the towers every 0.2 s: none is tempfailed
on the content-filter hop, none lost, none delivered twice; defer_transports and main.cf are
as before.

Figures: tests/output/figures.json (relay_upgrade).
"""

from __future__ import annotations

import re
import socket
import threading
import time

from conftest import Pair
from test_60_sql_failover import invoke
from test_70_rule_bundles import Load, tempfails_since
from towerlib import record_figure

TOWER = "a"
HAPROXY_PID = "/run/haproxy.pid"
POSTFIX_PID = "/var/spool/postfix/pid/master.pid"


class PortWatch:
    """Connects to the relay's port 25 every 0.1 s; the longest run of refused connects."""

    def __init__(self, address: str, port: int) -> None:
        self.address, self.port = address, port
        self.longest, self.failures = 0.0, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        down_since: float | None = None
        while not self.stop.is_set():
            now = time.monotonic()
            try:
                socket.create_connection((self.address, self.port), timeout=2).close()
                down_since = None
            except OSError:
                self.failures += 1
                down_since = now if down_since is None else down_since
                self.longest = max(self.longest, time.monotonic() - down_since)
            time.sleep(0.1)

    def __enter__(self) -> PortWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def test_relay_packages_upgrade_without_a_tempfail(pair: Pair) -> None:
    tower = pair.towers[TOWER]
    relay = tower.relay()

    def sh(command: str) -> str:
        return relay.check_output(command).strip()

    haproxy_master = sh(f"cat {HAPROXY_PID}")
    postfix_master = sh(f"tr -d ' ' < {POSTFIX_PID}")
    defer_before = sh("postconf -h defer_transports")
    main_cf_before = sh("sha256sum /etc/postfix/main.cf")
    started = time.time()
    watch = PortWatch(str(tower.settings.hosts.relay), tower.settings.ports.smtp)
    with watch as port, Load(pair) as load:
        time.sleep(3)
        deployed = time.monotonic()
        invoke("deploy", "--tower", "lab-a", "--relay-packages=--reinstall postfix haproxy")
        deploy_s = time.monotonic() - deployed
        time.sleep(3)
    summary = sh(
        f"journalctl -q -t mailtower-relay-upgrade --since @{int(started)} -o cat | tail -n 1"
    )
    assert "postfix restarted" in summary and "haproxy reloaded" in summary, summary

    # HAProxy: the same master (reloaded, not restarted) on the new binary
    assert sh(f"cat {HAPROXY_PID}") == haproxy_master
    assert not sh(f"readlink /proc/{haproxy_master}/exe").endswith("(deleted)")
    # Postfix: a new master, started during this test, on the new binary
    now_master = sh(f"tr -d ' ' < {POSTFIX_PID}")
    assert now_master != postfix_master
    since = 'date -d "$(systemctl show -p ActiveEnterTimestamp --value postfix@-)" +%s'
    assert int(sh(since)) >= int(started)
    assert not sh(f"readlink /proc/{now_master}/exe").endswith("(deleted)")
    # the filter transport released: main.cf as the deploy wrote it
    assert sh("postconf -h defer_transports") == defer_before
    assert sh("sha256sum /etc/postfix/main.cf") == main_cf_before
    assert sh("test -e /etc/postfix/main.cf.mailtower-held || echo gone") == "gone"

    assert not load.errors, load.errors[:3]
    arrived = pair.wait_delivered(load.sent, timeout=300)
    lost = set(load.sent) - set(arrived)
    duplicated = sum(len(arrived[t]) - 1 for t in load.sent if t in arrived)
    tempfails = tempfails_since(pair, started)
    drained = re.search(r"drained in ([\d.]+) s, port 25 closed for ([\d.]+) s", summary)
    total = re.search(r"; ([\d.]+) s$", summary)
    record_figure(
        "relay_upgrade",
        {
            "upgrade_s": float(total.group(1)) if total else None,
            "deploy_s": round(deploy_s, 1),
            "filter_drain_s": float(drained.group(1)) if drained else None,
            "smtp_closed_s_by_the_script": float(drained.group(2)) if drained else None,
            "smtp_refused_s_seen_from_outside": round(port.longest, 1),
            "messages": len(load.sent),
            "tempfailed": tempfails,
            "lost": len(lost),
            "duplicated": duplicated,
        },
    )
    assert tempfails == 0
    assert not lost, sorted(lost)[:5]
    assert duplicated == 0
