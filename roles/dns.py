"""An authoritative DNS server (BIND 9) whose zones take RFC 2136 updates signed with TSIG.

The lab's "internet" runs one; `invoke dns` publishes the towers' MX records into it
(mailtower.controller.dns). A real pair publishes into its operator's own authoritative
servers instead. Its host data ``dns`` is a ``mailtower.settings.DnsServer``.

Install: ``PACKAGES`` only (the deploy installs them).
"""

from __future__ import annotations

import io

from jinja2 import Template
from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.files import File
from pyinfra.operations import files

from mailtower.settings import DnsServer
from roles import _common
from roles._common import TEMPLATES

PACKAGES = ["bind9", "bind9-dnsutils"]
ZONE_DIR = "/var/lib/bind"  # writable by named: dynamic zones keep their journal here


def zone_file(zone: str) -> str:
    return f"{ZONE_DIR}/db.{zone.rstrip('.')}"


def settings() -> DnsServer:
    """The ``dns`` host data, validated: DeployError naming the host and the bad field."""
    return _common.host_settings(DnsServer, "dns", "inventory/lab_internet.py")


def configure(d: DnsServer) -> list:
    rendered = []
    for name in ("named.conf.options", "named.conf.local"):
        rendered.append(
            files.template(
                name=f"Render /etc/bind/{name}",
                src=str(TEMPLATES / f"dns/etc/bind/{name}.j2"),
                dest=f"/etc/bind/{name}",
                internet=d,
                zone_file=zone_file,
                mode="644",
                user="root",
                group="bind",
            )
        )
    rendered.append(
        files.template(
            name="Render /etc/bind/mailtower-update.key",
            src=str(TEMPLATES / "dns/etc/bind/mailtower-update.key.j2"),
            dest="/etc/bind/mailtower-update.key",
            key=d.tsig,
            mode="640",
            user="root",
            group="bind",
        )
    )
    # A dynamic zone belongs to named once it exists (records arrive by RFC 2136 and live in
    # its journal): the seed with SOA and NS is written only when the zone file is missing.
    for zone in d.zones:
        path = zone_file(zone)
        if host.get_fact(File, path=path) is None:
            seed = (TEMPLATES / "dns/var/lib/bind/db.zone.j2").read_text()
            text = Template(seed, keep_trailing_newline=True).render(
                zone=zone.rstrip("."), internet=d
            )
            rendered.append(
                files.put(
                    name=f"Seed {path}",
                    src=io.BytesIO(text.encode()),
                    dest=path,
                    mode="644",
                    user="bind",
                    group="bind",
                )
            )
    return rendered


def activate(ops: list) -> None:
    _common.activate("named", _common.changes(ops), check="named-checkconf -z")


@deploy("mailtower authoritative DNS (BIND 9)")
def deploy_dns():
    activate(configure(settings()))
