"""A whole tower: every role on the hosts of its inventory group, in dependency order."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pyinfra import host
from pyinfra.facts.files import File
from pyinfra.facts.server import Date
from pyinfra.operations import apt, server

from roles import monitor, relay, scanner, sql
from roles._common import barrier, settings

ROLES = {"sql": sql, "monitor": monitor, "relay": relay, "scanners": scanner}


APT_STAMP = "/var/lib/apt/periodic/update-success-stamp"  # pyinfra's apt.update uses it too


def refresh_package_lists(max_age_s: int = 86400) -> None:
    """apt-get update when the lists are older than a day: one host at a time, bounded, retried.

    Seen in the lab: when hosts refresh the same index through one apt-cacher-ng within the
    same second, one request can stall until apt's own timeout or forever (the proxy fails to
    rename its temporary file). One host at a time (about 1.5 s each) avoids the collision;
    `timeout` and three attempts bound what is left.
    """
    stamp = host.get_fact(File, path=APT_STAMP)
    fresh = False
    if stamp and stamp.get("mtime"):
        now = datetime.fromtimestamp(host.get_fact(Date).timestamp(), UTC)
        fresh = stamp["mtime"] > now.replace(tzinfo=None) - timedelta(seconds=max_age_s)
    server.shell(
        name="Refresh the apt package lists",
        commands=[
            "for attempt in 1 2 3; do timeout 30 apt-get update -q && break;"
            ' [ "$attempt" = 3 ] && exit 1; sleep 2; done',
            f"mkdir -p {APT_STAMP.rsplit('/', 1)[0]} && touch {APT_STAMP}",
        ],
        _if=lambda: not fresh,
        _serial=True,
    )


def install_packages(extra: list[str] | None = None) -> None:
    """One apt operation for every host, so all hosts install their packages at once."""
    packages = sorted(
        {p for g, role in ROLES.items() if g in host.groups for p in role.PACKAGES}
        | set(extra or [])
    )
    if packages:
        refresh_package_lists()
        apt.packages(
            name="Install the role's Debian packages", packages=packages, no_recommends=True
        )


def deploy_tower(extra_packages: list[str] | None = None) -> None:
    """Every role of the tower, in phases that hold across hosts (see _common.barrier)."""
    install_packages(extra_packages)
    barrier("packages installed")
    if "sql" in host.groups:
        sql.deploy_sql()
    barrier("SQL pair ready")
    if "monitor" in host.groups:
        monitor.deploy_monitor()  # the signature mirror the scanners pull from
    barrier("monitor and signature mirror ready")
    if "relay" in host.groups:
        relay.deploy_relay()
    if "scanners" in host.groups:
        scanner.deploy_scanner()
    barrier("scanners deployed")
    if "monitor" in host.groups and settings().secrets.canary is not None:
        monitor.wait_for_upgrade()  # the scanners' new code, rolled in drained windows
