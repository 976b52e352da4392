"""Apply a plan with RFC 2136 dynamic updates signed with TSIG, one atomic update per zone.

Each changed record set carries a prerequisite that the server still holds its old contents,
so an update never overwrites a change made after the plan (``ZoneChanged``: plan again).
Addresses go first and MX/PTR after, so no MX ever names a host before it has its address.
The SOA serial is left to the server (BIND bumps it on every update).
"""

from __future__ import annotations

import logging

import dns.name
import dns.rcode
import dns.update

from mailtower.controller.dns.diff import Plan, RecordChange, plan
from mailtower.controller.dns.exceptions import (
    TsigKeyError,
    UpdateFailed,
    UpdateRefused,
    ZoneChanged,
)
from mailtower.controller.dns.model import TowerPair
from mailtower.controller.dns.records import AAAA, A
from mailtower.controller.dns.server import AuthServer, exchange

log = logging.getLogger(__name__)

_PREREQUISITE_FAILED = (
    dns.rcode.NXRRSET,
    dns.rcode.YXRRSET,
    dns.rcode.NXDOMAIN,
    dns.rcode.YXDOMAIN,
)


def update_message(zone: dns.name.Name, changes: list[RecordChange]) -> dns.update.UpdateMessage:
    """The (unsigned) update of ``zone`` that makes ``changes``, guarded by prerequisites."""
    message = dns.update.UpdateMessage(zone)
    for change in changes:
        name, rdtype = change.key.name, change.key.rdtype
        if change.old.rdatas:
            message.present(name, *change.old.sorted())  # exactly these records, no others
        else:
            message.absent(name, rdtype)
    for change in changes:
        for rd in change.deleted:
            message.delete(change.key.name, rd)
        if change.added:
            message.add(change.key.name, change.new.ttl, *change.added)
    return message


def _send(server: AuthServer, zone: dns.name.Name, changes: list[RecordChange]) -> None:
    if server.key is None:
        raise TsigKeyError(f"zone {zone}: updates to {server} need a TSIG key; none was given")
    message = update_message(zone, changes)
    message.use_tsig(server.key.dnspython_key())
    answer = exchange(server, message, f"the update of zone {zone}")
    rcode = answer.rcode()
    if rcode == dns.rcode.NOERROR:
        return
    name = dns.rcode.to_text(rcode)
    if rcode == dns.rcode.REFUSED:
        raise UpdateRefused(
            f"{server} refused the update of zone {zone} (REFUSED): key {server.key.name} is not "
            "allowed to update it (allow-update / update-policy), or the zone is not dynamic"
        )
    if rcode in _PREREQUISITE_FAILED:
        raise ZoneChanged(
            f"zone {zone} on {server} changed since the plan ({name}); nothing was changed in "
            "it: plan again"
        )
    if rcode == dns.rcode.NOTAUTH:
        raise UpdateRefused(f"{server} is not authoritative for zone {zone} (NOTAUTH)")
    raise UpdateFailed(f"{server} did not apply the update of zone {zone}: {name}")


def apply(change_plan: Plan, server: AuthServer) -> None:
    """Send ``change_plan`` to ``server``; raise an UpdateError naming the zone that failed.

    Each zone's update is atomic; if one fails, the zones before it are updated and the rest
    not: planning and applying again finishes the job.
    """
    address_types = (A, AAAA)
    phases = [
        [c for c in change_plan.changes if c.key.rdtype in address_types],
        [c for c in change_plan.changes if c.key.rdtype not in address_types],
    ]
    for changes in phases:
        for zone in dict.fromkeys(c.key.zone for c in changes):
            in_zone = [c for c in changes if c.key.zone == zone]
            _send(server, zone, in_zone)
            log.info("updated zone %s on %s: %d record set(s)", zone, server, len(in_zone))


def publish(
    pair: TowerPair, server: AuthServer, *, dry_run: bool = False, prune: bool = False
) -> Plan:
    """Plan ``pair`` against ``server`` and, unless ``dry_run``, apply it; return the plan."""
    change_plan = plan(pair, server, prune=prune)
    if not dry_run and not change_plan.empty:
        apply(change_plan, server)
    return change_plan
