"""scand under its customers' policies: one scan, one outcome per group of recipients."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest
from archive_builders import with_encrypted_flag as encrypted
from archive_builders import zip_of
from scand_fakes import SinkHandler, make_settings, start_sink

from mailtower.customers.policy import parse
from mailtower.customers.snapshot import Snapshot
from mailtower.scand import server as server_mod
from mailtower.scand.errors import ReinjectDeferred
from mailtower.scand.quarantine import QuarantineStore
from mailtower.scand.server import Scanner
from mailtower.scanning.engines.testing import PatternEngine

ALICE, BOB, CAROL = "alice@a.example", "bob@b.example", "carol@elsewhere.example"


@dataclass
class Rig:
    scanner: Scanner
    sink: SinkHandler
    spool: Path

    def policies(self, alpha: dict[str, object], beta: dict[str, object], gen: int = 1) -> None:
        Snapshot(
            domains={"a.example": "alpha", "b.example": "beta"},
            policies={"alpha": parse(alpha), "beta": parse(beta)},
            generation=gen,
        ).write(Path(self.scanner.settings.policy_snapshot))

    def send(self, raw: bytes, rcpts: list[str]) -> str:
        return self.scanner.process(raw, "sender@example.org", rcpts)

    @property
    def quarantined(self) -> list[dict[str, object]]:
        return [e.meta for e in QuarantineStore(self.spool / "quarantine").list()]

    @property
    def events(self) -> list[dict[str, object]]:
        return [json.loads(p.read_text()) for p in sorted((self.spool / "events").rglob("*.json"))]


def _rig(tmp_path: Path, *, snapshot: bool = True) -> Iterator[Rig]:
    controller, sink, port = start_sink()
    settings = make_settings(tmp_path / "spool", reinject_port=port, policy_snapshot=snapshot)
    scanner = Scanner(settings, host_address="127.0.0.5", engines=[PatternEngine(timeout_s=1)])
    yield Rig(scanner, sink, tmp_path / "spool")
    scanner.executor.shutdown(wait=True)
    scanner.reinjector.close()
    controller.stop()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    yield from _rig(tmp_path)


def _mail(
    attachment: bytes | None = None, filename: str = "report.pdf", body: str = "hi\n"
) -> bytes:
    msg = EmailMessage()
    msg["From"] = "sender@example.org"
    msg["To"] = "alice@a.example, bob@b.example"
    msg["Subject"] = "figures"
    msg["Message-ID"] = "<figures@example.org>"
    msg.set_content(body)
    if attachment is not None:
        msg.add_attachment(attachment, "application", "octet-stream", filename=filename)
    return msg.as_bytes().replace(b"\n", b"\r\n")


def test_two_customers_with_different_bans_each_get_their_own(rig: Rig) -> None:
    rig.policies({"ban_extensions": ["pdf"]}, {})
    reply = rig.send(_mail(b"figures"), [ALICE, BOB, CAROL])
    assert reply.startswith("250 ")
    assert [r.rcpt_tos for r in rig.sink.received] == [[BOB, CAROL]]  # once, without Alice
    assert b"X-Mailtower-Verdict: clean;" in rig.sink.received[0].content
    (held,) = rig.quarantined
    assert held["envelope"] == {"mail_from": "sender@example.org", "rcpt_tos": [ALICE]}
    assert held["verdict"] == "banned"
    verdicts = sorted((e["verdict"], tuple(e["recipients"])) for e in rig.events)
    # One event per customer (Carol is at no customer's domain), one delivery for both.
    assert verdicts == [("banned", (ALICE,)), ("clean", (BOB,)), ("clean", (CAROL,))]


def test_customers_with_equal_policies_never_share_a_quarantine_copy(rig: Rig) -> None:
    """A release or a notice acts on one customer's copy: Bob's must not name Alice."""
    rig.policies({"ban_extensions": ["pdf"]}, {"ban_extensions": ["pdf"]})
    assert rig.send(_mail(b"figures"), [ALICE, BOB]).startswith("250 ")
    assert rig.sink.received == []
    held = sorted((q["customer"], q["envelope"]["rcpt_tos"]) for q in rig.quarantined)  # type: ignore[index]
    assert held == [("alpha", [ALICE]), ("beta", [BOB])]
    assert sorted(tuple(e["recipients"]) for e in rig.events) == [(ALICE,), (BOB,)]


def test_a_banned_name_glob_of_one_customer(rig: Rig) -> None:
    rig.policies({}, {"ban_names": ["REPORT*"]})
    assert rig.send(_mail(b"figures"), [ALICE, BOB]).startswith("250 ")
    assert [r.rcpt_tos for r in rig.sink.received] == [[ALICE]]
    assert [q["envelope"]["rcpt_tos"] for q in rig.quarantined] == [[BOB]]  # type: ignore[index]


def test_suspicious_is_delivered_tagged_to_who_takes_it_and_held_for_the_others(
    rig: Rig,
) -> None:
    rig.policies({"suspicious": "deliver"}, {})
    locked = encrypted(zip_of({"a.txt": b"secret"}))
    assert rig.send(_mail(locked, "s.zip"), [ALICE, BOB]).startswith("250 ")
    (delivered,) = rig.sink.received
    assert delivered.rcpt_tos == [ALICE]
    assert b"X-Mailtower-Verdict: suspicious; tower=tower-t; scanner=127.0.0.5" in (
        delivered.content
    )
    assert [(q["verdict"], q["envelope"]["rcpt_tos"]) for q in rig.quarantined] == [  # type: ignore[index]
        ("suspicious", [BOB])
    ]


def test_one_customer_taking_suspicious_mail_alone_gets_it_tagged(rig: Rig) -> None:
    rig.policies({"suspicious": "deliver"}, {})
    locked = encrypted(zip_of({"a.txt": b"secret"}))
    reply = rig.send(_mail(locked, "s.zip"), [ALICE])
    assert reply.startswith("250 2.0.0 OK scanned suspicious, re-injected")
    assert rig.quarantined == []


def test_a_customers_size_limit(rig: Rig) -> None:
    rig.policies({}, {"max_message_bytes": 2048})
    raw = _mail(body="x" * 4000 + "\n")
    assert rig.send(raw, [ALICE, BOB]).startswith("250 ")
    assert [r.rcpt_tos for r in rig.sink.received] == [[ALICE]]
    (held,) = rig.quarantined
    assert held["envelope"]["rcpt_tos"] == [BOB]  # type: ignore[index]
    assert {"engine": "policy", "name": "policy.max-size", "part": "message"} in held["findings"]  # type: ignore[operator]


def test_same_outcome_for_every_customer_is_one_transaction(rig: Rig) -> None:
    rig.policies({"ban_extensions": ["doc"]}, {})
    reply = rig.send(_mail(b"figures"), [ALICE, BOB])
    assert reply.startswith("250 2.0.0 OK scanned clean")
    assert [r.rcpt_tos for r in rig.sink.received] == [[ALICE, BOB]]


def test_without_a_snapshot_every_message_is_retried(tmp_path: Path) -> None:
    for rig in _rig(tmp_path, snapshot=False):
        assert rig.send(_mail(), [CAROL]) == server_mod.S451_POLICY
        assert rig.sink.received == [] and rig.quarantined == []
        Snapshot().write(Path(rig.scanner.settings.policy_snapshot))  # no customers: fine
        assert rig.send(_mail(), [CAROL]).startswith("250 2.0.0 OK scanned clean")


def test_a_new_snapshot_applies_to_the_next_message(rig: Rig) -> None:
    rig.policies({}, {})
    assert rig.send(_mail(b"figures"), [ALICE]).startswith("250 2.0.0 OK scanned clean")
    rig.policies({"ban_extensions": ["pdf"]}, {}, gen=2)
    assert rig.send(_mail(b"figures"), [ALICE]).startswith("250 2.7.0 quarantined")
    assert len(rig.sink.received) == 1
    assert rig.scanner.metrics.registry.get_sample_value("mailtower_policy_generation") == 2


def test_a_later_reinjection_that_fails_is_set_aside_not_retried(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig.policies(
        {"suspicious": "deliver"}, {"suspicious": "deliver", "encrypted_archives": "deliver"}
    )
    monkeypatch.setattr(server_mod, "SPLIT_REINJECT_PAUSE_S", 0.01)
    real = rig.scanner.reinject
    calls: list[str] = []

    def second_fails(*args: object, tag: str = "clean", **kw: object) -> str:
        calls.append(tag)
        if len(calls) > 1:
            raise ReinjectDeferred("relay unreachable")
        return real(*args, tag=tag, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(rig.scanner, "reinject", second_fails)
    locked = encrypted(zip_of({"a.txt": b"secret"}))
    reply = rig.send(_mail(locked, "s.zip"), [ALICE, BOB])
    assert reply.startswith("250 "), reply  # a 451 would deliver the first part twice
    assert len(calls) == 1 + server_mod.SPLIT_REINJECT_ATTEMPTS
    assert [r.rcpt_tos for r in rig.sink.received] == [[ALICE]]
    (held,) = rig.quarantined
    assert held["verdict"] == "unprocessable"
    assert held["reason"] == "re-injection failed after a split"
    assert held["envelope"]["rcpt_tos"] == [BOB]  # type: ignore[index]
    assert (
        rig.scanner.metrics.registry.get_sample_value("mailtower_split_reinject_failed_total") == 1
    )


def test_a_first_reinjection_that_fails_retries_the_whole_message(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig.policies({"ban_extensions": ["pdf"]}, {})

    def fails(*args: object, **kw: object) -> str:
        raise ReinjectDeferred("relay unreachable")

    monkeypatch.setattr(rig.scanner, "reinject", fails)
    assert rig.send(_mail(b"figures"), [ALICE, BOB]) == server_mod.S451_REINJECT
    assert rig.quarantined == []  # the retry writes Alice's copy again: not twice


def test_a_customer_policy_without_a_word_on_encrypted_archives_keeps_the_towers() -> None:
    from mailtower.customers.policy import parse
    from mailtower.scanning.pipeline import Policy

    tower = Policy(encrypted_archives="pass")
    assert parse({}).scanning_policy(tower).encrypted_archives == "pass"
    assert parse({"encrypted_archives": "quarantine"}).scanning_policy(
        tower
    ).encrypted_archives == ("suspicious")
    assert parse({"encrypted_archives": "deliver"}).scanning_policy(
        Policy()
    ).encrypted_archives == ("pass")


def test_a_customer_whose_policy_never_passed_is_held_not_scanned_by_the_default(
    rig: Rig,
) -> None:
    Snapshot(
        domains={"a.example": "alpha", "b.example": "beta"},
        policies={"beta": parse({})},
        invalid=("alpha",),
        generation=3,
    ).write(Path(rig.scanner.settings.policy_snapshot))
    assert rig.send(_mail(b"figures"), [BOB, ALICE]).startswith("451 4.3.5")
    assert rig.sink.received == [] and rig.quarantined == []
    assert rig.send(_mail(b"figures"), [BOB]).startswith("250 ")  # the others' mail flows


def test_an_allowed_sender_gets_banned_mail_delivered_tagged_for_that_customer_only(
    rig: Rig,
) -> None:
    rig.policies({"ban_extensions": ["pdf"], "allow_senders": ["@example.org"]}, {})
    reply = rig.scanner.process(_mail(b"figures"), "Sender@Example.ORG", [ALICE])
    assert reply.startswith("250 2.0.0 OK scanned banned, re-injected"), reply
    (delivered,) = rig.sink.received
    assert delivered.rcpt_tos == [ALICE]
    assert b"X-Mailtower-Verdict: banned; tower=tower-t" in delivered.content
    assert rig.quarantined == []
    (event,) = rig.events
    assert (event["verdict"], event["quarantine_id"]) == ("banned", None)
    assert (
        rig.scanner.metrics.registry.get_sample_value(
            "mailtower_messages_total", {"verdict": "banned_delivered"}
        )
        == 1
    )


def test_an_allowed_sender_does_not_change_another_customers_outcome(rig: Rig) -> None:
    rig.policies(
        {"ban_extensions": ["pdf"], "allow_senders": ["sender@example.org"]},
        {"ban_extensions": ["pdf"]},
    )
    assert rig.send(_mail(b"figures"), [ALICE, BOB]).startswith("250 ")
    assert [r.rcpt_tos for r in rig.sink.received] == [[ALICE]]
    assert [(q["customer"], q["verdict"]) for q in rig.quarantined] == [("beta", "banned")]


def test_an_allowed_sender_still_has_a_virus_quarantined(rig: Rig) -> None:
    from mailtower.scanning import testdata

    rig.policies({"allow_senders": ["sender@example.org"]}, {})
    reply = rig.send(_mail(body=testdata.marker().decode() + "\n"), [ALICE])
    assert reply.startswith("250 2.7.0 quarantined as "), reply
    assert rig.sink.received == []
    assert [q["verdict"] for q in rig.quarantined] == ["virus"]


def test_an_allowed_sender_gets_suspicious_mail_delivered_tagged(rig: Rig) -> None:
    rig.policies({"allow_senders": ["sender@example.org"]}, {})
    locked = encrypted(zip_of({"a.txt": b"secret"}))
    assert rig.send(_mail(locked, "s.zip"), [ALICE]).startswith(
        "250 2.0.0 OK scanned suspicious, re-injected"
    )
    assert rig.quarantined == []


def test_a_relay_that_hung_up_during_the_scan_gets_nothing_re_injected(rig: Rig) -> None:
    """HAProxy cut the session (or the relay timed out) while the message was scanned: the
    relay sends it again, so re-injecting this copy would deliver it twice (the lab saw a
    50 MB message delivered 9 times). Tempfailed, nothing re-injected, nothing kept."""
    rig.policies({"ban_extensions": ["pdf"]}, {})
    reply = rig.scanner.process(
        _mail(b"figures"), "sender@example.org", [ALICE, BOB], client_alive=lambda: False
    )
    assert reply == server_mod.S451_CLIENT_GONE
    assert rig.sink.received == []
    assert rig.quarantined == []  # Alice's copy is written again by the retry
    # Gone by the time the scan ends, with everything for quarantine: nothing held twice.
    reply = rig.scanner.process(
        _mail(b"figures"), "sender@example.org", [ALICE], client_alive=lambda: False
    )
    assert reply == server_mod.S451_CLIENT_GONE
    assert rig.quarantined == []
    # Gone after the quarantined part was written (asked again before the re-injection):
    # that part is undone, nothing re-injected.
    answers = iter([True, False])
    reply = rig.scanner.process(
        _mail(b"figures"), "sender@example.org", [ALICE, BOB], client_alive=lambda: next(answers)
    )
    assert reply == server_mod.S451_CLIENT_GONE
    assert rig.sink.received == []
    assert rig.quarantined == []
    # Still there: delivered as usual.
    reply = rig.scanner.process(
        _mail(b"figures"), "sender@example.org", [ALICE, BOB], client_alive=lambda: True
    )
    assert reply.startswith("250"), reply
    assert [r.rcpt_tos for r in rig.sink.received] == [[BOB]]


def test_alive_check_sees_the_peer_close_its_side() -> None:
    import asyncio
    import socket
    import time

    async def scenario() -> tuple[bool, bool, bool]:
        client, server = socket.socketpair()
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, server)
        check = server_mod.alive_check(transport)
        open_now = await asyncio.to_thread(check)
        client.shutdown(socket.SHUT_WR)  # the relay hangs up (FIN)
        # Asked before the event loop ran again (it is busy, as under a big scan): the peek
        # at the socket sees the end of stream, the transport does not know yet.
        time.sleep(0.05)
        assert not transport.is_closing()
        closed = check()
        transport.close()
        client.close()
        return open_now, closed, server_mod.alive_check(None)()

    open_now, closed, without = asyncio.run(scenario())
    assert (open_now, closed, without) == (True, False, False)
