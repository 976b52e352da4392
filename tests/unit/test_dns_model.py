"""The tower pair model refuses bad input, naming the item, before anything is sent."""

from __future__ import annotations

import pytest
from dns_pairs import make_pair, pair_data, with_tower

from mailtower.controller import inventory
from mailtower.controller.dns.exceptions import InvalidPair
from mailtower.controller.dns.model import (
    BACKUP_PREFERENCE,
    EQUAL_PREFERENCE,
    load_pair,
    pair_from_settings,
)

SECRETS = {k: "x" * 20 for k in ("sql_relay", "sql_scanner", "sql_monitor", "sql_replication")}


def test_names_are_normalised_to_absolute_lower_case() -> None:
    pair = make_pair(domains=["Customer1.LAB", "customer2.lab."])
    assert pair.domains == ["customer1.lab.", "customer2.lab."]
    assert pair.towers[0].mx_hosts == ["mx.tower-a.lab."]
    assert pair.zones[0] == "tower-a.lab."


def test_unicode_domain_becomes_its_a_label() -> None:
    pair = make_pair(domains=["bücher.lab"], zones=[*pair_data()["zones"], "lab"])
    assert pair.domains == ["xn--bcher-kva.lab."]


def test_closest_enclosing_zone_holds_a_name() -> None:
    pair = make_pair(zones=[*pair_data()["zones"], "lab"])
    assert pair.zone_of("customer1.lab.") == "customer1.lab."
    assert pair.zone_of("www.customer1.lab.") == "customer1.lab."
    assert pair.zone_of("customer9.lab.") == "lab."
    assert pair.zone_of("example.org.") is None


def test_preferences() -> None:
    equal = make_pair()
    assert [equal.preference_of(t) for t in equal.towers] == [EQUAL_PREFERENCE] * 2
    backup = make_pair(preference="primary-backup", primary="b")
    assert [backup.preference_of(t) for t in backup.towers] == [
        BACKUP_PREFERENCE,
        EQUAL_PREFERENCE,
    ]
    default = make_pair(preference="primary-backup")  # the first tower is primary
    assert [default.preference_of(t) for t in default.towers] == [10, 20]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (pair_data(domains=["not a domain"]), "customer domain 'not a domain' is not a valid"),
        (pair_data(domains=["-bad.lab"]), "label '-bad'"),
        (pair_data(domains=["localhost"]), "customer domain 'localhost' needs at least 2 labels"),
        (pair_data(domains=["a..lab"]), "customer domain 'a..lab' is not a valid domain name"),
        (pair_data(domains=["x" * 64 + ".lab"]), "is not a valid domain name"),
        (pair_data(domains=["customer1.lab", "CUSTOMER1.lab."]), "customer1.lab. is listed twice"),
        (pair_data(domains=[]), "domains"),
        (pair_data(domains=["customer1.example"]), "customer1.example. is outside every"),
        (with_tower(pair_data(), 1, ipv4=[]), "tower b has no IPv4 address"),
        (with_tower(pair_data(), 1, ipv4=["10.201.1.10"]), "address 10.201.1.10 is given to both"),
        (
            with_tower(pair_data(), 1, ipv6=["fd00:201:1::10"]),
            "address fd00:201:1::10 is given to both",
        ),
        (with_tower(pair_data(), 0, ipv4=["10.201.1.10"] * 2), "10.201.1.10 is listed twice"),
        (with_tower(pair_data(), 1, ipv4=["10.201.2.999"]), "towers.1.ipv4.0"),
        (with_tower(pair_data(), 1, mx_hosts=[]), "towers.1.mx_hosts"),
        (with_tower(pair_data(), 1, mx_hosts=["mx.tower-a.lab"]), "MX host mx.tower-a.lab. is"),
        (with_tower(pair_data(), 1, mx_hosts=["mx.elsewhere.net"]), "MX host mx.elsewhere.net."),
        (with_tower(pair_data(), 1, name="a"), "both towers are named a"),
        (with_tower(pair_data(), 1, site="site-a"), "stand at the same site 'site-a'"),
        (
            with_tower(pair_data(), 1, ipv4=["10.202.2.10"]),
            "relay address 10.202.2.10 of tower b has no published reverse zone",
        ),
        (pair_data(towers=pair_data()["towers"][:1]), "towers"),
        (pair_data(primary="a"), "primary is only used with preference 'primary-backup'"),
        (pair_data(preference="primary-backup", primary="c"), "primary 'c' is neither"),
        (pair_data(preference="round-robin"), "preference"),
        (pair_data(zones=["lab", "LAB."]), "zone lab. is listed twice"),
        (pair_data(nameservers=[]), "nameservers"),
        (
            pair_data(nameservers=[{"name": "ns.lab"}], zones=[*pair_data()["zones"], "lab"]),
            "name server ns.lab. lies inside zone lab. and needs its address",
        ),
        (pair_data(ttl=-1), "ttl"),
        (pair_data(surprise=1), "surprise"),
    ],
)
def test_bad_pairs_are_refused_naming_the_item(data: dict, message: str) -> None:
    with pytest.raises(InvalidPair) as err:
        load_pair(data)
    assert message in str(err.value)


def test_reverse_false_needs_no_reverse_zone() -> None:
    pair = make_pair(reverse=False, zones=["tower-a.lab", "tower-b.lab", "lab"])
    assert pair.zone_of("customer1.lab.") == "lab."


def test_json_round_trip() -> None:
    pair = make_pair(preference="primary-backup", primary="b")
    assert load_pair(pair.model_dump(mode="json")) == pair


def _tower(name: str, net: int, domains: list[str]):
    return inventory.tower_settings(
        {
            "name": name,
            "hostname": f"mx.tower-{name}.lab",
            "customers": [{"domain": d, "server": "10.201.0.101"} for d in domains],
            "secrets": SECRETS,
        },
        {
            "relay": [f"10.201.{net}.10"],
            "monitor": [f"10.201.{net}.11"],
            "sql": [f"10.201.{net}.12", f"10.201.{net}.13"],
            "scanners": [f"10.201.{net}.101"],
        },
    )


def test_pair_from_tower_settings() -> None:
    a = _tower("a", 1, ["customer1.lab", "customer2.lab"])
    b = _tower("b", 2, ["customer2.lab", "customer1.lab"])
    pair = pair_from_settings(
        a,
        b,
        sites=("site-a", "site-b"),
        zones=["lab", "201.10.in-addr.arpa"],
        nameservers=[{"name": "ns.lab", "ipv4": ["10.201.0.53"]}],
    )
    assert [t.mx_hosts for t in pair.towers] == [["mx.tower-a.lab."], ["mx.tower-b.lab."]]
    assert [str(t.ipv4[0]) for t in pair.towers] == ["10.201.1.10", "10.201.2.10"]
    assert pair.domains == ["customer1.lab.", "customer2.lab."]


def test_pair_from_settings_refuses_towers_with_different_customers() -> None:
    a = _tower("a", 1, ["customer1.lab", "customer2.lab"])
    b = _tower("b", 2, ["customer1.lab"])
    with pytest.raises(InvalidPair, match="only one of them has: customer2.lab"):
        pair_from_settings(a, b, sites=("x", "y"), zones=["lab"], nameservers=[{"name": "n.x"}])
