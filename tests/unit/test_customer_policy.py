"""The customer policy model: what the GOC accepts is what every tower can apply, and what it
refuses is named field by field."""

from __future__ import annotations

import json

import pytest

from mailtower.customers import policy
from mailtower.customers.policy import DEFAULT, PolicyError, dump, merge, parse
from mailtower.scanning.pipeline import Policy


def test_empty_is_the_default_and_dumps_empty() -> None:
    assert parse({}) == DEFAULT
    assert parse("{}") == DEFAULT
    assert dump(DEFAULT) == "{}"
    assert DEFAULT.retention_days == 3 and DEFAULT.quarantine_days == 30
    assert DEFAULT.recipient_check == "none"


def test_dump_keeps_only_what_differs_sorted_and_round_trips() -> None:
    p = parse({"suspicious": "deliver", "ban_extensions": [".EXE", "scr"], "retention_days": 3})
    assert dump(p) == '{"ban_extensions": ["exe", "scr"], "suspicious": "deliver"}'
    assert parse(dump(p)) == p


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"bogus": 1}, "bogus"),
        ({"retention_days": "abc"}, "retention_days"),
        ({"retention_days": 15}, "retention_days"),
        ({"quarantine_days": 0}, "quarantine_days"),
        ({"suspicious": "maybe"}, "suspicious"),
        ({"max_message_bytes": 10**12}, "max_message_bytes"),
        ({"max_message_bytes": 10}, "max_message_bytes"),
        ({"ban_extensions": ["exe"] * 1001}, "ban_extensions"),
        ({"ban_extensions": "exe"}, "ban_extensions"),
        ({"ban_extensions": ["a b"]}, "ban_extensions.0"),
        ({"ban_names": ["*"]}, "ban_names.0"),
        ({"ban_names": ["a/b"]}, "ban_names.0"),
        ({"ban_types": ["not a type"]}, "ban_types.0"),
        ({"admin_address": "x'; DROP TABLE customers;--"}, "admin_address"),
        ({"notify": "admin"}, "admin_address"),
        ({"digest_hour": 24}, "digest_hour"),
        ({"recipient_check": "LIST"}, "recipient_check"),
        ({"allow_senders": ["not an address"]}, "allow_senders.0"),
        ({"allow_senders": ["ok@example.org", "@"]}, "allow_senders.1"),
        ({"allow_senders": ["@-bad.example"]}, "allow_senders.0"),
        ({"allow_senders": ["a@b@example.org"]}, "allow_senders.0"),
        ({"allow_senders": ["x@example.org"] * 1001}, "allow_senders"),
        ({"allow_senders": "x@example.org"}, "allow_senders"),
    ],
)
def test_bad_fields_are_named(data: dict[str, object], field: str) -> None:
    with pytest.raises(PolicyError, match=rf"(?m)^  {field}: "):
        parse(data)


def test_values_are_not_echoed_in_errors() -> None:
    secret = "<script>evil</script>"
    with pytest.raises(PolicyError) as info:
        parse({"suspicious": secret, "ban_names": [secret + "/"]})
    assert secret not in str(info.value)


@pytest.mark.parametrize("data", ["[]", "3", "not json", '"text"', b"\xff", "null"])
def test_only_a_json_object_is_a_policy(data: str | bytes) -> None:
    with pytest.raises(PolicyError, match="invalid policy"):
        parse(data)


def test_absurd_sizes_are_refused_before_parsing() -> None:
    huge = json.dumps({"ban_extensions": ["exe"] * 10**6})
    with pytest.raises(PolicyError, match="larger than"):
        parse(huge)
    with pytest.raises(PolicyError, match="ban_extensions"):
        parse({"ban_extensions": [f"e{i}" for i in range(10**6)]})


def test_the_whole_policy_is_bounded_even_when_each_list_is_not_too_long() -> None:
    names = [f"{i:04d}" + "n" * 196 for i in range(1000)]
    types = [f"application/x-{i:04d}" + "t" * 100 for i in range(1000)]
    assert parse({"ban_names": names})  # each list alone fits
    with pytest.raises(PolicyError, match="larger than"):
        parse({"ban_names": names, "ban_types": types})


def test_merge_changes_and_resets() -> None:
    p = parse({"suspicious": "deliver", "retention_days": 7})
    q = merge(p, {"retention_days": None, "notify": "recipient"})
    assert q.retention_days == 3 and q.notify == "recipient" and q.suspicious == "deliver"
    assert dump(q) == '{"notify": "recipient", "suspicious": "deliver"}'
    assert p.retention_days == 7  # frozen: merge returns a new one


def test_merge_validates() -> None:
    with pytest.raises(PolicyError, match="bogus"):
        merge(DEFAULT, {"bogus": 1})
    with pytest.raises(PolicyError, match="bogus"):
        merge(DEFAULT, {"bogus": None})  # an unknown field is not "reset"
    with pytest.raises(PolicyError, match="admin_address"):
        merge(DEFAULT, {"notify": "both"})


def test_policies_are_frozen() -> None:
    with pytest.raises(ValueError, match="frozen"):
        DEFAULT.retention_days = 5  # type: ignore[misc]


def test_scanning_policy_adds_bans_and_exceptions_to_the_towers() -> None:
    base = Policy(
        banned_extensions=frozenset({"exe", "js"}),
        banned_types=frozenset({"application/x-msdownload"}),
        banned_native=frozenset({"pe"}),
        banned_names=("*.tower",),
    )
    p = parse(
        {
            "ban_extensions": ["docm"],
            "allow_extensions": ["js"],
            "ban_types": ["elf", "application/x-foo"],
            "allow_types": ["pe"],
            "ban_names": ["Invoice*.PDF", "*.tower"],
            "encrypted_archives": "deliver",
            "max_message_bytes": 5_000_000,
        }
    )
    got = p.scanning_policy(base)
    assert got.banned_extensions == {"exe", "docm"}
    assert got.banned_types == {"application/x-msdownload", "application/x-foo"}
    assert got.banned_native == {"elf"}
    assert got.banned_names == ("*.tower", "invoice*.pdf")
    assert got.encrypted_archives == "pass"
    assert got.max_message_bytes == 5_000_000
    assert DEFAULT.scanning_policy(base).encrypted_archives == "suspicious"
    assert DEFAULT.scanning_policy(base).banned_extensions == base.banned_extensions


def test_allow_senders_are_lower_cased_and_matched_by_address_or_domain() -> None:
    p = parse({"allow_senders": [" Boss@Example.ORG ", "@Partner.example"]})
    assert p.allow_senders == ("boss@example.org", "@partner.example")
    assert p.allows_sender("BOSS@example.org")
    assert p.allows_sender("<anyone@partner.example>")
    assert not p.allows_sender("other@example.org")
    assert not p.allows_sender("x@sub.partner.example")  # exactly that domain
    assert not p.allows_sender("x@partner.example.evil")
    assert not p.allows_sender("<>") and not p.allows_sender("")
    assert not DEFAULT.allows_sender("boss@example.org")
    assert parse(dump(p)) == p


def test_public_names() -> None:
    assert set(policy.__all__) >= {"parse", "dump", "merge", "DEFAULT", "PolicyError"}
