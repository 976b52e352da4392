"""scand with installed rule bundles: a new bundle's rule detects what the old rules passed,
after a reload that fails no message (in-process, and a real daemon taking SIGHUP)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import smtplib
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest
from bundle_builders import PROBE, PROBE_RULE, PROBE_RULE_NAME, Keys, make_keys, rules_copy
from scand_fakes import SinkHandler, make_settings, start_sink, wait_until

from mailtower import bundles
from mailtower.scand import __main__ as scand_main
from mailtower.scand.http import start_http
from mailtower.scand.quarantine import QuarantineStore
from mailtower.scand.server import Handler, Scanner, start_smtp
from mailtower.settings import TowerSettings


@dataclass
class Tower:
    """Rule bundles as the GOC makes them, and the rules root of one scanner."""

    keys: Keys
    rules: Path
    out: Path
    root: Path

    def publish(self, version: int, *, probe_rule: bool = False) -> Path:
        if probe_rule:
            (self.rules / "yara" / "probe.yar").write_text(PROBE_RULE)
        path = self.out / f"rules-{version}.tar.gz"
        bundles.build(self.rules, self.keys.private, version, path)
        return path

    def install(self, bundle: Path) -> None:
        bundles.install(bundle, self.keys.public, self.root)


@pytest.fixture
def tower(tmp_path: Path) -> Tower:
    (tmp_path / "out").mkdir()
    keys, rules = make_keys(tmp_path / "keys"), rules_copy(tmp_path / "rules")
    t = Tower(keys, rules, tmp_path / "out", tmp_path / "rules-root")
    t.install(t.publish(1))
    return t


def _settings(tmp_path: Path, sink_port: int, rules_root: Path) -> tuple[TowerSettings, Path]:
    """Loopback settings with no whole-message engine (no clamd here) and the rules root;
    also written where scand's SIGHUP reads them."""
    settings = make_settings(tmp_path / "spool", reinject_port=sink_port).model_copy(
        update={"engines": [], "rules_dir": str(rules_root)}
    )
    path = tmp_path / "tower.json"
    path.write_text(settings.model_dump_json())
    return settings, path


def _mail(subject: str, body: str = "hello\n") -> bytes:
    msg = EmailMessage()
    msg["From"] = "sender@example.org"
    msg["To"] = "to@example.com"
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{subject}@example.org>"
    msg.set_content(body)
    return msg.as_bytes().replace(b"\n", b"\r\n")


def _send(port: int, raw: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        smtp.ehlo("relay.test")
        smtp.mail("sender@example.org")
        smtp.rcpt("to@example.com")
        return smtp.data(raw)


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _probe_mail(subject: str) -> bytes:
    return _mail(subject, f"please read: {PROBE}\n")


@dataclass
class Scand:
    scanner: Scanner
    sink: SinkHandler
    settings_path: Path
    smtp_port: int
    http_port: int


@pytest.fixture
def scand(tmp_path: Path, tower: Tower) -> Iterator[Scand]:
    controller, sink, sink_port = start_sink()
    settings, settings_path = _settings(tmp_path, sink_port, tower.root)
    scanner = Scanner(settings, host_address="127.0.0.5")
    loop = asyncio.new_event_loop()
    servers: list[asyncio.Server] = []

    async def start() -> None:
        servers.append(await start_smtp(Handler(scanner), "127.0.0.1", settings.ports.filter))
        servers.append(await start_http(scanner, "127.0.0.1", settings.ports.scanner_http))

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    yield Scand(scanner, sink, settings_path, settings.ports.filter, settings.ports.scanner_http)
    if sink.gate is not None:
        sink.gate.set()
    for server in servers:
        loop.call_soon_threadsafe(server.close)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    scanner.executor.shutdown(wait=True)
    controller.stop()


def test_new_bundle_detects_after_reload_and_no_message_fails(
    scand: Scand, tower: Tower, tmp_path: Path
) -> None:
    assert scand.scanner.rules_version == 1
    code, text = _send(scand.smtp_port, _probe_mail("before"))
    assert code == 250 and b"re-injected" in text, text  # the old rules pass it

    # Messages in flight across the reload: scanned, held at the relay's re-injection.
    scand.sink.gate = threading.Event()
    replies: list[tuple[str, int]] = []

    def send(subject: str) -> None:
        replies.append((subject, _send(scand.smtp_port, _mail(subject))[0]))

    senders = [threading.Thread(target=send, args=(f"held-{n}",)) for n in range(3)]
    for sender in senders:
        sender.start()
    wait_until(lambda: scand.sink.holding == 3, 30, "3 messages held at re-injection")

    tower.install(tower.publish(2, probe_rule=True))
    reloaded: list[bool] = []
    reloader = threading.Thread(
        target=lambda: reloaded.append(scand_main.reload(scand.scanner, scand.settings_path))
    )
    reloader.start()
    # More messages arrive while the new rules compile.
    during = 0
    while reloader.is_alive() and during < 20:
        sender = threading.Thread(target=send, args=(f"during-{during}",))
        sender.start()
        senders.append(sender)
        during += 1
        reloader.join(0.01)
    reloader.join(60)
    assert reloaded == [True]
    assert during >= 1, "the reload finished before any message could arrive during it"
    scand.sink.gate.set()
    for sender in senders:
        sender.join(60)

    subjects = [f"held-{n}" for n in range(3)] + [f"during-{n}" for n in range(during)]
    assert sorted(replies) == sorted((s, 250) for s in subjects)  # none failed or was lost
    delivered = [
        got.content.split(b"Subject: ")[1].split(b"\r\n")[0].decode() for got in scand.sink.received
    ]
    assert set(subjects) <= set(delivered)

    # The same message the old rules passed is now a virus.
    code, text = _send(scand.smtp_port, _probe_mail("after"))
    assert code == 250 and text.endswith(b" (virus)"), text
    qid = text.split()[3].decode()
    entry = QuarantineStore(tmp_path / "spool" / "quarantine").get(qid)
    assert ("yara", PROBE_RULE_NAME) in {(f["engine"], f["name"]) for f in entry.meta["findings"]}

    status, body = _get(scand.http_port, "/health")
    assert status == 200 and json.loads(body)["rules_bundle"] == 2
    metrics = _get(scand.http_port, "/metrics")[1].decode()
    assert "mailtower_rules_bundle_version 2.0" in metrics


def test_reload_keeps_old_rules_when_the_installed_ones_do_not_load(
    scand: Scand, tower: Tower
) -> None:
    tower.install(tower.publish(2, probe_rule=True))
    # Someone edits the installed copy by hand: the reload must refuse it and keep version 1.
    (tower.root / "versions" / "2" / "yara" / "probe.yar").write_text("rule broken {")
    old = scand.scanner.pipeline
    assert scand_main.reload(scand.scanner, scand.settings_path) is False
    assert scand.scanner.pipeline is old and scand.scanner.rules_version == 1
    code, text = _send(scand.smtp_port, _probe_mail("still-old"))
    assert code == 250 and b"re-injected" in text
    assert json.loads(_get(scand.http_port, "/health")[1])["rules_bundle"] == 1


def test_rollback_then_reload_goes_back(scand: Scand, tower: Tower) -> None:
    tower.install(tower.publish(2, probe_rule=True))
    assert scand_main.reload(scand.scanner, scand.settings_path)
    assert _send(scand.smtp_port, _probe_mail("v2"))[1].endswith(b" (virus)")
    bundles.rollback(tower.root)
    assert scand_main.reload(scand.scanner, scand.settings_path)
    assert scand.scanner.rules_version == 1
    code, text = _send(scand.smtp_port, _probe_mail("v1-again"))
    assert code == 250 and b"re-injected" in text


def test_rules_dir_without_a_bundle_uses_the_shipped_rules(tmp_path: Path) -> None:
    settings, _ = _settings(tmp_path, 1, tmp_path / "empty-root")
    scanner = Scanner(settings, host_address="127.0.0.5")
    try:
        assert scanner.rules_version is None
        assert scanner.metrics.registry.get_sample_value("mailtower_rules_bundle_version") == 0
    finally:
        scanner.executor.shutdown()


def test_real_scand_takes_a_new_bundle_on_sighup(tmp_path: Path, tower: Tower) -> None:
    controller, sink, sink_port = start_sink()
    settings, settings_path = _settings(tmp_path, sink_port, tower.root)
    http = settings.ports.scanner_http
    log_path = tmp_path / "scand.log"

    def bundle_version() -> int | None:
        try:
            status, body = _get(http, "/health")
        except OSError:
            return None
        return json.loads(body)["rules_bundle"] if status == 200 else None

    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailtower.scand", "--settings", str(settings_path)]
            + ["--listen", "127.0.0.1", "--host-address", "127.0.0.5"],
            stdout=log,
            stderr=log,
        )
    try:
        wait_until(lambda: bundle_version() == 1, 30, f"scand on bundle 1 ({log_path})")
        code, text = _send(settings.ports.filter, _probe_mail("before"))
        assert code == 250 and b"re-injected" in text, text

        tower.install(tower.publish(2, probe_rule=True))
        os.kill(proc.pid, signal.SIGHUP)
        wait_until(lambda: bundle_version() == 2, 30, f"scand on bundle 2 ({log_path})")
        assert "event=reloaded" in log_path.read_text()
        code, text = _send(settings.ports.filter, _probe_mail("after"))
        assert code == 250 and text.endswith(b" (virus)"), text

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        controller.stop()
