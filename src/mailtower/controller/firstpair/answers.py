"""What ``mailtower init`` asks: a twin pair's names, sites, hosts, relay names, GOC and first
customers, checked as a whole before anything is written (each bad field named)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network
from typing import Literal

from pydantic import Field, field_validator, model_validator

from mailtower.controller.errors import InitError
from mailtower.errors import SettingsError
from mailtower.settings import Customer, StrictModel, validate

_NAME = r"^[a-z][a-z0-9-]{0,30}$"  # TowerSettings.name
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_HOST_NAME_RE = re.compile(rf"^{_LABEL}(\.{_LABEL})+$")  # at least two labels
_ZONE_RE = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")  # a zone may be one label ("lab")
Sizing = Literal["production", "lab"]


def _host_name(value: str) -> str:
    value = value.strip().rstrip(".").lower()
    if not _HOST_NAME_RE.match(value):
        raise ValueError(f"{value!r} is not a DNS host name (e.g. mx.tower-a.example.net)")
    return value


def parse_addresses(text: str) -> list[str]:
    """Addresses given as a list and ranges: ``10.0.1.101-10.0.1.123``, ``10.0.1.101-123``,
    ``10.0.1.5,10.0.1.7``, or a mix; ValueError naming the bad item."""
    out: list[str] = []
    for item in (part.strip() for part in text.replace(" ", ",").split(",")):
        if not item:
            continue
        if "-" not in item:
            out.append(item)
            continue
        first_text, _, last_text = item.partition("-")
        try:
            first = IPv4Address(first_text)
            last = (
                IPv4Address(last_text)
                if "." in last_text
                else IPv4Address(f"{first_text.rsplit('.', 1)[0]}.{last_text}")
            )
        except ValueError:
            raise ValueError(f"{item!r} is not a range of IPv4 addresses (A-B or A-N)") from None
        if last < first or int(last) - int(first) > 1024:
            raise ValueError(f"{item!r}: the range must go up, at most 1,024 addresses")
        out += [str(IPv4Address(n)) for n in range(int(first), int(last) + 1)]
    return out


class TowerAnswers(StrictModel):
    """One tower of the pair."""

    name: str = Field(pattern=_NAME)  # inventory/<name>.py, with dashes as underscores
    site: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$")
    mx: str  # the relay's public name: every customer domain's MX names it
    relay: IPv4Address
    monitor: IPv4Address
    sql: list[IPv4Address] = Field(min_length=2, max_length=2)  # primary, then standby
    # A pool: one scanner out (a restart, a rule update) must leave another in service.
    scanners: list[IPv4Address] = Field(min_length=2, max_length=250)

    @field_validator("mx")
    @classmethod
    def _mx(cls, value: str) -> str:
        return _host_name(value)

    @field_validator("scanners", "sql", mode="before")
    @classmethod
    def _ranges(cls, value: object) -> object:
        return parse_addresses(value) if isinstance(value, str) else value

    def addresses(self) -> list[tuple[str, IPv4Address]]:
        """Every host of the tower as (role, address)."""
        return [
            ("relay", self.relay),
            ("monitor", self.monitor),
            *(("sql", ip) for ip in self.sql),
            *(("scanners", ip) for ip in self.scanners),
        ]


class InitAnswers(StrictModel):
    """A twin pair, its GOC and its first customers: everything ``init`` writes from."""

    pair: str = Field(pattern=_NAME)  # inventory/pair_<pair>.py; secrets in <dir>/<pair>/…
    towers: list[TowerAnswers] = Field(min_length=2, max_length=2)
    goc: IPv4Address  # the GOC host (PostgreSQL hub, VirusEye, bundles, ClamAV mirror)
    goc_backup: IPv4Address  # the GOC's pgBackRest repository host: not the GOC, no tower's
    customers: list[Customer] = Field(min_length=1)
    # The pair's authoritative DNS server (RFC 2136 updates, `invoke dns`) and its NS name.
    dns_server: IPv4Address
    dns_name: str
    # Zones the pair's records go in; empty: each customer domain, each MX name's parent and
    # each relay's /24 reverse zone.
    zones: list[str] = []
    operator_networks: list[IPv4Network] = []  # SSH and the monitor's interfaces answer these
    ssh_user: str = Field("root", pattern=r"^[a-z_][a-z0-9_-]{0,31}$")
    ssh_key: str | None = Field(None, pattern=r"^/\S+$")  # None: the SSH agent
    # None: ~/.ssh/known_hosts, a new host's key accepted on first contact (pyinfra's default)
    ssh_known_hosts: str | None = Field(None, pattern=r"^/\S+$")
    sizing: Sizing = "production"  # the preflight's table (lab: the lab's containers)
    # More data for a tower's ``mailtower`` (key: its name) or the GOC's ``goc`` (key "goc"),
    # written into the inventory over what init makes (write.merge_extra: a section init makes
    # is merged one level, anything else replaced): the relay's ``tls``, ``alerts``,
    # ``postmaster``, … (the lab's CI gives its own this way: inventory/_lab.py lab_extra). The
    # deploy validates it as any inventory's.
    extra: dict[str, dict[str, object]] = {}

    @field_validator("dns_name")
    @classmethod
    def _dns(cls, value: str) -> str:
        return _host_name(value)

    @property
    def goc_name(self) -> str:
        """The GOC's inventory name: inventory/<pair>_goc.py."""
        return f"{self.pair}-goc"

    @field_validator("zones")
    @classmethod
    def _zones(cls, value: list[str]) -> list[str]:
        zones = [z.strip().rstrip(".").lower() for z in value]
        for zone in zones:
            if not _ZONE_RE.match(zone):
                raise ValueError(f"{zone!r} is not a DNS zone name")
        return zones

    @model_validator(mode="after")
    def _consistent(self) -> InitAnswers:
        a, b = self.towers
        for what, one, two in (("name", a.name, b.name), ("site", a.site, b.site)):
            if one == two:
                raise ValueError(f"towers.1.{what}: both towers have {what} {one!r}")
        if a.mx == b.mx:
            raise ValueError(f"towers.1.mx: both towers have relay name {a.mx}")
        if self.pair in (a.name, b.name) or self.goc_name in (a.name, b.name):
            raise ValueError(f"pair: {self.pair!r} names a tower's inventory too")
        for i, t in enumerate(self.towers):
            # <secrets>/goc/ is the GOC's; inventory/pair_<pair>.py the pair file
            if t.name in ("goc", f"pair-{self.pair}"):
                raise ValueError(
                    f"towers.{i}.name: {t.name!r} is taken (the GOC's secrets or the pair"
                    " file): choose another tower name"
                )
        seen: dict[IPv4Address, str] = {}
        every = [
            *(
                (f"towers.{i}.{role}", ip)
                for i, t in enumerate(self.towers)
                for role, ip in t.addresses()
            ),
            ("goc", self.goc),
            ("goc_backup", self.goc_backup),
        ]
        for where, ip in every:
            if ip in seen:
                raise ValueError(f"{where}: address {ip} is given to {seen[ip]} too")
            seen[ip] = where
        unknown = sorted(set(self.extra) - {a.name, b.name, "goc"})
        if unknown:
            raise ValueError(f"extra: {unknown} are neither a tower's name nor 'goc'")
        domains = [c.domain for c in self.customers]
        if dup := next((d for d in domains if domains.count(d) > 1), None):
            raise ValueError(f"customers: domain {dup} is listed twice")
        return self

    def published_zones(self) -> list[str]:
        """The zones the pair file publishes into (given, or the default)."""
        if self.zones:
            return list(self.zones)
        zones: list[str] = []
        names = [*(c.domain for c in self.customers), *(t.mx.split(".", 1)[1] for t in self.towers)]
        names += [
            ".".join(reversed(str(t.relay).split(".")[:3])) + ".in-addr.arpa" for t in self.towers
        ]
        for name in names:
            if name not in zones:
                zones.append(name)
        return zones


def from_data(data: object) -> InitAnswers:
    """Answers from a dict (options, prompts, a JSON file); InitError naming each bad field."""
    try:
        return validate(InitAnswers, data, "answers")
    except SettingsError as exc:
        raise InitError(f"{exc}\nnothing was written") from exc


def customers_from(items: Iterable[str]) -> list[dict[str, str]]:
    """``domain=server`` items as customers' data; ValueError naming a malformed item."""
    out = []
    for item in items:
        domain, sep, server = item.partition("=")
        if not sep or not domain.strip() or not server.strip():
            raise ValueError(f"customer {item!r} is not DOMAIN=SERVER")
        out.append({"domain": domain.strip(), "server": server.strip()})
    return out
