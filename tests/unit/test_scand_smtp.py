"""scand end to end in-process: relay → scand (test engine) → sink standing in for the relay."""

from __future__ import annotations

import asyncio
import io
import json
import smtplib
import threading
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from scand_fakes import SinkHandler, free_port, make_settings, start_sink, wait_until

from mailtower.cli import main as cli_main
from mailtower.scand import server as scand_server
from mailtower.scand.http import start_http
from mailtower.scand.quarantine import Entry as QuarantineEntry
from mailtower.scand.quarantine import QuarantineStore
from mailtower.scand.server import Handler, Scanner, start_smtp
from mailtower.scanning import testdata
from mailtower.scanning.engines import Finding
from mailtower.scanning.engines.testing import PatternEngine
from mailtower.scanning.errors import EngineTimeout, YaraRuleError
from mailtower.scanning.scan import Verdict, message_id

MARKER = testdata.marker().decode()


@dataclass
class Scand:
    scanner: Scanner
    engine: PatternEngine
    sink: SinkHandler
    smtp_port: int
    http_port: int
    spool: Path

    def send(self, raw: bytes, rcpts: list[str] | None = None) -> tuple[int, bytes]:
        """Send like Postfix's content filter client; return the reply to DATA."""
        with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=30) as smtp:
            smtp.ehlo("relay.test")
            assert smtp.mail("sender@example.org")[0] == 250
            for rcpt in rcpts or ["to@example.com"]:
                assert smtp.rcpt(rcpt)[0] == 250
            return smtp.data(raw)

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.http_port}{path}", timeout=10
            ) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    @property
    def quarantine(self) -> QuarantineStore:
        return QuarantineStore(self.spool / "quarantine")


@pytest.fixture
def scand(tmp_path: Path) -> Iterator[Scand]:
    controller, sink, sink_port = start_sink()
    settings = make_settings(tmp_path / "spool", reinject_port=sink_port)
    engine = PatternEngine(timeout_s=0.2)
    scanner = Scanner(settings, host_address="127.0.0.5", engines=[engine])
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    servers: list[asyncio.Server] = []

    async def start() -> None:
        servers.append(await start_smtp(Handler(scanner), "127.0.0.1", settings.ports.filter))
        servers.append(await start_http(scanner, "127.0.0.1", settings.ports.scanner_http))
        ready.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    assert ready.is_set()
    yield Scand(
        scanner,
        engine,
        sink,
        settings.ports.filter,
        settings.ports.scanner_http,
        tmp_path / "spool",
    )
    engine.release()
    for server in servers:
        loop.call_soon_threadsafe(server.close)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    scanner.executor.shutdown(wait=True)
    controller.stop()


def _mail(body: str = "hello\n", subject: str = "test") -> bytes:
    msg = EmailMessage()
    msg["From"] = "sender@example.org"
    msg["To"] = "to@example.com"
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{subject}@example.org>"
    msg.set_content(body)
    return msg.as_bytes().replace(b"\n", b"\r\n")


def test_clean_is_reinjected_with_header_and_same_envelope(scand: Scand) -> None:
    raw = _mail("hello\n.leading dot survives\n", subject="clean")
    code, text = scand.send(raw, rcpts=["a@example.com", "b@example.com"])
    assert code == 250, text
    assert b"Q00001" in text  # the relay's queue id is passed back
    assert len(scand.sink.received) == 1
    got = scand.sink.received[0]
    assert got.mail_from == "sender@example.org"
    assert got.rcpt_tos == ["a@example.com", "b@example.com"]
    header = b"X-Mailtower-Verdict: clean; tower=tower-t; scanner=127.0.0.5\r\n"
    assert got.content == header + raw
    assert scand.quarantine.list() == []


def test_virus_is_quarantined_not_delivered(scand: Scand) -> None:
    raw = _mail(f"xx {MARKER} yy\n", subject="infected")
    code, text = scand.send(raw)
    assert code == 250, text
    assert text.startswith(b"2.7.0 quarantined as ")
    assert text.endswith(b" (virus)")
    qid = text.split()[3].decode()
    assert scand.sink.received == []
    entry = scand.quarantine.get(qid)
    assert entry.message_path.read_bytes() == raw
    assert entry.meta["envelope"] == {
        "mail_from": "sender@example.org",
        "rcpt_tos": ["to@example.com"],
    }
    assert entry.meta["message_id"] == "<infected@example.org>"
    assert entry.meta["findings"][0]["name"] == "Mailtower.Test.Marker"
    assert entry.meta["size_bytes"] == len(raw)
    assert entry.meta["verdict"] == "virus"


def _with_attachment(data: bytes, filename: str, subject: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "sender@example.org"
    msg["To"] = "to@example.com"
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{subject}@example.org>"
    msg.set_content("see attached\n")
    msg.add_attachment(data, "application", "octet-stream", filename=filename)
    return msg.as_bytes(policy=SMTP)


def _quarantined(scand: Scand, raw: bytes, verdict: str) -> QuarantineEntry:
    """Send ``raw``; check it was quarantined as ``verdict`` and recorded; return the entry."""
    delivered = len(scand.sink.received)
    code, text = scand.send(raw)
    assert code == 250, text
    assert text.startswith(b"2.7.0 quarantined as ") and text.endswith(f" ({verdict})".encode())
    qid = text.split()[3].decode()
    assert len(scand.sink.received) == delivered
    entry = scand.quarantine.get(qid)
    assert entry.message_path.read_bytes() == raw
    assert entry.meta["verdict"] == verdict
    events = [json.loads(p.read_bytes()) for p in scand.scanner.events.pending()]
    msgid = message_id(raw)
    assert [(e["verdict"], e["quarantine_id"]) for e in events if e["message_id"] == msgid] == [
        (verdict, qid)
    ]
    return entry


def test_banned_attachment_is_quarantined_as_banned(scand: Scand) -> None:
    raw = _with_attachment(b"not really a program", "invoice.pdf.exe", "banned")
    entry = _quarantined(scand, raw, "banned")
    names = {(f["engine"], f["name"]) for f in entry.meta["findings"]}
    assert ("policy", "policy.banned-extension.exe") in names
    assert scand.engine.calls == 1  # the whole-message engine ran too


def test_eicar_is_a_virus_in_process_even_if_the_engine_finds_nothing(scand: Scand) -> None:
    raw = _with_attachment(testdata.eicar(), "readme.txt", "eicar")
    entry = _quarantined(scand, raw, "virus")
    engines = {f["engine"] for f in entry.meta["findings"]}
    assert {"yara", "reputation"} <= engines and "test" not in engines


def test_encrypted_archive_is_quarantined_as_suspicious(scand: Scand) -> None:
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("a.txt", b"secret")
    data = bytearray(zipped.getvalue())
    for signature, flag_offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        data[data.find(signature) + flag_offset] |= 0x01  # the "encrypted" bit
    entry = _quarantined(scand, _with_attachment(bytes(data), "s.zip", "enc"), "suspicious")
    assert entry.meta["findings"][0]["name"] == "container.encrypted"


def test_settings_policy_applies(scand: Scand) -> None:
    settings = scand.scanner.settings.model_copy(
        update={"banned_extensions": ["pdf", ".ZIP"], "encrypted_archives": "pass"}
    )
    scand.scanner.reload(settings, [scand.engine])
    # .exe is no longer on the tower's list; .pdf is.
    code, text = scand.send(_with_attachment(b"%PDF-1.4 hello", "a.exe", "allowed"))
    assert code == 250 and b"re-injected" in text, text
    _quarantined(scand, _with_attachment(b"%PDF-1.4 hello", "report.PDF", "pdf"), "banned")


def test_reload_keeps_the_old_pipeline_when_the_new_one_fails(
    scand: Scand, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = scand.scanner.pipeline
    old_settings = scand.scanner.settings

    def broken(*args: object, **kwargs: object) -> None:
        raise YaraRuleError("YARA rule does not compile: bad.yar(1): syntax error")

    monkeypatch.setattr(scand_server, "in_process", broken)
    with pytest.raises(YaraRuleError):
        scand.scanner.reload(old_settings.model_copy(update={"banned_extensions": []}))
    assert scand.scanner.pipeline is old and scand.scanner.settings is old_settings
    monkeypatch.undo()
    scand.scanner.reload(old_settings, [scand.engine])
    assert scand.scanner.pipeline is not old
    code, _ = scand.send(_mail(subject="after-reload"))
    assert code == 250


@pytest.mark.parametrize("mode", ["fail", "hang"])
def test_engine_failure_tempfails_and_delivers_nothing(scand: Scand, mode: str) -> None:
    scand.engine.mode = mode
    code, text = scand.send(_mail(subject="unscanned"))
    assert code == 451, text
    assert text.startswith(b"4.7.1")
    assert scand.sink.received == []
    assert scand.quarantine.list() == []


def test_relay_refusing_reinjection_tempfails(scand: Scand) -> None:
    scand.sink.refuse = "452 4.3.1 Insufficient system storage"
    code, _ = scand.send(_mail(subject="refused"))
    assert code == 451
    assert scand.sink.received == []


def test_relay_down_tempfails(scand: Scand) -> None:
    settings = scand.scanner.settings
    dead_relay = settings.ports.model_copy(update={"reinject": 1})  # nothing listens there
    scand.scanner.reload(settings.model_copy(update={"ports": dead_relay}), [scand.engine])
    code, _ = scand.send(_mail(subject="relay-down"))
    assert code == 451


def test_too_big_is_552(scand: Scand) -> None:
    # More than the relay can ever send it (its own limit, its headers, dot-stuffing).
    lines = scand.scanner.settings.limits.filter_message_bytes // 78 + 1
    raw = _mail("x" * 70 + "\n") + (b"y" * 76 + b"\r\n") * lines
    code, _ = scand.send(raw)
    assert code == 552
    assert scand.sink.received == [] and scand.engine.calls == 0


# -- scand takes whatever the relay accepted (issue 15: a refusal here used to be a bounce) --


def _session(scand: Scand) -> smtplib.SMTP:
    smtp = smtplib.SMTP("127.0.0.1", scand.smtp_port, timeout=30)
    smtp.ehlo("relay.test")
    return smtp


def test_takes_a_617_character_local_part(scand: Scand) -> None:
    # The relay refuses it at RCPT time now; were one to come, scand must not refuse it (a
    # 5xx here used to bounce the message, unscanned, to the sender).
    with _session(scand) as smtp:
        assert smtp.mail("sender@example.org")[0] == 250
        code, reply = smtp.rcpt("a" * 617 + "@example.com")
    assert code == 250, reply


def test_takes_the_longest_mail_and_rcpt_the_relay_can_send(scand: Scand) -> None:
    limits = scand.scanner.settings.limits
    # A path at the relay's limits in characters, each of them as many bytes as UTF-8 allows
    # (SMTPUTF8), the local part quoted by Postfix (it holds a space).
    local = '"' + "\U00020000" * (limits.address_local_part_max - 1) + ' "'
    domain_len = limits.address_path_max - 2 - limits.address_local_part_max - 1
    domain = ".".join(["\U00020000" * 62] * 2 + ["\U00020000" * (domain_len - 2 * 63)])
    assert len(local) - 2 + 1 + len(domain) == limits.address_path_max - 2
    address = f"{local}@{domain}"
    size = f"SIZE={limits.filter_message_bytes}"
    with _session(scand) as smtp:
        code, reply = smtp.mail(f"<{address}>", [size, "BODY=8BITMIME", "SMTPUTF8"])
        assert code == 250, reply
        code, reply = smtp.rcpt(f"<{address}>")
        assert code == 250, reply
    assert len(f"RCPT TO:<{address}>".encode()) > 1001  # more than aiosmtpd's own limits


def test_a_command_over_the_limit_is_still_refused(scand: Scand) -> None:
    limit = scand.scanner.settings.limits.filter_command_bytes
    with _session(scand) as smtp:
        assert smtp.mail("sender@example.org")[0] == 250
        code, _ = smtp.rcpt("a" * limit + "@example.com")
    assert code == 500


def test_all_recipients_in_one_transaction_one_scan(scand: Scand) -> None:
    limit = scand.scanner.settings.limits.recipients_per_message  # the relay's, and per scan
    rcpts = [f"user{i}@example.com" for i in range(limit)]
    code, reply = scand.send(_mail(subject="many-rcpts"), rcpts)
    assert code == 250, reply
    assert scand.engine.calls == 1
    assert [r.rcpt_tos for r in scand.sink.received] == [rcpts]


def test_takes_the_largest_message_the_relay_can_send(scand: Scand) -> None:
    limits = scand.scanner.settings.limits
    # message_size_bytes as Postfix counts it (unstuffed, CRLF) and the relay's headers, all
    # in lines that Postfix dot-stuffs on the way to the filter: the worst case of growth.
    head = _mail(subject="largest")
    head = head[: head.index(b"\r\n\r\n") + 4]
    relay_headers = b"Received: from x (x [192.0.2.1])\r\n\tby relay (Postfix)\r\n"
    fold = b"\t" + b"p" * (limits.filter_line_bytes - 1) + b"\r\n"
    relay_headers += fold * ((limits.relay_header_bytes - len(relay_headers)) // len(fold) + 1)
    body_size = limits.message_size_bytes - len(head)
    raw = relay_headers + head + b".\r\n" * (body_size // 3)
    assert len(raw) + raw.count(b"\r\n.") >= limits.message_size_bytes + limits.relay_header_bytes
    code, reply = scand.send(raw)
    assert code == 250, reply
    assert len(scand.sink.received) == 1


def test_takes_lines_as_the_relay_folds_them(scand: Scand) -> None:
    width = scand.scanner.settings.limits.filter_line_bytes
    # A folded line at the scan transport's width that starts with a dot: 1 more when stuffed.
    raw = _mail(subject="long-lines") + (b"." + b"q" * (width - 1) + b"\r\n") * 3
    code, reply = scand.send(raw)
    assert code == 250, reply


def test_every_verdict_is_spooled_as_event(scand: Scand) -> None:
    scand.send(_mail(subject="e1"))
    scand.send(_mail(MARKER, subject="e2"))
    scand.engine.mode = "fail"
    scand.send(_mail(subject="e3"))
    events = [json.loads(p.read_bytes()) for p in scand.scanner.events.pending()]
    by_msgid = {e["message_id"]: e for e in events}
    assert by_msgid["<e1@example.org>"]["verdict"] == "clean"
    assert by_msgid["<e2@example.org>"]["verdict"] == "virus"
    assert by_msgid["<e2@example.org>"]["quarantine_id"]
    assert by_msgid["<e3@example.org>"]["verdict"] == "tempfail"
    assert all(e["scanner"] == "127.0.0.5" and e["tower"] == "tower-t" for e in events)


def test_concurrent_messages_all_answered(scand: Scand) -> None:
    results: list[int] = []

    def one(n: int) -> None:
        results.append(scand.send(_mail(subject=f"c{n}"))[0])

    threads = [threading.Thread(target=one, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [250] * 20
    assert len(scand.sink.received) == 20


def test_health_and_metrics(scand: Scand) -> None:
    status, body = scand.get("/health")
    assert status == 200
    doc = json.loads(body)
    # what this scand runs and what a restart would run (a rolling upgrade compares them)
    running, installed = doc.pop("stack"), doc.pop("stack_installed")
    assert running == installed and doc.pop("stack_pending") is None  # ready, nothing to roll
    assert doc == {
        "status": "ok",
        "test": "test 1.0",
        "rules_bundle": None,
        "in_flight": 0,
        "rules_installed": None,  # what a restart would load (None: the shipped rules)
        "rules_busy": False,  # no bundle request being carried out
    }
    scand.send(_mail(subject="m1"))
    scand.engine.mode = "fail"
    status, body = scand.get("/health")
    assert status == 503 and json.loads(body)["status"] == "fail"
    scand.send(_mail(subject="m2"))
    status, body = scand.get("/metrics")
    text = body.decode()
    assert status == 200
    assert 'mailtower_messages_total{verdict="clean"} 1.0' in text
    assert 'mailtower_messages_total{verdict="tempfail"} 1.0' in text
    assert 'mailtower_engine_errors_total{engine="test"} 1.0' in text
    assert 'mailtower_engine_seconds_count{engine="test"} 2.0' in text
    for stage in ("yara", "reputation", "skeptic"):  # the in-process stages, per message
        assert f'mailtower_engine_seconds_count{{engine="{stage}"}} 2.0' in text
    for stage in ("mime", "containers"):
        assert f'mailtower_stage_seconds_count{{stage="{stage}"}} 2.0' in text
    assert "mailtower_events_spooled 2.0" in text
    assert "mailtower_in_flight 0.0" in text
    assert "mailtower_rules_bundle_version 0.0" in text  # the shipped rules: no bundle
    assert scand.get("/nope")[0] == 404


def test_health_times_out_on_hung_engine(scand: Scand) -> None:
    scand.engine.mode = "hang"
    scand.engine.timeout_s = 30  # the health timeout (1 s) must cut it short
    status, body = scand.get("/health")
    assert status == 503
    assert "test" in json.loads(body)["reason"]


def test_in_flight_is_visible_while_scanning(scand: Scand) -> None:
    scand.engine.mode = "hang"
    scand.engine.timeout_s = 30
    sender = threading.Thread(target=scand.send, args=(_mail(subject="slow"),))
    sender.start()
    wait_until(lambda: scand.scanner.in_flight == 1, 10, "the message to be in flight")
    scand.engine.release()
    sender.join(30)
    assert scand.scanner.in_flight == 0


# -- poison messages (issue 15): internationalised addresses, and failures of the message's own


RELAY_HOSTNAME = "mx.tower-t.test"  # make_settings' hostname: the relay's Postfix myhostname


def _relay_received(queue_id: str, arrived: datetime, *, host: str = RELAY_HOSTNAME) -> bytes:
    """The Received field the relay's Postfix smtpd puts on top of every message it takes."""
    return (
        "Received: from sender.example (sender.example [192.0.2.25])\r\n"
        "\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))\r\n"
        f"\tby {host} (Postfix) with ESMTPS id {queue_id}\r\n"
        f"\tfor <to@example.com>; {format_datetime(arrived)}\r\n"
    ).encode()


def _relay_send(
    scand: Scand,
    raw: bytes,
    *,
    rcpts: list[bytes] | None = None,
    ident: str | None = None,
) -> tuple[int, bytes]:
    """Send as the relay's scan transport does: XFORWARD (when ``ident``), then the envelope
    as raw bytes (Postfix passes a UTF-8 address on without SMTPUTF8)."""
    with smtplib.SMTP("127.0.0.1", scand.smtp_port, timeout=30) as smtp:
        smtp.ehlo("relay.test")
        assert smtp.has_extn("xforward")
        if ident is not None:
            code, _ = smtp.docmd("XFORWARD", f"NAME=sender.example ADDR=192.0.2.25 IDENT={ident}")
            assert code == 250
        assert smtp.mail("sender@example.org")[0] == 250
        for rcpt in rcpts or [b"to@example.com"]:
            smtp.send(b"RCPT TO:<" + rcpt + b">\r\n")
            assert smtp.getreply()[0] == 250
        return smtp.data(raw)


def _hours_ago(hours: float) -> datetime:
    return datetime.now(UTC) - timedelta(hours=hours)


def _metric(scand: Scand, line: str) -> bool:
    return line in scand.get("/metrics")[1].decode()


def test_a_non_ascii_recipient_is_reinjected_not_a_crash(scand: Scand) -> None:
    code, text = _relay_send(scand, _mail(subject="idn"), rcpts=["jörg@example.com".encode()])
    assert code == 250, text
    assert scand.sink.received[0].rcpt_tos == ["jörg@example.com"]


def test_a_message_the_relay_refuses_for_good_is_set_aside_once_old(scand: Scand) -> None:
    scand.sink.refuse = "550 5.1.1 <to@example.com>: Recipient address rejected"
    raw = _relay_received("4ABCDE12F3", _hours_ago(2)) + _mail(subject="poison")
    code, text = _relay_send(scand, raw, ident="4ABCDE12F3")
    assert code == 250 and b"set aside as" in text and b"unprocessable" in text, text
    [entry] = scand.quarantine.list()
    assert entry.meta["verdict"] == "unprocessable"
    assert "re-injection refused" in entry.meta["reason"] and "550" in entry.meta["reason"]
    assert entry.meta["relay_queue_id"] == "4ABCDE12F3"
    assert entry.meta["envelope"] == {
        "mail_from": "sender@example.org",
        "rcpt_tos": ["to@example.com"],
    }
    assert entry.message_path.read_bytes() == raw  # the message as the relay sent it
    assert scand.sink.received == []  # never delivered
    [event] = [json.loads(p.read_bytes()) for p in scand.scanner.events.pending()]
    # verdict_events admits the scan verdicts only: a tempfail, its quarantine and the finding
    assert event["verdict"] == "tempfail" and event["quarantine_id"] == entry.id
    assert scand_server.UNPROCESSABLE_FINDING in event["findings"]
    assert _metric(scand, 'mailtower_messages_total{verdict="unprocessable"} 1.0')


def test_a_young_failing_message_is_still_retried(scand: Scand) -> None:
    scand.sink.refuse = "550 5.1.1 <to@example.com>: Recipient address rejected"
    raw = _relay_received("4ABCDE12F3", _hours_ago(0.5)) + _mail(subject="young")
    code, text = _relay_send(scand, raw, ident="4ABCDE12F3")
    assert code == 451 and text.startswith(b"4.4.1"), text
    assert scand.quarantine.list() == []


@pytest.mark.parametrize(
    ("received", "ident"),
    [
        # no XFORWARD: nothing ties a header to the relay's queue file
        (_relay_received("4ABCDE12F3", _hours_ago(2)), None),
        # the topmost header names another queue id
        (_relay_received("4ABCDE12F3", _hours_ago(2)), "4FFFFF0000"),
        # another host's header
        (_relay_received("4ABCDE12F3", _hours_ago(2), host="mx.elsewhere.test"), "4ABCDE12F3"),
        # the sender's forged header under the relay's own, which says: just arrived
        (
            _relay_received("4ABCDE12F3", _hours_ago(0))
            + _relay_received("4ABCDE12F3", _hours_ago(50)),
            "4ABCDE12F3",
        ),
    ],
)
def test_without_the_relays_own_arrival_a_failing_message_is_retried(
    scand: Scand, received: bytes, ident: str | None
) -> None:
    scand.sink.refuse = "550 5.1.1 <to@example.com>: Recipient address rejected"
    code, _ = _relay_send(scand, received + _mail(subject="untrusted"), ident=ident)
    assert code == 451
    assert scand.quarantine.list() == []


def test_a_relay_that_is_busy_is_not_the_messages_fault(scand: Scand) -> None:
    scand.sink.refuse = "452 4.3.1 Insufficient system storage"
    raw = _relay_received("4ABCDE12F3", _hours_ago(2)) + _mail(subject="busy-relay")
    code, _ = _relay_send(scand, raw, ident="4ABCDE12F3")
    assert code == 451
    assert scand.quarantine.list() == []


def test_a_scan_that_fails_on_one_message_with_healthy_engines_is_set_aside(
    scand: Scand, monkeypatch: pytest.MonkeyPatch
) -> None:
    ordinary = scand.engine.scan

    def times_out_on_poison(data: bytes) -> list[Finding]:
        if b"POISON-PAYLOAD" in data:
            raise EngineTimeout("test: no answer within 0.2s")
        return ordinary(data)

    monkeypatch.setattr(scand.engine, "scan", times_out_on_poison)
    old = _relay_received("4ABCDE12F3", _hours_ago(2)) + _mail("POISON-PAYLOAD\n", "slow")
    code, text = _relay_send(scand, old, ident="4ABCDE12F3")
    assert code == 250 and b"unprocessable" in text, text
    [entry] = scand.quarantine.list()
    assert "scan incomplete" in entry.meta["reason"] and "test" in entry.meta["reason"]
    assert _relay_send(scand, _mail(subject="next"))[0] == 250  # other mail flows


def test_a_timeout_while_messages_wait_for_a_slot_is_the_loads_fault(
    scand: Scand, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After an outage the backlog is old and the scanner saturated: a scan that runs out of
    time then is retried, not set aside (issue 15: a timeout under load is no reason)."""
    ordinary = scand.engine.scan

    def slow_under_load(data: bytes) -> list[Finding]:
        if b"BACKLOG" in data:
            raise EngineTimeout("test: no answer within 0.2s")
        return ordinary(data)

    monkeypatch.setattr(scand.engine, "scan", slow_under_load)
    scanner = scand.scanner
    monkeypatch.setattr(scanner, "in_flight", scanner.concurrency + 3, raising=False)
    old = _relay_received("4ABCDE12F3", _hours_ago(2)) + _mail("BACKLOG\n", "backlog")
    code, text = _relay_send(scand, old, ident="4ABCDE12F3")
    assert code == 451, text
    assert scand.quarantine.list() == []


def test_an_engine_that_is_down_is_the_scanners_fault(scand: Scand) -> None:
    scand.engine.mode = "fail"  # fails every scan and its health check
    raw = _relay_received("4ABCDE12F3", _hours_ago(2)) + _mail(subject="engine-down")
    code, text = _relay_send(scand, raw, ident="4ABCDE12F3")
    assert code == 451 and text.startswith(b"4.7.1"), text
    assert scand.quarantine.list() == []


def test_a_crash_of_scand_on_an_old_message_sets_it_aside(
    scand: Scand, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(raw: bytes, policies: object) -> Verdict:
        raise RuntimeError("a bug of ours")

    # scand scans once for all its recipients' policies (Pipeline.scan_for).
    monkeypatch.setattr(scand.scanner.pipeline, "scan_for", crash)
    young = _relay_received("4ABCDE12F3", _hours_ago(0)) + _mail(subject="crash-young")
    assert _relay_send(scand, young, ident="4ABCDE12F3")[0] == 451
    old = _relay_received("4ABCDE12F3", _hours_ago(2)) + _mail(subject="crash-old")
    code, text = _relay_send(scand, old, ident="4ABCDE12F3")
    assert code == 250 and b"unprocessable" in text, text
    [entry] = scand.quarantine.list()
    assert "RuntimeError" in entry.meta["reason"]
    events = [json.loads(p.read_bytes()) for p in scand.scanner.events.pending()]
    assert [e["quarantine_id"] for e in events] == [entry.id]


def test_an_old_message_that_cannot_be_set_aside_is_retried(scand: Scand) -> None:
    scand.sink.refuse = "550 5.1.1 <to@example.com>: Recipient address rejected"
    (scand.spool / "quarantine").write_text("not a directory")  # the quarantine cannot be written
    raw = _relay_received("4ABCDE12F3", _hours_ago(2)) + _mail(subject="disk")
    code, text = _relay_send(scand, raw, ident="4ABCDE12F3")
    assert code == 451 and text.startswith(b"4.3.0"), text


def test_xforward_is_kept_for_one_transaction_only(scand: Scand) -> None:
    scand.sink.refuse = "550 5.1.1 <to@example.com>: Recipient address rejected"
    raw = _relay_received("4ABCDE12F3", _hours_ago(2)) + _mail(subject="two")
    with smtplib.SMTP("127.0.0.1", scand.smtp_port, timeout=30) as smtp:
        smtp.ehlo("relay.test")
        assert smtp.docmd("XFORWARD", "IDENT=4ABCDE12F3")[0] == 250
        assert smtp.docmd("XFORWARD", "BOGUS=1")[0] == 501
        smtp.mail("sender@example.org")
        assert smtp.docmd("XFORWARD", "IDENT=4ABCDE12F3")[0] == 503  # inside a transaction
        smtp.rcpt("to@example.com")
        assert smtp.data(raw)[0] == 250  # the first: set aside
        smtp.mail("sender@example.org")
        smtp.rcpt("to@example.com")
        assert smtp.data(raw)[0] == 451  # the next one has no IDENT of its own


def test_the_unprocessable_count_is_exported_from_the_start(scand: Scand) -> None:
    # Prometheus' increase() would not see a series that first appears at 1.
    assert _metric(scand, 'mailtower_messages_total{verdict="unprocessable"} 0.0')


def test_xforward_takes_a_long_helo_name(scand: Scand) -> None:
    # Postfix sends the client's HELO name xtext-encoded; a refusal would bounce the message.
    helo = "+2B" * 250  # a HELO name of 250 plus signs
    with smtplib.SMTP("127.0.0.1", scand.smtp_port, timeout=30) as smtp:
        smtp.ehlo("relay.test")
        assert smtp.docmd("XFORWARD", f"PROTO=ESMTP HELO={helo} IDENT=4ABCDE12F3")[0] == 250
        assert smtp.docmd("XFORWARD", "NAME=[UNAVAILABLE] ADDR=IPv6:2001:db8::1 PORT=25")[0] == 250
        assert smtp.mail("sender@example.org")[0] == 250


def test_the_issues_message_is_set_aside_when_the_relay_cannot_take_smtputf8(
    scand: Scand,
) -> None:
    # Issue 15 as reported, against a re-injection listener without SMTPUTF8: retried while
    # young, set aside once old — never a crash, never three days of rescans.
    handler = SinkHandler()
    port = free_port()
    no_utf8 = Controller(handler, hostname="127.0.0.1", port=port, enable_SMTPUTF8=False)
    no_utf8.start()
    try:
        settings = scand.scanner.settings
        ports = settings.ports.model_copy(update={"reinject": port})
        scand.scanner.reload(settings.model_copy(update={"ports": ports}), [scand.engine])
        rcpt = ["jörg@example.com".encode()]
        young = _relay_received("4ABCDE12F3", _hours_ago(0.1)) + _mail(subject="idn-young")
        code, text = _relay_send(scand, young, rcpts=rcpt, ident="4ABCDE12F3")
        assert code == 451 and text.startswith(b"4.4.1"), text
        old = _relay_received("4ABCDE12F4", _hours_ago(1.5)) + _mail(subject="idn-old")
        code, text = _relay_send(scand, old, rcpts=rcpt, ident="4ABCDE12F4")
        assert code == 250 and b"unprocessable" in text, text
        [entry] = scand.quarantine.list()
        assert "SMTPUTF8" in entry.meta["reason"]
        assert entry.meta["envelope"]["rcpt_tos"] == ["jörg@example.com"]
        assert handler.received == []
    finally:
        no_utf8.stop()


def test_a_message_set_aside_lists_and_releases_once_the_cause_is_fixed(
    scand: Scand, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scand.sink.refuse = "550 5.1.1 <jörg@example.com>: Recipient address rejected"
    raw = _relay_received("4ABCDE12F3", _hours_ago(2)) + _mail(subject="set-aside")
    rcpt = ["jörg@example.com".encode()]
    assert _relay_send(scand, raw, rcpts=rcpt, ident="4ABCDE12F3")[0] == 250
    [entry] = scand.quarantine.list()
    spool = ["--spool", str(scand.spool)]
    assert cli_main(["quarantine", "list", *spool]) == 0
    assert "unprocessable" in capsys.readouterr().out
    scand.sink.refuse = None  # the customer's routing fixed
    settings_path = tmp_path / "tower.json"
    settings_path.write_text(scand.scanner.settings.model_dump_json())
    assert (
        cli_main(["quarantine", "release", entry.id, *spool, "--settings", str(settings_path)]) == 0
    )
    [got] = scand.sink.received
    assert got.rcpt_tos == ["jörg@example.com"]
    assert b"X-Mailtower-Verdict: released; was=unprocessable;" in got.content
    assert got.content.endswith(raw)
