"""What must change on the server: the pair's desired record sets against those it serves.

``diff`` is pure (records in, changes out); ``plan`` fetches what the server serves for
exactly the pair's record sets and diffs. A change keeps both sides of its record set, so
the update can require the server to still hold the old one (nothing is overwritten blindly).

With ``prune``, ``plan`` also transfers each published zone (AXFR) and deletes the records
the pair left behind: MX records naming one of its hosts at a domain it no longer serves,
and PTR records naming one of its hosts at an address it no longer has. (The addresses of an
MX host name that was dropped from the pair cannot be told apart from anyone else's and stay.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import dns.name
import dns.rdata
import dns.rdatatype
import dns.zone
from dns.rdtypes.mxbase import MXBase
from dns.rdtypes.nsbase import NSBase

from mailtower.controller.dns.model import TowerPair
from mailtower.controller.dns.records import (
    EMPTY,
    MX,
    PTR,
    Records,
    RecordSet,
    RRsetKey,
    desired_records,
)
from mailtower.controller.dns.server import AuthServer, check_serves_zone, served, transfer


def _line(sign: str, key: RRsetKey, ttl: int, rd: dns.rdata.Rdata) -> str:
    return f"{sign} {key.name} {ttl} IN {dns.rdatatype.to_text(key.rdtype)} {rd}"


@dataclass(frozen=True)
class RecordChange:
    """One record set to change: what the server has (``old``) and what it should have."""

    key: RRsetKey
    old: RecordSet
    new: RecordSet

    @property
    def _ttl_changes(self) -> bool:
        return bool(self.old.rdatas and self.new.rdatas) and self.old.ttl != self.new.ttl

    @property
    def deleted(self) -> list[dns.rdata.Rdata]:
        """Records to delete (all of them when only the TTL changes: it is per record set)."""
        if self._ttl_changes:
            return self.old.sorted()
        return sorted(self.old.rdatas - self.new.rdatas)

    @property
    def added(self) -> list[dns.rdata.Rdata]:
        if self._ttl_changes:
            return self.new.sorted()
        return sorted(self.new.rdatas - self.old.rdatas)

    def lines(self) -> list[str]:
        """``- name ttl IN TYPE data`` for each deletion, then ``+ …`` for each addition."""
        return [_line("-", self.key, self.old.ttl, rd) for rd in self.deleted] + [
            _line("+", self.key, self.new.ttl, rd) for rd in self.added
        ]


@dataclass(frozen=True)
class Plan:
    """The changes that make ``server`` serve the pair's records; empty when it already does."""

    server: str
    changes: tuple[RecordChange, ...]

    @property
    def empty(self) -> bool:
        return not self.changes

    def zones(self) -> list[str]:
        """The zones with changes, in order."""
        return list(dict.fromkeys(c.key.zone.to_text() for c in self.changes))

    def to_text(self) -> str:
        """The plan for people: changes grouped by zone, then a one-line summary."""
        if self.empty:
            return f"{self.server}: no changes, it serves every record of the pair"
        lines = []
        for zone in self.zones():
            lines.append(f"zone {zone}")
            for change in self.changes:
                if change.key.zone.to_text() == zone:
                    lines += ["  " + line for line in change.lines()]
        added = sum(len(c.added) for c in self.changes)
        deleted = sum(len(c.deleted) for c in self.changes)
        lines.append(
            f"{self.server}: {added} to add, {deleted} to delete in {len(self.zones())} zone(s)"
        )
        return "\n".join(lines)

    def as_json(self) -> dict:
        """The plan for programs."""
        return {
            "server": self.server,
            "changes": [
                {
                    "zone": c.key.zone.to_text(),
                    "name": c.key.name.to_text(),
                    "type": dns.rdatatype.to_text(c.key.rdtype),
                    "delete": [{"ttl": c.old.ttl, "data": rd.to_text()} for rd in c.deleted],
                    "add": [{"ttl": c.new.ttl, "data": rd.to_text()} for rd in c.added],
                }
                for c in self.changes
            ],
        }


def diff(
    desired: Mapping[RRsetKey, RecordSet], current: Mapping[RRsetKey, RecordSet]
) -> list[RecordChange]:
    """The changes that turn ``current`` into ``desired``, for the keys of ``desired`` only."""
    changes = []
    for key in sorted(desired):
        old = current.get(key, EMPTY)
        if not old.same_as(desired[key]):
            changes.append(RecordChange(key, old, desired[key]))
    return changes


def served_records(server: AuthServer, keys: list[RRsetKey]) -> Records:
    """What ``server`` serves for ``keys``, after checking it serves each of their zones."""
    for zone in dict.fromkeys(k.zone for k in keys):
        check_serves_zone(server, zone)
    return {key: served(server, key) for key in keys}


def _target(rd: dns.rdata.Rdata) -> str:
    if isinstance(rd, MXBase):
        return rd.exchange.to_text()
    assert isinstance(rd, NSBase)  # PTR has the same shape as NS
    return rd.target.to_text()


def stale_records(pair: TowerPair, contents: dns.zone.Zone) -> tuple[Records, Records]:
    """Record sets of a zone's ``contents`` that name the pair's hosts where it no longer
    publishes: (what is served there, what should remain once the pair's records are gone)."""
    origin = contents.origin
    assert origin is not None
    owned = desired_records(pair)
    hosts = {host for _, host in pair.all_mx_hosts()}
    served_now: Records = {}
    remaining: Records = {}
    for name, rdataset in contents.iterate_rdatasets():
        if rdataset.rdtype not in (MX, PTR):
            continue
        key = RRsetKey(origin, name.derelativize(origin), rdataset.rdtype)
        ours = {rd for rd in rdataset if _target(rd) in hosts}
        if key in owned or not ours:
            continue
        served_now[key] = RecordSet.of(rdataset.ttl, rdataset)
        remaining[key] = RecordSet.of(rdataset.ttl, set(rdataset) - ours)
    return served_now, remaining


def plan(pair: TowerPair, server: AuthServer, *, prune: bool = False) -> Plan:
    """The changes ``server`` needs to serve ``pair``'s records (sends no update).

    ``prune`` also deletes the records the pair left behind (needs AXFR of every zone).
    """
    desired = desired_records(pair)
    current = served_records(server, list(desired))
    if prune:
        for zone in pair.zones:
            stale, remaining = stale_records(pair, transfer(server, dns.name.from_text(zone)))
            current.update(stale)
            desired.update(remaining)
    return Plan(str(server), tuple(diff(desired, current)))
