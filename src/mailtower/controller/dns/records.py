"""The records a tower pair publishes: MX, A/AAAA and PTR record sets, keyed by zone and name.

These are the RRsets the pair *owns*: generation, diff, update and verification all work on
exactly these keys and never touch anything else in a zone (SOA, NS, a customer's A or TXT).
An empty record set means "must not exist" (e.g. AAAA of a tower without IPv6).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.reversename

from mailtower.controller.dns.model import TowerPair

MX = dns.rdatatype.MX
A = dns.rdatatype.A
AAAA = dns.rdatatype.AAAA
PTR = dns.rdatatype.PTR
IN = dns.rdataclass.IN


@dataclass(frozen=True, order=True)
class RRsetKey:
    """Where a record set lives: its zone, owner name and type."""

    zone: dns.name.Name
    name: dns.name.Name
    rdtype: dns.rdatatype.RdataType

    def __str__(self) -> str:
        return f"{self.name} {dns.rdatatype.to_text(self.rdtype)}"


@dataclass(frozen=True)
class RecordSet:
    """The records of one RRset and their TTL; no records means the RRset must not exist."""

    ttl: int
    rdatas: frozenset[dns.rdata.Rdata]

    @classmethod
    def of(cls, ttl: int, rdatas: Iterable[dns.rdata.Rdata]) -> RecordSet:
        return cls(ttl, frozenset(rdatas))

    def same_as(self, other: RecordSet) -> bool:
        """Same records and, if there are any, the same TTL."""
        return self.rdatas == other.rdatas and (not self.rdatas or self.ttl == other.ttl)

    def sorted(self) -> list[dns.rdata.Rdata]:
        return sorted(self.rdatas)  # DNSSEC canonical order: stable output


EMPTY = RecordSet(0, frozenset())

Records = dict[RRsetKey, RecordSet]


def rdata(rdtype: dns.rdatatype.RdataType, text: str) -> dns.rdata.Rdata:
    """One IN-class record from its presentation text (absolute names)."""
    return dns.rdata.from_text(IN, rdtype, text)


def _key(pair: TowerPair, name: str, rdtype: dns.rdatatype.RdataType) -> RRsetKey:
    zone = pair.zone_of(name)
    assert zone is not None, f"{name} is outside every zone: the model let it through"
    return RRsetKey(dns.name.from_text(zone), dns.name.from_text(name), rdtype)


def desired_records(pair: TowerPair) -> Records:
    """Every RRset the pair owns, as it should be served."""
    records: Records = {}
    mx = [rdata(MX, f"{pair.preference_of(t)} {host}") for t, host in pair.all_mx_hosts()]
    for domain in pair.domains:
        records[_key(pair, domain, MX)] = RecordSet.of(pair.ttl, mx)
    for tower, host in pair.all_mx_hosts():
        records[_key(pair, host, A)] = RecordSet.of(
            pair.ttl, [rdata(A, str(ip)) for ip in tower.ipv4]
        )
        records[_key(pair, host, AAAA)] = RecordSet.of(
            pair.ttl, [rdata(AAAA, str(ip)) for ip in tower.ipv6]
        )
    if pair.reverse:
        for tower in pair.towers:
            for ip in tower.addresses:
                owner = dns.reversename.from_address(str(ip)).to_text()
                records[_key(pair, owner, PTR)] = RecordSet.of(
                    pair.ttl, [rdata(PTR, tower.relay_name)]
                )
    return records
