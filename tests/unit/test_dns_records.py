"""Record generation and zone files from a tower pair (no server)."""

from __future__ import annotations

from pathlib import Path

import dns.name
import dns.rdatatype
import dns.zone
import pytest
from dns_pairs import LAYOUTS, make_pair, with_tower

from mailtower.controller.dns.model import load_pair
from mailtower.controller.dns.records import RRsetKey, desired_records
from mailtower.controller.dns.zonefile import build_zones, write_zone_files, zone_text


def _texts(records, name: str, rdtype: str) -> dict[str, list[str]]:
    """The records of ``name``/``rdtype`` by zone, as sorted text."""
    n, t = dns.name.from_text(name), dns.rdatatype.from_text(rdtype)
    return {
        k.zone.to_text(): sorted(rd.to_text() for rd in v.rdatas)
        for k, v in records.items()
        if k.name == n and k.rdtype == t
    }


def test_equal_preference_mx_names_both_towers() -> None:
    records = desired_records(make_pair())
    assert _texts(records, "customer1.lab.", "MX") == {
        "customer1.lab.": ["10 mx.tower-a.lab.", "10 mx.tower-b.lab."]
    }
    assert _texts(records, "customer2.lab.", "MX") == {
        "customer2.lab.": ["10 mx.tower-a.lab.", "10 mx.tower-b.lab."]
    }


def test_primary_backup_preferences() -> None:
    records = desired_records(make_pair(preference="primary-backup", primary="b"))
    assert _texts(records, "customer1.lab.", "MX") == {
        "customer1.lab.": ["10 mx.tower-b.lab.", "20 mx.tower-a.lab."]
    }


def test_addresses_of_mx_hosts_and_no_aaaa_without_ipv6() -> None:
    records = desired_records(make_pair())
    assert _texts(records, "mx.tower-a.lab.", "A") == {"tower-a.lab.": ["10.201.1.10"]}
    assert _texts(records, "mx.tower-a.lab.", "AAAA") == {"tower-a.lab.": ["fd00:201:1::10"]}
    assert _texts(records, "mx.tower-b.lab.", "A") == {"tower-b.lab.": ["10.201.2.10"]}
    # Owned but empty: an AAAA that exists on the server is deleted.
    assert _texts(records, "mx.tower-b.lab.", "AAAA") == {"tower-b.lab.": []}


def test_every_mx_host_of_a_tower_is_a_target_and_resolves() -> None:
    data = make_pair().model_dump(mode="json")
    data = with_tower(data, 0, mx_hosts=["mx.tower-a.lab", "mx2.tower-a.lab"])
    records = desired_records(load_pair(data))
    assert _texts(records, "customer1.lab.", "MX")["customer1.lab."] == [
        "10 mx.tower-a.lab.",
        "10 mx.tower-b.lab.",
        "10 mx2.tower-a.lab.",
    ]
    assert _texts(records, "mx2.tower-a.lab.", "A") == {"tower-a.lab.": ["10.201.1.10"]}
    # One PTR per address: the relay's own (first) name.
    assert _texts(records, "10.1.201.10.in-addr.arpa.", "PTR") == {
        "201.10.in-addr.arpa.": ["mx.tower-a.lab."]
    }


def test_reverse_records() -> None:
    records = desired_records(make_pair())
    assert _texts(records, "10.2.201.10.in-addr.arpa.", "PTR") == {
        "201.10.in-addr.arpa.": ["mx.tower-b.lab."]
    }
    v6 = "0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.1.0.0.0.1.0.2.0.0.0.d.f.ip6.arpa."
    assert _texts(records, v6, "PTR") == {"1.0.0.0.1.0.2.0.0.0.d.f.ip6.arpa.": ["mx.tower-a.lab."]}
    assert not any(k.rdtype == dns.rdatatype.PTR for k in desired_records(make_pair(reverse=False)))


def test_records_go_to_the_closest_zone() -> None:
    records = desired_records(make_pair(zones=LAYOUTS["one-parent-zone"]))
    assert {k.zone.to_text() for k in records if k.rdtype != dns.rdatatype.PTR} == {"lab."}
    assert (
        RRsetKey(dns.name.from_text("lab."), dns.name.from_text("customer1.lab."), dns.rdatatype.MX)
        in records
    )


def test_zone_has_soa_ns_and_the_records() -> None:
    zones = build_zones(make_pair(ttl=600, soa={"serial": 7, "hostmaster": "dns.lab"}))
    assert list(zones) == make_pair().zones
    zone = zones["customer1.lab."]
    soa = zone.get_rdataset("@", "SOA")
    assert soa is not None and soa.ttl == 600
    assert soa[0].serial == 7 and soa[0].rname == dns.name.from_text("dns.lab.")
    assert [rd.to_text() for rd in zone.get_rdataset("@", "NS")] == ["ns.dns.test."]
    mx = zone.get_rdataset("@", "MX")
    assert mx is not None and sorted(rd.to_text() for rd in mx) == [
        "10 mx.tower-a.lab.",
        "10 mx.tower-b.lab.",
    ]


def test_empty_zones_have_only_soa_and_ns() -> None:
    for zone in build_zones(make_pair(), with_records=False).values():
        types = {rds.rdtype for _, rds in zone.iterate_rdatasets()}
        assert types == {dns.rdatatype.SOA, dns.rdatatype.NS}


def test_parent_zone_delegates_to_child_zones_with_glue() -> None:
    pair = make_pair(
        zones=[*LAYOUTS["one-parent-zone"], "customer1.lab", "dns.lab"],
        nameservers=[{"name": "ns.dns.lab", "ipv4": ["10.201.0.53"]}],
    )
    zones = build_zones(pair)
    parent = zones["lab."]
    for child in ("customer1", "dns"):
        assert [rd.to_text() for rd in parent.get_rdataset(child, "NS")] == ["ns.dns.lab."]
    glue = parent.get_rdataset("ns.dns", "A")
    assert glue is not None and [rd.to_text() for rd in glue] == ["10.201.0.53"]
    assert zones["dns.lab."].get_rdataset("ns", "A") is not None
    assert parent.get_rdataset("customer1", "MX") is None  # the child zone holds it
    assert zones["customer1.lab."].get_rdataset("@", "MX") is not None


def _absolute(zone: dns.zone.Zone) -> set[tuple[str, int, str]]:
    origin = zone.origin
    assert origin is not None
    return {
        (name.derelativize(origin).to_text(), ttl, rd.to_text(origin=None, relativize=False))
        for name, ttl, rd in zone.iterate_rdatas()
    }


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_zone_text_reads_back_as_the_same_zone(layout: str) -> None:
    for name, zone in build_zones(make_pair(zones=LAYOUTS[layout])).items():
        text = zone_text(zone)
        assert text.startswith(f"$ORIGIN {name}\n")
        again = dns.zone.from_text(text, origin=name, relativize=False)
        assert _absolute(again) == _absolute(zone)
        assert zone_text(again) == text


def test_zone_files_are_written_per_zone(tmp_path: Path) -> None:
    paths = write_zone_files(make_pair(), tmp_path)
    assert paths["customer1.lab."] == tmp_path / "db.customer1.lab"
    assert paths["201.10.in-addr.arpa."].read_text().startswith("$ORIGIN 201.10.in-addr.arpa.")


def test_zone_text_is_deterministic() -> None:
    first = {n: zone_text(z) for n, z in build_zones(make_pair()).items()}
    second = {n: zone_text(z) for n, z in build_zones(make_pair()).items()}
    assert first == second
