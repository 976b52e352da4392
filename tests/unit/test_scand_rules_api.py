"""scand's rule-bundle API (POST /rules/apply, /rules/rollback) and the monitor's canary:
a real scand in-process, its bundles fetched from a mirror served over HTTP on loopback."""

from __future__ import annotations

import asyncio
import functools
import http.server
import json
import smtplib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from bundle_builders import PROBE, PROBE_RULE, Keys, make_keys, repack, replace_member, rules_copy
from scand_fakes import SinkHandler, free_port, make_settings, start_sink

from mailtower import bundles
from mailtower.monitor import health
from mailtower.monitor.errors import CanaryFailed, RolloutError
from mailtower.monitor.rollout import builtin_canaries, check_canary_answer, marked
from mailtower.scand import bundle_apply
from mailtower.scand.bundle_apply import PROBE_NAME
from mailtower.scand.http import ScannerSource, start_http
from mailtower.scand.server import Handler, Scanner, start_smtp
from mailtower.settings import Bundles

CANARY = "canary-secret-0123456789"
MONITOR = "127.0.0.6"  # the tower's monitor: the mirror, and where canaries come from
TOKEN = {"X-Mailtower-Token": CANARY}


@dataclass
class Rig:
    keys: Keys
    rules: Path
    mirror: Path  # served as http://MONITOR:<port>/rules
    scanner: Scanner
    sink: SinkHandler
    smtp_port: int
    http_port: int
    clamav: Path

    def publish(self, version: int, *, probe_rule: bool = False) -> Path:
        if probe_rule:
            (self.rules / "yara" / "probe.yar").write_text(PROBE_RULE)
        path = self.mirror / f"rules-{version}.tar.gz"
        bundles.build(self.rules, self.keys.private, version, path)
        return path

    def post(self, path: str, body: dict | None = None, headers=TOKEN) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else b""
        return asyncio.run(
            health.request("127.0.0.1", self.http_port, "POST", path, data, headers, 60.0)
        )

    def health(self) -> dict:
        return asyncio.run(health.check("127.0.0.1", self.http_port, 10.0))[1]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        return None  # the test's output stays readable


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    keys, rules = make_keys(tmp_path / "keys"), rules_copy(tmp_path / "rules")
    mirror = tmp_path / "mirror" / "rules"
    mirror.mkdir(parents=True)
    mirror_port = free_port()
    httpd = http.server.ThreadingHTTPServer(
        (MONITOR, mirror_port),
        functools.partial(_Quiet, directory=str(tmp_path / "mirror")),
    )
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    controller, sink, sink_port = start_sink()
    base = make_settings(tmp_path / "spool", reinject_port=sink_port)
    settings = base.model_copy(
        update={
            "engines": [],  # no clamd here: the probe wait has no engine to ask
            "rules_dir": str(tmp_path / "rules-root"),
            "clamav_db_dir": str(tmp_path / "clamav"),
            "ports": base.ports.model_copy(update={"mirror_http": mirror_port}),
            # the monitor is this test: its canaries come from MONITOR
            "hosts": base.hosts.model_copy(update={"monitor": IPv4Address(MONITOR)}),
            "secrets": base.secrets.model_copy(update={"canary": CANARY}),
            "bundles": Bundles(
                public_key=keys.public_path.read_text(), source="http://127.0.0.1:9"
            ),
        }
    )
    (tmp_path / "clamav").mkdir()
    settings_path = tmp_path / "tower.json"
    settings_path.write_text(settings.model_dump_json())
    scanner = Scanner(settings, host_address="127.0.0.5")
    loop = asyncio.new_event_loop()
    servers: list[asyncio.Server] = []

    async def start() -> None:
        servers.append(await start_smtp(Handler(scanner), "127.0.0.1", settings.ports.filter))
        source = ScannerSource(scanner, settings_path)
        servers.append(await start_http(source, "127.0.0.1", settings.ports.scanner_http))

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    yield Rig(
        keys,
        rules,
        mirror,
        scanner,
        sink,
        settings.ports.filter,
        settings.ports.scanner_http,
        tmp_path / "clamav",
    )
    for server in servers:
        loop.call_soon_threadsafe(server.close)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    scanner.executor.shutdown(wait=True)
    controller.stop()
    httpd.shutdown()


def _canary(rig: Rig, kind: str, token: str = CANARY, source: str = MONITOR) -> tuple[int, str]:
    raw = marked(next(c.message for c in builtin_canaries() if c.expect == kind), token)
    with smtplib.SMTP("127.0.0.1", rig.smtp_port, timeout=60, source_address=(source, 0)) as smtp:
        smtp.ehlo("monitor.test")
        smtp.mail("monitor@mailtower.invalid")
        smtp.rcpt("canary@mailtower.invalid")
        code, reply = smtp.data(raw)
    return code, reply.decode()


def test_apply_refuses_without_the_token_and_changes_nothing(rig: Rig) -> None:
    rig.publish(1)
    assert rig.post("/rules/apply", {"version": 1}, headers={})[0] == 403
    assert rig.post("/rules/apply", {"version": 1}, {"X-Mailtower-Token": "wrong" * 5})[0] == 403
    assert rig.post("/rules/apply", {"version": "one"})[0] == 400
    assert rig.scanner.rules_version is None
    assert rig.health()["rules_bundle"] is None


def test_apply_installs_reloads_and_reports_the_version(rig: Rig) -> None:
    rig.publish(1)
    status, doc = rig.post("/rules/apply", {"version": 1})
    assert (status, doc["rules_bundle"], doc["installed"]) == (200, 1, True), doc
    assert rig.scanner.rules_version == 1
    assert rig.health()["rules_bundle"] == 1
    assert (rig.clamav / PROBE_NAME).exists()  # clamd's directory holds the bundle's probe
    # Asked again: nothing to install, the answer is the same.
    status, doc = rig.post("/rules/apply", {"version": 1})
    assert (status, doc["rules_bundle"], doc["installed"]) == (200, 1, False), doc


def test_new_rules_detect_and_rollback_restores_the_old(rig: Rig) -> None:
    rig.publish(1)
    assert rig.post("/rules/apply", {"version": 1})[0] == 200
    rig.publish(2, probe_rule=True)
    probe = f"Subject: p\r\n\r\n{PROBE}\r\n".encode()
    assert rig.scanner.pipeline.scan(probe).kind.value == "clean"
    assert rig.post("/rules/apply", {"version": 2})[0] == 200
    assert rig.scanner.pipeline.scan(probe).kind.value != "clean"

    status, doc = rig.post("/rules/rollback")
    assert (status, doc["rules_bundle"]) == (200, 1), doc
    assert rig.scanner.rules_version == 1
    assert rig.scanner.pipeline.scan(probe).kind.value == "clean"
    # Older than what runs: refused.
    rig.post("/rules/apply", {"version": 2})
    status, doc = rig.post("/rules/apply", {"version": 1})
    assert status == 409 and "newer" in doc["reason"], doc


def test_a_tampered_or_missing_bundle_is_refused_and_nothing_changes(rig: Rig) -> None:
    rig.publish(1)
    assert rig.post("/rules/apply", {"version": 1})[0] == 200
    good = rig.publish(2)
    tampered = repack(
        good,
        rig.mirror / "rules-2.tar.gz.bad",
        replace_member("yara/scripts.yar", b"rule x { condition: true }"),
    )
    tampered.replace(good)
    status, doc = rig.post("/rules/apply", {"version": 2})
    assert status == 409 and "refused" in doc["reason"], doc
    status, doc = rig.post("/rules/apply", {"version": 7})  # not on the mirror
    assert status == 409 and "cannot fetch" in doc["reason"], doc
    assert rig.scanner.rules_version == 1 and rig.health()["rules_bundle"] == 1


def test_canary_is_answered_with_verdict_and_version_and_never_delivered(rig: Rig) -> None:
    rig.publish(1)
    rig.post("/rules/apply", {"version": 1})
    code, reply = _canary(rig, "clean")
    check_canary_answer(f"{code} {reply}", "clean", 1)
    code, reply = _canary(rig, "virus")
    check_canary_answer(f"{code} {reply}", "virus", 1)
    with pytest.raises(RolloutError, match="came back virus, not clean"):
        check_canary_answer(f"{code} {reply}", "clean", 1)
    with pytest.raises(RolloutError, match="another bundle"):
        check_canary_answer(f"{code} {reply}", "virus", 2)
    assert rig.sink.received == []  # nothing re-injected
    # Without the exact secret it is ordinary mail: scanned and re-injected.
    code, reply = _canary(rig, "clean", token="not-the-secret-at-all")
    assert code == 250 and "re-injected" in reply
    assert len(rig.sink.received) == 1
    with pytest.raises(RolloutError, match="not answered as a canary"):
        check_canary_answer(f"{code} {reply}", "clean", 1)
    # With the secret, but not from the tower's monitor: ordinary mail too.
    code, reply = _canary(rig, "clean", source="127.0.0.9")
    assert code == 250 and "re-injected" in reply and len(rig.sink.received) == 2


def test_canary_failure_is_its_own_error() -> None:
    assert issubclass(CanaryFailed, RolloutError)


def test_the_first_bundle_rolls_back_to_the_shipped_rules(rig: Rig) -> None:
    rig.publish(1)
    assert rig.post("/rules/apply", {"version": 1})[0] == 200
    status, doc = rig.post("/rules/rollback")
    assert (status, doc["rules_bundle"]) == (200, None), doc
    assert rig.scanner.rules_version is None
    health_doc = rig.health()
    assert (health_doc["rules_bundle"], health_doc["rules_installed"]) == (None, None)
    assert not (rig.clamav / PROBE_NAME).exists()  # the bundle's ClamAV files are gone too


def test_a_failure_after_the_switch_puts_the_old_bundle_back(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig.publish(1)
    assert rig.post("/rules/apply", {"version": 1})[0] == 200
    rig.publish(2, probe_rule=True)
    real_sync = bundle_apply.sync_clamav
    calls = {"n": 0}

    def failing_once(*args, **kwargs):  # the new bundle is installed, then clamd fails
        calls["n"] += 1
        if calls["n"] == 1:
            raise bundle_apply.ApplyError("clamd did not take RELOAD; is it running?")
        return real_sync(*args, **kwargs)

    monkeypatch.setattr(bundle_apply, "sync_clamav", failing_once)
    status, doc = rig.post("/rules/apply", {"version": 2})
    assert status == 409 and doc["rules_bundle"] == 1, doc
    assert "did not take RELOAD" in doc["reason"]
    health_doc = rig.health()
    # Installed and running: the old bundle, as before the request.
    assert (health_doc["rules_bundle"], health_doc["rules_installed"]) == (1, 1)
    assert health_doc["rules_busy"] is False
