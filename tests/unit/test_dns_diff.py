"""Diffs, update messages, TSIG keys and server addresses (no server)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dns.name
import dns.rdatatype
import dns.rrset
import pytest
from dns_pairs import LAYOUTS, make_pair, with_tower

from mailtower.controller.dns.diff import Plan, RecordChange, diff, stale_records
from mailtower.controller.dns.exceptions import DnsError, TsigKeyError
from mailtower.controller.dns.model import load_pair
from mailtower.controller.dns.records import EMPTY, RecordSet, RRsetKey, desired_records, rdata
from mailtower.controller.dns.server import AuthServer, TsigKey
from mailtower.controller.dns.update import update_message
from mailtower.controller.dns.zonefile import build_zones

MX = dns.rdatatype.MX


def _key(name: str, rdtype: dns.rdatatype.RdataType = MX, zone: str | None = None) -> RRsetKey:
    return RRsetKey(dns.name.from_text(zone or name), dns.name.from_text(name), rdtype)


def _mx(ttl: int, *texts: str) -> RecordSet:
    return RecordSet.of(ttl, [rdata(MX, t) for t in texts])


def test_nothing_served_means_everything_is_added() -> None:
    desired = desired_records(make_pair())
    changes = diff(desired, {})
    added = sum(len(c.added) for c in changes)
    assert added == sum(len(r.rdatas) for r in desired.values())
    assert not any(c.deleted for c in changes)
    # The empty AAAA of tower b is already as wanted: no change for it.
    assert _key("mx.tower-b.lab.", dns.rdatatype.AAAA, "tower-b.lab.") not in {
        c.key for c in changes
    }


def test_served_as_desired_means_no_change() -> None:
    desired = desired_records(make_pair())
    assert diff(desired, dict(desired)) == []


def test_preference_change_is_exactly_the_changed_mx() -> None:
    before = desired_records(make_pair())
    after = desired_records(make_pair(preference="primary-backup", primary="a"))
    changes = diff(after, before)
    assert [str(c.key) for c in changes] == ["customer1.lab. MX", "customer2.lab. MX"]
    for change in changes:
        assert change.lines() == [
            f"- {change.key.name} 300 IN MX 10 mx.tower-b.lab.",
            f"+ {change.key.name} 300 IN MX 20 mx.tower-b.lab.",
        ]


def test_a_removed_ipv6_address_is_deleted() -> None:
    before = desired_records(make_pair())
    after = desired_records(load_pair(with_tower(make_pair().model_dump(mode="json"), 0, ipv6=[])))
    # Its PTR is no longer the pair's to compare: only pruning (below) finds it.
    assert [c.lines() for c in diff(after, before)] == [
        ["- mx.tower-a.lab. 300 IN AAAA fd00:201:1::10"]
    ]


V6_PTR = "0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.1.0.0.0.1.0.2.0.0.0.d.f.ip6.arpa."


def test_pruning_finds_what_the_pair_left_behind() -> None:
    old = make_pair(zones=LAYOUTS["one-parent-zone"], domains=["customer1.lab", "customer2.lab"])
    zones = build_zones(old)
    lab = zones["lab."]
    # A foreign MX next to the pair's at a dropped domain, and someone else's domain.
    lab.find_rdataset("customer2", "MX", create=True).add(rdata(MX, "5 mx.customer2.lab."), 300)
    lab.find_rdataset("other", "MX", create=True).add(rdata(MX, "10 mx.other.lab."), 300)
    new = load_pair(
        with_tower(
            make_pair(zones=LAYOUTS["one-parent-zone"], domains=["customer1.lab"]).model_dump(
                mode="json"
            ),
            0,
            ipv6=[],
        )
    )
    stale, remaining = stale_records(new, lab)
    assert [str(k) for k in stale] == ["customer2.lab. MX"]
    [key] = stale
    assert sorted(rd.to_text() for rd in remaining[key].rdatas) == ["5 mx.customer2.lab."]
    v6_zone = zones["1.0.0.0.1.0.2.0.0.0.d.f.ip6.arpa."]
    stale6, remaining6 = stale_records(new, v6_zone)
    assert [str(k) for k in stale6] == [f"{V6_PTR} PTR"]
    assert remaining6[next(iter(stale6))].rdatas == frozenset()
    assert stale_records(old, lab) == ({}, {})  # nothing is stale while it is published


def test_foreign_records_in_an_owned_rrset_are_deleted() -> None:
    key = _key("customer1.lab.")
    desired = {key: _mx(300, "10 mx.tower-a.lab.", "10 mx.tower-b.lab.")}
    served = {key: _mx(300, "10 mx.tower-a.lab.", "5 old-mx.customer1.lab.")}
    [change] = diff(desired, served)
    assert [rd.to_text() for rd in change.deleted] == ["5 old-mx.customer1.lab."]
    assert [rd.to_text() for rd in change.added] == ["10 mx.tower-b.lab."]


def test_a_ttl_change_replaces_the_whole_rrset() -> None:
    key = _key("customer1.lab.")
    desired = {key: _mx(300, "10 mx.tower-a.lab.")}
    [change] = diff(desired, {key: _mx(3600, "10 mx.tower-a.lab.")})
    assert change.lines() == [
        "- customer1.lab. 3600 IN MX 10 mx.tower-a.lab.",
        "+ customer1.lab. 300 IN MX 10 mx.tower-a.lab.",
    ]


def test_ttl_of_an_empty_rrset_does_not_matter() -> None:
    key = _key("mx.tower-b.lab.", dns.rdatatype.AAAA)
    assert diff({key: RecordSet(300, frozenset())}, {key: EMPTY}) == []


def test_plan_text_and_json() -> None:
    before = desired_records(make_pair())
    after = desired_records(make_pair(preference="primary-backup", primary="a"))
    plan = Plan("127.0.0.1:53", tuple(diff(after, before)))
    assert plan.to_text().splitlines() == [
        "zone customer1.lab.",
        "  - customer1.lab. 300 IN MX 10 mx.tower-b.lab.",
        "  + customer1.lab. 300 IN MX 20 mx.tower-b.lab.",
        "zone customer2.lab.",
        "  - customer2.lab. 300 IN MX 10 mx.tower-b.lab.",
        "  + customer2.lab. 300 IN MX 20 mx.tower-b.lab.",
        "127.0.0.1:53: 2 to add, 2 to delete in 2 zone(s)",
    ]
    assert plan.as_json()["changes"][0] == {
        "zone": "customer1.lab.",
        "name": "customer1.lab.",
        "type": "MX",
        "delete": [{"ttl": 300, "data": "10 mx.tower-b.lab."}],
        "add": [{"ttl": 300, "data": "20 mx.tower-b.lab."}],
    }
    assert "no changes" in Plan("127.0.0.1:53", ()).to_text()


def _section(rrsets: list[dns.rrset.RRset]) -> list[str]:
    return sorted(rrset.to_text() for rrset in rrsets)


def test_update_message_requires_the_old_rrset_and_changes_only_the_difference() -> None:
    key = _key("customer1.lab.")
    old = _mx(300, "10 mx.tower-a.lab.", "10 mx.tower-b.lab.")
    new = _mx(300, "10 mx.tower-a.lab.", "20 mx.tower-b.lab.")
    absent_key = _key("mx.tower-b.lab.", dns.rdatatype.A, "customer1.lab.")
    message = update_message(
        dns.name.from_text("customer1.lab."),
        [
            RecordChange(key, old, new),
            RecordChange(absent_key, EMPTY, RecordSet.of(60, [rdata(dns.rdatatype.A, "1.2.3.4")])),
        ],
    )
    # One RR per entry on the wire; together they require exactly the old RRset.
    assert _section(message.prerequisite) == [
        "customer1.lab. 0 IN MX 10 mx.tower-a.lab.",
        "customer1.lab. 0 IN MX 10 mx.tower-b.lab.",
        "mx.tower-b.lab. NONE A",
    ]
    assert _section(message.update) == [
        "customer1.lab. 0 NONE MX 10 mx.tower-b.lab.",
        "customer1.lab. 300 IN MX 20 mx.tower-b.lab.",
        "mx.tower-b.lab. 60 IN A 1.2.3.4",
    ]


BIND_KEY = """key "mailtower-update" {
\talgorithm hmac-sha256;
\tsecret "7Gq0P5/ra8pZT6zQkXoF7YSBwbkrARPQjQ4S4pT7mEk=";
};
"""


def test_tsig_key_reads_bind_syntax_and_keeps_its_secret_out_of_repr() -> None:
    key = TsigKey.from_bind(BIND_KEY)
    assert (key.name, key.algorithm) == ("mailtower-update", "hmac-sha256")
    assert key.secret == "7Gq0P5/ra8pZT6zQkXoF7YSBwbkrARPQjQ4S4pT7mEk="
    assert key.secret not in repr(key)
    assert TsigKey.from_bind(key.to_bind()) == key
    # secret before algorithm, other spacing
    assert TsigKey.from_bind('key x { secret "AAAA" ; algorithm HMAC-SHA512; };').algorithm == (
        "hmac-sha512"
    )


def test_generated_keys_differ() -> None:
    assert TsigKey.generate("k").secret != TsigKey.generate("k").secret


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TsigKey.from_bind("nothing here"), "no key"),
        (lambda: TsigKey("k", "not base64!"), "malformed"),
        (lambda: TsigKey("k", "AAAA", "hmac-md5"), "algorithm 'hmac-md5'"),
        (lambda: TsigKey.from_file(Path("/nonexistent/k")), "cannot read"),
    ],
)
def test_bad_keys_are_refused(make, message: str) -> None:
    with pytest.raises(TsigKeyError, match=message):
        make()


@pytest.mark.parametrize(
    ("text", "address", "port", "shown"),
    [
        ("10.201.0.53", "10.201.0.53", 53, "10.201.0.53:53"),
        ("127.0.0.1:5353", "127.0.0.1", 5353, "127.0.0.1:5353"),
        ("[::1]:5353", "::1", 5353, "[::1]:5353"),
        ("2001:db8::53", "2001:db8::53", 53, "[2001:db8::53]:53"),
    ],
)
def test_server_addresses(text: str, address: str, port: int, shown: str) -> None:
    server = AuthServer.parse(text)
    assert (server.address, server.port, str(server)) == (address, port, shown)


@pytest.mark.parametrize(("text", "message"), [("ns.lab", "IP address"), ("1.2.3.4:x", "port")])
def test_bad_server_addresses(text: str, message: str) -> None:
    with pytest.raises(DnsError, match=message):
        AuthServer.parse(text)


def test_mailtower_cli_does_not_import_dnspython() -> None:
    """Tower hosts run ``mailtower`` without dnspython (a controller-only dependency)."""
    code = (
        "import sys, mailtower.cli; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'dns'))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"
