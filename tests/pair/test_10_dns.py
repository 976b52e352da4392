"""The lab's authoritative DNS serves the pair's records, and only the controller may change
them: queried directly (never through the system resolver)."""

from __future__ import annotations

import base64
import json

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import pytest
from conftest import ROOT, Pair

from mailtower.controller.dns import pairfile, verify
from mailtower.controller.firstpair.lab import lab_inventory


@pytest.fixture(scope="module")
def published(pair: Pair):
    return pairfile.load(lab_inventory(ROOT, "pair_lab.py"))  # the one the lab published


@pytest.fixture(scope="module")
def resolver(pair: Pair) -> dns.resolver.Resolver:
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = [pair.dns_addr]
    r.lifetime = 5
    return r


def test_the_server_serves_every_record_of_the_pair(published) -> None:
    model, server = published
    assert verify.check_published(model, server) == []


def test_every_customer_domain_has_both_towers_as_mx(pair: Pair, resolver) -> None:
    for customer in pair.customers:
        answer = resolver.resolve(customer.domain, "MX")
        targets = {r.exchange.to_text(omit_final_dot=True): r.preference for r in answer}
        assert targets == {name: 10 for name in pair.hostnames.values()}, customer.domain


def test_every_mx_host_resolves_to_its_relay(pair: Pair, resolver) -> None:
    for key, tower in pair.towers.items():
        answer = resolver.resolve(pair.hostnames[key], "A")
        assert [r.address for r in answer] == [str(tower.settings.hosts.relay)]
        ptr = resolver.resolve_address(str(tower.settings.hosts.relay))
        assert [r.target.to_text(omit_final_dot=True) for r in ptr] == [pair.hostnames[key]]


def test_not_an_open_resolver(pair: Pair) -> None:
    query = dns.message.make_query("example.com", dns.rdatatype.A)  # recursion desired
    reply = dns.query.udp(query, pair.dns_addr, timeout=5)
    assert reply.rcode() == dns.rcode.REFUSED


def test_updates_signed_with_the_key_are_refused_from_other_hosts(pair: Pair) -> None:
    """The key alone is not enough: an update from the DNS host itself is refused."""
    key = json.loads(
        (ROOT / ".lab" / "dns-update-key.json").read_text()
    )  # the controller's copy of the lab key
    dns_node = pair.internet.node(pair.internet.inventory.groups["dns"][0].name)
    script = (
        f"server {pair.dns_addr}\nzone lab\nupdate add intruder.lab. 300 IN A 192.0.2.66\nsend\n"
    )
    out = dns_node.run(
        f"echo {base64.b64encode(script.encode()).decode()} | base64 -d | "
        f"nsupdate -y {key['algorithm']}:{key['name']}:{key['secret']}"
    )
    assert out.rc != 0 and "REFUSED" in (out.stdout + out.stderr), out
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = [pair.dns_addr]
    with pytest.raises(dns.resolver.NXDOMAIN):
        r.resolve("intruder.lab", "A")
