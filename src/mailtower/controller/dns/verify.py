"""Is the pair published? Ask the authoritative server directly and list what is wrong."""

from __future__ import annotations

import dns.name
import dns.rdatatype
import dns.reversename
from dns.rdtypes.mxbase import MXBase

from mailtower.controller.dns.exceptions import NameConflict, NotAuthoritative, QueryFailed
from mailtower.controller.dns.model import Tower, TowerPair
from mailtower.controller.dns.records import AAAA, MX, PTR, A, RecordSet, RRsetKey
from mailtower.controller.dns.server import AuthServer, served


def _served(
    server: AuthServer, pair: TowerPair, name: str, rdtype: dns.rdatatype.RdataType
) -> tuple[RecordSet | None, str | None]:
    """The record set served for ``name``/``rdtype``, or None and why it could not be read."""
    zone = pair.zone_of(name)
    assert zone is not None
    key = RRsetKey(dns.name.from_text(zone), dns.name.from_text(name), rdtype)
    try:
        return served(server, key), None
    except (NotAuthoritative, QueryFailed, NameConflict) as exc:
        return None, str(exc)


def _mx_problems(pair: TowerPair, domain: str, records: RecordSet) -> list[str]:
    if not records.rdatas:
        return [f"{domain}: no MX records"]
    found = {
        rd.exchange.to_text(): rd.preference for rd in records.rdatas if isinstance(rd, MXBase)
    }
    problems = []
    for tower in pair.towers:
        if not any(host in found for host in tower.mx_hosts):
            problems.append(
                f"{domain}: MX set names no host of tower {tower.name} "
                f"(expected {', '.join(tower.mx_hosts)})"
            )
            continue
        want = pair.preference_of(tower)
        for host in tower.mx_hosts:
            if host not in found:
                problems.append(f"{domain}: MX {want} {host} (tower {tower.name}) is missing")
            elif found[host] != want:
                problems.append(
                    f"{domain}: MX {host} (tower {tower.name}) has preference {found[host]}, "
                    f"expected {want}"
                )
    ours = {host for _, host in pair.all_mx_hosts()}
    for host in sorted(set(found) - ours):
        problems.append(f"{domain}: MX {found[host]} {host} is no host of the pair")
    return problems


def _address_problems(
    tower: Tower, host: str, rdtype: dns.rdatatype.RdataType, records: RecordSet
) -> list[str]:
    want = {str(ip) for ip in (tower.ipv4 if rdtype == A else tower.ipv6)}
    got = {rd.to_text() for rd in records.rdatas}
    type_text = dns.rdatatype.to_text(rdtype)
    if got == want:
        return []
    if not want:
        return [f"{host}: has {type_text} {', '.join(sorted(got))}; tower {tower.name} has none"]
    return [
        f"{host}: resolves to {', '.join(sorted(got)) or 'nothing'} ({type_text}), expected the "
        f"relay of tower {tower.name} at {', '.join(sorted(want))}"
    ]


def check_published(pair: TowerPair, server: AuthServer) -> list[str]:
    """Problems with what ``server`` serves for ``pair``; an empty list means all is right.

    Every customer domain's MX set must name the hosts of both towers with the configured
    preferences (and nothing else); every MX host must resolve to its tower's relay addresses
    (A and AAAA), and with ``reverse`` each relay address must point back to its relay name.
    Raises ServerUnreachable if the server does not answer at all.
    """
    problems: list[str] = []
    for domain in pair.domains:
        records, error = _served(server, pair, domain, MX)
        problems += (
            [f"{domain}: {error}"] if records is None else _mx_problems(pair, domain, records)
        )
    for tower, host in pair.all_mx_hosts():
        for rdtype in (A, AAAA):
            records, error = _served(server, pair, host, rdtype)
            if records is None:
                problems.append(f"{host}: {error}")
            else:
                problems += _address_problems(tower, host, rdtype, records)
    if pair.reverse:
        for tower in pair.towers:
            for ip in tower.addresses:
                owner = dns.reversename.from_address(str(ip)).to_text()
                records, error = _served(server, pair, owner, PTR)
                got = sorted(rd.to_text() for rd in records.rdatas) if records else []
                if records is None:
                    problems.append(f"{ip}: {error}")
                elif got != [tower.relay_name]:
                    problems.append(
                        f"{ip}: PTR is {', '.join(got) or 'missing'}, expected {tower.relay_name} "
                        f"(tower {tower.name})"
                    )
    return problems
