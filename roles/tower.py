"""A whole tower: every role on the hosts of its inventory group, in dependency order."""

from __future__ import annotations

from pyinfra import host

from roles import monitor, relay, scanner, sql


def deploy_tower() -> None:
    # Order matters across hosts: SQL (primary before standby) first, then the monitor's
    # mirror the scanners pull from, then relay and scanners.
    if "sql" in host.groups:
        sql.deploy_sql()
    if "monitor" in host.groups:
        monitor.deploy_monitor()
    if "relay" in host.groups:
        relay.deploy_relay()
    if "scanners" in host.groups:
        scanner.deploy_scanner()
