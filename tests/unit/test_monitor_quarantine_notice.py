"""Quarantine notices without servers: who is told, when, and that hostile text can neither
add a header nor break the mail (mailtower.monitor.quarantine_notice)."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime, timedelta

import pytest

from mailtower.customers.policy import parse
from mailtower.monitor import quarantine as qm
from mailtower.monitor import quarantine_notice as notice

T0 = datetime(2026, 12, 7, 8, 30, tzinfo=UTC)


def item(subject: str = "invoice", sender: str = "a@evil.example") -> notice.Item:
    return notice.Item(
        "2211a706-ba8d-452e-bc54-8a2db6cb4665",
        "q-1",
        T0,
        sender,
        subject,
        "virus",
        ("Eicar-Test-Signature",),
    )


def built(*items: notice.Item, portal: str | None = "https://portal.example.net") -> bytes:
    msg = notice.build(
        to="bob@cust.example",
        items=list(items),
        sender="quarantine@mx.example.net",
        tower="lab-a",
        hostname="mx.example.net",
        portal_url=portal,
        now=T0,
        digest=False,
    )
    return msg.as_bytes()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain", "plain"),
        ("a\r\nBcc: x@y", "a Bcc: x@y"),
        ("nul\x00bell\x07esc\x1b[31m", "nul bell esc [31m"),
        ("rtl\u202eevil\u2028next\u2029para", "rtl evil next para"),
        ("  many   spaces\t\ttabs ", "many spaces tabs"),
        (None, ""),
    ],
)
def test_clean_leaves_one_safe_line(text, expected) -> None:
    assert notice.clean(text) == expected


def test_clean_bounds_the_length() -> None:
    cut = notice.clean("A" * 10_000, 200)
    assert len(cut) == 200 and cut.endswith("…")


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ({"notify": "none"}, []),
        ({"notify": "recipient"}, ["bob@cust.example", "Carol@cust.example"]),
        ({"notify": "admin", "admin_address": "admin@cust.example"}, ["admin@cust.example"]),
        (
            {"notify": "both", "admin_address": "admin@cust.example"},
            ["bob@cust.example", "Carol@cust.example", "admin@cust.example"],
        ),
    ],
)
def test_targets_follow_the_policy(policy, expected) -> None:
    rcpts = ["bob@cust.example", "Carol@cust.example", "BOB@cust.example"]
    assert notice.targets(parse(policy), "a@evil.example", rcpts) == expected


def test_never_the_envelope_sender_whatever_the_policy_or_its_case() -> None:
    policy = parse({"notify": "both", "admin_address": "admin@cust.example"})
    assert notice.targets(policy, "BOB@cust.example", ["bob@cust.example"]) == [
        "admin@cust.example"
    ]
    assert notice.targets(policy, "admin@cust.example", ["bob@cust.example"]) == [
        "bob@cust.example"
    ]


@pytest.mark.parametrize(
    ("scanned", "hour", "due"),
    [
        (T0, None, T0),
        (T0, 9, T0.replace(hour=9, minute=0)),  # 08:30 → today 09:00
        (T0, 8, T0.replace(hour=8, minute=0) + timedelta(days=1)),  # 08:30 → tomorrow 08:00
        (T0.replace(hour=9, minute=0), 9, T0.replace(hour=9, minute=0)),  # at the hour itself
        (T0.replace(hour=23, minute=59), 0, T0.replace(hour=0, minute=0) + timedelta(days=1)),
    ],
)
def test_due_at_the_next_digest_hour(scanned, hour, due) -> None:
    assert notice.due_at(scanned, hour) == due


@pytest.mark.parametrize(
    "address",
    ["bob@cust.example", "first.last+tag@sub.cust.example"],
)
def test_plain_addresses_are_notifiable(address) -> None:
    assert notice.notifiable(address)


@pytest.mark.parametrize(
    "address",
    [
        "bob@cust.example\r\nBcc: x@y.example",
        '"quoted local"@cust.example',
        "jörg@cust.example",
        "no-domain",
        "a@" + "b" * 300 + ".example",
        "bob@cust.example>",
    ],
)
def test_odd_addresses_are_not_notifiable(address) -> None:
    assert not notice.notifiable(address)


def test_a_hostile_subject_and_sender_cannot_add_headers() -> None:
    raw = built(
        item(
            subject="hi\r\nBcc: victim@else.example\r\n\r\n<html><script>",
            sender="x@evil.example\nX-Injected: yes",
        ),
        item(subject="A" * 10_000),
    )
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["Bcc"] is None and msg["X-Injected"] is None
    assert not msg.defects
    assert msg.get_content_type() == "text/plain" and not msg.is_multipart()
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert b"\r\n.\r\n" not in raw  # nothing that would end DATA early
    body = msg.get_content()
    assert "Bcc: victim@else.example" in body  # shown as text in the body, on one line
    assert max(len(line) for line in body.splitlines()) < 300
    assert msg["Auto-Submitted"] == "auto-generated"
    assert "https://portal.example.net" in body


def test_each_message_links_to_its_portal_page() -> None:
    other = notice.Item(
        "0b4f6c1e-52a1-4d0e-9c59-3d7a8e2f1b10", "q-2", T0, "x@y.example", "s", "virus", ()
    )
    for portal in ("https://portal.example.net", "https://portal.example.net/"):
        body = email.message_from_bytes(
            built(item(), other, portal=portal), policy=email.policy.default
        )
        text = body.get_content()  # type: ignore[union-attr]
        assert "https://portal.example.net/message/2211a706-ba8d-452e-bc54-8a2db6cb4665" in text
        assert "https://portal.example.net/message/0b4f6c1e-52a1-4d0e-9c59-3d7a8e2f1b10" in text
        assert "Review, release or delete them at https://portal.example.net" in text  # the base
        assert "//message" not in text


def test_a_link_only_for_a_real_event_id() -> None:
    assert notice.message_url(None, "2211a706-ba8d-452e-bc54-8a2db6cb4665") is None
    assert notice.message_url("https://p.example", "../../admin") is None
    assert (
        notice.message_url("https://p.example/q/", "2211A706-BA8D-452E-BC54-8A2DB6CB4665")
        == "https://p.example/q/message/2211a706-ba8d-452e-bc54-8a2db6cb4665"
    )


def test_no_portal_no_link() -> None:
    body = email.message_from_bytes(built(item(), portal=None), policy=email.policy.default)
    assert "http" not in body.get_content()  # type: ignore[union-attr]


def test_a_long_list_is_cut_and_counted() -> None:
    raw = built(*[item(subject=f"s{i}") for i in range(notice.MAX_ITEMS + 5)])
    body = email.message_from_bytes(raw, policy=email.policy.default).get_content()  # type: ignore[union-attr]
    assert body.count("Quarantine id:") == notice.MAX_ITEMS
    assert "… and 5 more." in body


@pytest.mark.parametrize(
    ("requested", "chosen", "refused"),
    [
        ((), ["bob@x.example", "carol@x.example"], []),
        (("CAROL@x.example",), ["carol@x.example"], []),
        (("bob@x.example", "eve@y.example"), ["bob@x.example"], ["eve@y.example"]),
    ],
)
def test_release_recipients_are_a_subset(requested, chosen, refused) -> None:
    assert qm._recipients(requested, ["bob@x.example", "carol@x.example"]) == (chosen, refused)


@pytest.mark.parametrize(
    ("answer", "state"),
    [
        ("claimed 0123abcd", "claimed"),
        ("sending 0123abcd", "sending"),
        ("deferred: relay 451", "deferred"),
        ("released: 250 ok", "released"),
        (None, ""),
    ],
)
def test_claim_states(answer, state) -> None:
    assert qm.state_of(answer) == state


def test_a_final_answer_is_the_gocs_result() -> None:
    assert qm.outcome_of("released: 250 queued") == qm.Outcome("released", "250 queued")
    assert qm.outcome_of("gone: expired") == qm.Outcome("gone", "expired")
    assert qm.outcome_of("nonsense").result == "failed"
