"""A whole tower: every role on the hosts of its inventory group, in dependency order."""

from __future__ import annotations

from pyinfra import host
from pyinfra.operations import apt

from roles import monitor, relay, scanner, sql
from roles._common import barrier

ROLES = {"sql": sql, "monitor": monitor, "relay": relay, "scanners": scanner}


def install_packages(extra: list[str] | None = None) -> None:
    """One apt operation for every host, so all hosts install their packages at once."""
    packages = sorted(
        {p for g, role in ROLES.items() if g in host.groups for p in role.PACKAGES}
        | set(extra or [])
    )
    if packages:
        # A few hosts at a time: many hosts refreshing the same indexes through one apt proxy
        # at once can stall it (seen with apt-cacher-ng in the lab).
        apt.update(name="Refresh the apt package lists", cache_time=86400, _parallel=6)
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
