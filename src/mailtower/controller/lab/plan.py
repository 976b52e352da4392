"""The lab's address plan (docs/design.md "The lab"): which throwaway hosts exist and where."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

BRIDGE = "mtlab0"
HOST_ADDRESS = IPv4Address("10.201.0.1")  # the controller on the lab bridge
PREFIX = 16  # every lab net is on-link: no gateway, so nothing routes off the lab
APT_PROXY_PORT = 3142
BASE = "mt-base"  # the cached base container every host is cloned from
DEFAULT_SCANNERS = 23

# Third octet of each tower's site net (docs/design.md address plan).
TOWER_NETS = {"a": 1, "b": 2}
INTERNET_NET = 0
GOC_NET = 9
CUSTOMER_FIRST = 101  # customer mail servers: 10.201.0.101, .102, …
CUSTOMERS = 2  # customer mail servers in every lab
LAB_ZONE = "lab"  # the lab's DNS zone: tower MX hosts, customer domains, the sender
SENDER_DOMAIN = "internet.lab"  # mail from "the world" comes from here

STATE_DIR = Path(__file__).resolve().parents[4] / ".lab"


@dataclass(frozen=True)
class LabHost:
    """One throwaway host: container name, address and inventory group."""

    name: str
    address: IPv4Address
    group: str


def tower_hosts(tower: str, scanners: int = DEFAULT_SCANNERS) -> list[LabHost]:
    """The hosts of lab tower ``tower`` ("a" or "b")."""
    net = TOWER_NETS[tower]

    def ip(last: int) -> IPv4Address:
        return IPv4Address(f"10.201.{net}.{last}")

    hosts = [
        LabHost(f"mt-{tower}-relay", ip(10), "relay"),
        LabHost(f"mt-{tower}-monitor", ip(11), "monitor"),
        LabHost(f"mt-{tower}-sql1", ip(12), "sql"),
        LabHost(f"mt-{tower}-sql2", ip(13), "sql"),
    ]
    hosts += [
        LabHost(f"mt-{tower}-s{i:02d}", ip(100 + i), "scanners") for i in range(1, scanners + 1)
    ]
    return hosts


def customer_hosts(count: int = CUSTOMERS) -> list[LabHost]:
    """The lab's customer mail servers on the "internet" net."""
    return [
        LabHost(
            f"mt-cust{i}",
            IPv4Address(f"10.201.{INTERNET_NET}.{CUSTOMER_FIRST + i - 1}"),
            "customers",
        )
        for i in range(1, count + 1)
    ]


def customer_domain(index: int) -> str:
    """Mail domain of lab customer ``index`` (1-based)."""
    return f"customer{index}.lab"


def internet_hosts() -> list[LabHost]:
    """The twin lab's "internet": its authoritative DNS server and a sending MTA."""
    return [
        LabHost("mt-dns", IPv4Address(f"10.201.{INTERNET_NET}.53"), "dns"),
        LabHost("mt-sender", IPv4Address(f"10.201.{INTERNET_NET}.25"), "sender"),
    ]


def goc_host() -> LabHost:
    """The lab's global operations centre: the PostgreSQL hub and VirusEye."""
    return LabHost("mt-goc", IPv4Address(f"10.201.{GOC_NET}.10"), "goc")


def lab_hosts(towers: tuple[str, ...] = ("a",), scanners: int = DEFAULT_SCANNERS) -> list[LabHost]:
    """Every host of a lab with the given towers and the GOC; a twin pair also gets DNS and
    a sender."""
    hosts: list[LabHost] = []
    for tower in towers:
        hosts += tower_hosts(tower, scanners)
    hosts += customer_hosts()
    hosts.append(goc_host())
    if len(towers) > 1:
        hosts += internet_hosts()
    return hosts
