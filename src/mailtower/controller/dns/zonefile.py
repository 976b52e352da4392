"""Whole zones of a tower pair as dnspython ``Zone`` objects and zone-file text.

A zone file holds the SOA and NS of its apex, the delegations to published child zones (with
glue), the name servers' addresses that lie inside it, and the pair's records (unless only the
empty zone is wanted: a server creates the zone from that, and dynamic updates fill it).
"""

from __future__ import annotations

from pathlib import Path

import dns.name
import dns.rdatatype
import dns.zone

from mailtower.controller.dns.model import TowerPair
from mailtower.controller.dns.records import IN, A, RecordSet, desired_records, rdata

NS = dns.rdatatype.NS
SOA = dns.rdatatype.SOA


def _add(zone: dns.zone.Zone, name: dns.name.Name, records: RecordSet) -> None:
    if not records.rdatas:
        return
    rdataset = zone.find_rdataset(name, records.sorted()[0].rdtype, create=True)
    for rd in records.sorted():
        rdataset.add(rd, records.ttl)


def build_zones(pair: TowerPair, *, with_records: bool = True) -> dict[str, dns.zone.Zone]:
    """Every published zone of ``pair``, by zone name, in the order the model lists them."""
    zones: dict[str, dns.zone.Zone] = {}
    ns_rdatas = [rdata(NS, ns.name) for ns in pair.nameservers]
    for zone_name in pair.zones:
        origin = dns.name.from_text(zone_name)
        zone = dns.zone.Zone(origin, IN)
        hostmaster = pair.soa.hostmaster or f"hostmaster.{zone_name}"
        soa = pair.soa
        soa_text = (
            f"{pair.nameservers[0].name} {hostmaster} "
            f"{soa.serial} {soa.refresh} {soa.retry} {soa.expire} {soa.minimum}"
        )
        _add(zone, origin, RecordSet.of(pair.ttl, [rdata(SOA, soa_text)]))
        _add(zone, origin, RecordSet.of(pair.ttl, ns_rdatas))
        zones[zone_name] = zone
    for zone_name, zone in zones.items():
        apex = dns.name.from_text(zone_name)
        parent = pair.zone_of(apex.parent().to_text()) if apex != dns.name.root else None
        if parent is not None:
            # The parent delegates to this zone, so resolvers that start above find it.
            _add(zones[parent], apex, RecordSet.of(pair.ttl, ns_rdatas))
        for ns in pair.nameservers:
            ns_name = dns.name.from_text(ns.name)
            if ns_name.is_subdomain(apex):
                # The name server's address: authoritative here, or glue above a delegation.
                addresses = RecordSet.of(pair.ttl, [rdata(A, str(ip)) for ip in ns.ipv4])
                _add(zone, ns_name, addresses)
    if with_records:
        for key, records in desired_records(pair).items():
            _add(zones[key.zone.to_text()], key.name, records)
    return zones


def zone_text(zone: dns.zone.Zone) -> str:
    """The zone as a master file BIND loads (names relative to its $ORIGIN)."""
    return zone.to_text(want_origin=True, nl="\n")


def file_name(zone_name: str) -> str:
    """Conventional file name of a zone: ``db.<zone>`` (``db.1.201.10.in-addr.arpa``)."""
    return "db." + zone_name.rstrip(".")


def write_zone_files(
    pair: TowerPair, directory: Path, *, with_records: bool = True
) -> dict[str, Path]:
    """Write every zone of ``pair`` into ``directory``; return each zone's file."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for zone_name, zone in build_zones(pair, with_records=with_records).items():
        path = directory / file_name(zone_name)
        path.write_text(zone_text(zone))
        paths[zone_name] = path
    return paths
