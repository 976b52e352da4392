"""The typed description of a tower pair's DNS: towers, customer domains, preferences, zones.

Names are stored as absolute, lower-case text (``mx.tower-a.lab.``), so the model is plain
JSON. Each record lives in the *closest enclosing* published zone: list each customer domain
as its own zone, or one parent zone (``lab.``) that holds them all — both work, and a mix too.
Everything is checked here, before any record is built or sent.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING, Any, Literal

import dns.exception
import dns.name
import dns.reversename
from pydantic import Field, ValidationError, field_validator, model_validator

from mailtower.controller.dns.exceptions import InvalidPair
from mailtower.settings import StrictModel

if TYPE_CHECKING:
    from mailtower.settings import TowerSettings

EQUAL_PREFERENCE = 10  # both towers, or the primary tower
BACKUP_PREFERENCE = 20  # the backup tower in primary-backup mode

# RFC 1123 host name label (letters, digits, hyphens); IDNs are given in their xn-- form.
_LDH_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def _absolute(value: str, what: str, *, min_labels: int) -> str:
    """``value`` as an absolute lower-case LDH name, or ValueError naming it as ``what``."""
    text = value.strip().lower()
    hint = "letters, digits and hyphens; IDNs in their xn-- form"
    if not text or text == "." or ".." in text or text.startswith("."):
        raise ValueError(f"{what} {value!r} is not a valid domain name ({hint})")
    try:
        name = dns.name.from_text(text if text.endswith(".") else text + ".")
    except dns.exception.DNSException as exc:
        raise ValueError(f"{what} {value!r} is not a valid domain name: {exc}") from None
    labels = [label.decode("ascii", "replace") for label in name.labels[:-1]]
    bad = [label for label in labels if not _LDH_LABEL.match(label)]
    if bad:
        raise ValueError(f"{what} {value!r} is not a valid domain name: label {bad[0]!r} ({hint})")
    if len(labels) < min_labels:
        raise ValueError(f"{what} {value!r} needs at least {min_labels} labels (e.g. example.com)")
    return name.to_text()


def _duplicates(items: Iterable[Any]) -> list[Any]:
    seen: set[Any] = set()
    dups = []
    for item in items:
        if item in seen and item not in dups:
            dups.append(item)
        seen.add(item)
    return dups


class Tower(StrictModel):
    """One tower of the pair: where it stands, its MX host names and its relay's addresses."""

    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,30}$")
    site: str = Field(min_length=1)  # twins stand at different sites (docs/design.md)
    # Every name is an MX target of every customer domain and resolves to every address;
    # the first is the relay's own name (its PTR, SMTP banner and certificate).
    mx_hosts: list[str] = Field(min_length=1)
    ipv4: list[IPv4Address] = []  # required: a tower without IPv4 is refused below
    ipv6: list[IPv6Address] = []

    @field_validator("mx_hosts")
    @classmethod
    def _valid_hosts(cls, value: list[str]) -> list[str]:
        hosts = [_absolute(h, "MX host", min_labels=2) for h in value]
        if dups := _duplicates(hosts):
            raise ValueError(f"MX host {dups[0]} is listed twice")
        return hosts

    @model_validator(mode="after")
    def _addresses(self) -> Tower:
        if not self.ipv4:
            raise ValueError(f"tower {self.name} has no IPv4 address for its relay (ipv4: [...])")
        if dups := _duplicates([*self.ipv4, *self.ipv6]):
            raise ValueError(f"tower {self.name}: address {dups[0]} is listed twice")
        return self

    @property
    def relay_name(self) -> str:
        return self.mx_hosts[0]

    @property
    def addresses(self) -> list[IPv4Address | IPv6Address]:
        return [*self.ipv4, *self.ipv6]


class NameServer(StrictModel):
    """An authoritative server named in the zones' SOA and NS records."""

    name: str
    ipv4: list[IPv4Address] = []  # needed when the name lies inside a published zone

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return _absolute(value, "name server", min_labels=2)


class Soa(StrictModel):
    """SOA values of generated zone files (dynamic updates never touch the SOA)."""

    serial: int = Field(default=1, ge=1, le=2**32 - 1)  # BIND bumps it on every update
    hostmaster: str | None = None  # mailbox as a name; default hostmaster.<zone>
    refresh: int = Field(default=3600, ge=1)
    retry: int = Field(default=600, ge=1)
    expire: int = Field(default=1209600, ge=1)  # two weeks
    minimum: int = Field(default=300, ge=0)  # negative-answer TTL

    @field_validator("hostmaster")
    @classmethod
    def _valid_mailbox(cls, value: str | None) -> str | None:
        return None if value is None else _absolute(value, "hostmaster", min_labels=2)


class TowerPair(StrictModel):
    """Two twin towers, the customer domains both receive mail for, and where to publish."""

    towers: list[Tower] = Field(min_length=2, max_length=2)
    domains: list[str] = Field(min_length=1)  # customer mail domains, shared by the pair
    # equal: both towers MX 10 (senders share the load); primary-backup: primary 10, backup 20.
    preference: Literal["equal", "primary-backup"] = "equal"
    primary: str | None = None  # primary-backup only: the primary tower's name (default: first)
    zones: list[str] = Field(min_length=1)  # forward and reverse zones the records live in
    nameservers: list[NameServer] = Field(min_length=1)  # the first is the SOA primary
    ttl: int = Field(default=300, ge=0, le=2**31 - 1)  # short: a moved tower is seen soon
    reverse: bool = True  # publish a PTR for every relay address (needs its reverse zone)
    soa: Soa = Soa()

    @field_validator("domains")
    @classmethod
    def _valid_domains(cls, value: list[str]) -> list[str]:
        domains = [_absolute(d, "customer domain", min_labels=2) for d in value]
        if dups := _duplicates(domains):
            raise ValueError(f"customer domain {dups[0]} is listed twice")
        return domains

    @field_validator("zones")
    @classmethod
    def _valid_zones(cls, value: list[str]) -> list[str]:
        zones = [_absolute(z, "zone", min_labels=1) for z in value]
        if dups := _duplicates(zones):
            raise ValueError(f"zone {dups[0]} is listed twice")
        return zones

    @model_validator(mode="after")
    def _consistent(self) -> TowerPair:
        a, b = self.towers
        if a.name == b.name:
            raise ValueError(f"both towers are named {a.name}")
        if a.site == b.site:
            raise ValueError(f"towers {a.name} and {b.name} stand at the same site {a.site!r}")
        if shared := sorted(str(ip) for ip in set(a.addresses) & set(b.addresses)):
            raise ValueError(
                f"address {shared[0]} is given to both tower {a.name} and tower {b.name}"
            )
        if shared := sorted(set(a.mx_hosts) & set(b.mx_hosts)):
            raise ValueError(
                f"MX host {shared[0]} is given to both tower {a.name} and tower {b.name}"
            )
        if self.preference == "equal" and self.primary is not None:
            raise ValueError("primary is only used with preference 'primary-backup'")
        if self.primary is not None and self.primary not in (a.name, b.name):
            raise ValueError(f"primary {self.primary!r} is neither tower {a.name} nor {b.name}")
        ns_names = [ns.name for ns in self.nameservers]
        if dups := _duplicates(ns_names):
            raise ValueError(f"name server {dups[0]} is listed twice")
        self._check_placement()
        return self

    def _check_placement(self) -> None:
        zones = ", ".join(self.zones)
        for domain in self.domains:
            if self.zone_of(domain) is None:
                raise ValueError(
                    f"customer domain {domain} is outside every published zone ({zones}); "
                    "add its zone to zones"
                )
        for tower in self.towers:
            for host in tower.mx_hosts:
                if self.zone_of(host) is None:
                    raise ValueError(
                        f"MX host {host} of tower {tower.name} is outside every published zone "
                        f"({zones}); add its zone to zones"
                    )
                if host in self.domains:
                    raise ValueError(f"MX host {host} is also a customer domain")
            if not self.reverse:
                continue
            for ip in tower.addresses:
                ptr = dns.reversename.from_address(str(ip)).to_text()
                if self.zone_of(ptr) is None:
                    raise ValueError(
                        f"relay address {ip} of tower {tower.name} has no published reverse "
                        f"zone for {ptr}; add one to zones or set reverse: false"
                    )
        mx_hosts = {h for t in self.towers for h in t.mx_hosts}
        for ns in self.nameservers:
            if ns.name in mx_hosts:
                raise ValueError(f"name server {ns.name} is also an MX host")
            if self.zone_of(ns.name) is not None and not ns.ipv4:
                raise ValueError(
                    f"name server {ns.name} lies inside zone {self.zone_of(ns.name)} and needs "
                    "its address there (ipv4: [...])"
                )

    def zone_of(self, name: str) -> str | None:
        """The published zone ``name`` belongs to: the closest enclosing one, or None."""
        target = dns.name.from_text(name)
        best: dns.name.Name | None = None
        for zone in self.zones:
            apex = dns.name.from_text(zone)
            if target.is_subdomain(apex) and (best is None or apex.is_subdomain(best)):
                best = apex
        return None if best is None else best.to_text()

    def preference_of(self, tower: Tower) -> int:
        """MX preference of ``tower``'s hosts in every customer domain."""
        if self.preference == "equal":
            return EQUAL_PREFERENCE
        primary = self.primary or self.towers[0].name
        return EQUAL_PREFERENCE if tower.name == primary else BACKUP_PREFERENCE

    def all_mx_hosts(self) -> Iterator[tuple[Tower, str]]:
        """Every MX host name of the pair, with its tower."""
        for tower in self.towers:
            for host in tower.mx_hosts:
                yield tower, host


def load_pair(data: Any) -> TowerPair:
    """Validate a pair's description; raise InvalidPair listing every bad item."""
    try:
        return TowerPair.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            message = str(err["msg"]).removeprefix("Value error, ")
            if err["type"] != "value_error" and isinstance(err.get("input"), str | int):
                message += f" (got {err['input']!r})"
            lines.append(f"  {where}: {message}" if where else f"  {message}")
        raise InvalidPair("invalid tower pair:\n" + "\n".join(lines)) from exc


def pair_from_settings(
    first: TowerSettings,
    second: TowerSettings,
    *,
    sites: tuple[str, str],
    **publication: Any,
) -> TowerPair:
    """The pair of two towers' settings: their relay names and addresses, their customers.

    Both towers must relay the same customer domains (a twin that does not know a domain
    would refuse its mail). ``publication`` gives zones, nameservers, preference and the rest.
    """
    domains = [c.domain for c in first.customers]
    other = {c.domain for c in second.customers}
    if only := sorted(set(domains) ^ other):
        raise InvalidPair(
            f"towers {first.name} and {second.name} do not relay the same customer domains "
            f"(only one of them has: {', '.join(only)})"
        )
    towers = [
        {
            "name": s.name,
            "site": site,
            "mx_hosts": [s.hostname],
            "ipv4": [str(s.hosts.relay)],
        }
        for s, site in zip((first, second), sites, strict=True)
    ]
    return load_pair({"towers": towers, "domains": domains, **publication})
