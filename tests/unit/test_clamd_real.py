"""scand against a real clamd (Debian's clamav-daemon) with the project's test signatures."""

from __future__ import annotations

import json
import os
import queue
import signal
import smtplib
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
from scand_fakes import RealClamd, make_settings, scand_argv, start_sink, wait_until

from mailtower.scand.quarantine import QuarantineStore
from mailtower.scanning import testdata
from mailtower.scanning.engines.clamd import ClamdClient, ClamdEngine
from mailtower.scanning.errors import EngineError, EngineScanError, EngineUnavailable
from mailtower.scanning.scan import Kind, scan_message

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealClamd]:
    daemon = RealClamd(tmp_path_factory.mktemp("clamd")).start()
    yield daemon
    daemon.stop()


def _mail(
    subject: str,
    attachment: bytes | None = None,
    text: str = "hello\n",
    filename: str = "file.com",
) -> bytes:
    msg = EmailMessage()
    msg["From"] = "sender@example.org"
    msg["To"] = "to@example.com"
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{subject}@example.org>"
    msg.set_content(text)
    if attachment is not None:
        msg.add_attachment(
            attachment, maintype="application", subtype="octet-stream", filename=filename
        )  # base64 transfer encoding
    return msg.as_bytes().replace(b"\n", b"\r\n")


def test_eicar_in_base64_attachment_is_found(clamd: RealClamd) -> None:
    raw = _mail("eicar", attachment=testdata.eicar())
    assert testdata.eicar() not in raw  # only the MIME decoder can see it
    verdict = scan_message(raw, [ClamdEngine(str(clamd.socket), timeout_s=10)])
    assert verdict.kind is Kind.VIRUS
    assert verdict.findings[0].engine == "clamd"
    assert verdict.findings[0].name.startswith("Mailtower.Test.EICAR")


def test_plain_mail_is_clean(clamd: RealClamd) -> None:
    verdict = scan_message(_mail("plain"), [ClamdEngine(str(clamd.socket), timeout_s=10)])
    assert verdict.kind is Kind.CLEAN


def test_marker_is_found(clamd: RealClamd) -> None:
    raw = _mail("marker", text=f"see {testdata.marker().decode()} here\n")
    verdict = scan_message(raw, [ClamdEngine(str(clamd.socket), timeout_s=10)])
    assert verdict.kind is Kind.VIRUS
    assert verdict.findings[0].name.startswith("Mailtower.Test.Marker")


def test_health_reports_version(clamd: RealClamd) -> None:
    assert ClamdEngine(str(clamd.socket)).health(1.0).startswith("ClamAV ")


def test_stream_max_length_is_an_error_not_clean(tmp_path: Path) -> None:
    small = RealClamd(tmp_path, stream_max_length="1K").start()
    try:
        # clamd answers "size limit exceeded" and closes; if it closes before the reply is
        # read, the connection is reset instead. Either is an error, never clean.
        with pytest.raises((EngineScanError, EngineUnavailable), match="size limit|StreamMax"):
            ClamdClient(str(small.socket), timeout_s=10).instream(b"a" * 200_000)
        verdict = scan_message(b"a" * 200_000, [ClamdEngine(str(small.socket), timeout_s=10)])
        assert verdict.kind is Kind.TEMPFAIL
    finally:
        small.stop()


def test_killed_clamd_is_unavailable(tmp_path: Path) -> None:
    doomed = RealClamd(tmp_path).start()
    engine = ClamdEngine(str(doomed.socket), timeout_s=5)
    assert engine.scan(b"hello") == []
    doomed.stop()
    with pytest.raises(EngineUnavailable):
        engine.scan(b"hello")
    with pytest.raises(EngineError):
        engine.health(1.0)


# -- the daemon as a process: kill -9 mid-stream loses nothing ----------------------------------


class Daemon:
    """``python -m mailtower.scand`` as a child process."""

    def __init__(self, settings_path: Path, log_path: Path, http_port: int):
        self.settings_path = settings_path
        self.log_path = log_path
        self.http_port = http_port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                scand_argv([sys.executable, "-m", "mailtower.scand"], self.settings_path),
                stdout=log,
                stderr=log,
            )
        wait_until(self.healthy, 30, f"scand /health (log: {self.log_path})")

    def healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"scand exited {self.proc.returncode}:\n{self.log()}")
        try:
            url = f"http://127.0.0.1:{self.http_port}/health"
            with urllib.request.urlopen(url, timeout=2) as r:
                return bool(r.status == 200 and json.loads(r.read())["clamd"])
        except (OSError, urllib.error.URLError):
            return False

    def log(self) -> str:
        return self.log_path.read_text()


def test_kill_9_mid_stream_loses_nothing(clamd: RealClamd, tmp_path: Path) -> None:
    controller, sink, sink_port = start_sink()
    settings = make_settings(
        tmp_path / "spool",
        reinject_port=sink_port,
        clamd_socket=str(clamd.socket),
        engine_timeout_s=10,
    )
    settings_path = tmp_path / "tower.json"
    settings_path.write_text(settings.model_dump_json())
    daemon = Daemon(settings_path, tmp_path / "scand.log", settings.ports.scanner_http)
    daemon.start()

    messages: dict[str, bytes] = {}
    infected: set[str] = set()
    for n in range(50):
        subject = f"msg{n:02d}"
        if n % 5 == 0:
            infected.add(subject)
            messages[subject] = _mail(subject, attachment=testdata.eicar())
        else:
            # Not "file.com": scand's policy bans that name, and these must pass.
            messages[subject] = _mail(subject, attachment=os.urandom(20_000), filename="file.bin")

    def send(raw: bytes) -> int:
        try:
            with smtplib.SMTP("127.0.0.1", settings.ports.filter, timeout=30) as smtp:
                smtp.ehlo("relay.test")
                smtp.mail("sender@example.org")
                smtp.rcpt("to@example.com")
                return smtp.data(raw)[0]
        except (OSError, smtplib.SMTPException):
            return -1

    acked: set[str] = set()
    lock = threading.Lock()
    todo: queue.Queue[str] = queue.Queue()
    for subject in messages:
        todo.put(subject)

    def worker() -> None:
        while True:
            try:
                subject = todo.get_nowait()
            except queue.Empty:
                return
            if send(messages[subject]) == 250:
                with lock:
                    acked.add(subject)

    try:
        workers = [threading.Thread(target=worker) for _ in range(4)]
        for w in workers:
            w.start()
        wait_until(lambda: len(acked) >= 15, 60, "15 messages to be answered 250")
        assert daemon.proc is not None
        daemon.proc.kill()  # SIGKILL, mid-stream: other messages are in flight
        daemon.proc.wait(10)
        for w in workers:
            w.join(60)
        acked_before_kill = set(acked)
        unanswered = [s for s in messages if s not in acked]
        assert unanswered, "the kill came too late to test anything"

        daemon.start()
        for subject in unanswered:
            assert send(messages[subject]) == 250, subject

        # Every message is in exactly one place (a duplicate is tolerated and counted).
        delivered: dict[str, int] = {}
        for got in sink.received:
            subject = got.content.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
            assert got.content.startswith(b"X-Mailtower-Verdict: clean; tower=tower-t;")
            delivered[subject] = delivered.get(subject, 0) + 1
        quarantined: dict[str, int] = {}
        for entry in QuarantineStore(tmp_path / "spool" / "quarantine").list():
            subject = entry.meta["message_id"].strip("<>").split("@")[0]
            assert entry.meta["findings"][0]["name"].startswith("Mailtower.Test.EICAR")
            quarantined[subject] = quarantined.get(subject, 0) + 1
        duplicates = 0
        for subject in messages:
            places = delivered.get(subject, 0) + quarantined.get(subject, 0)
            assert places >= 1, f"{subject} was lost"
            duplicates += places - 1
            if subject in infected:
                assert subject not in delivered, f"{subject} (infected) was delivered"
            else:
                assert subject not in quarantined, f"{subject} (clean) was quarantined"
        assert acked_before_kill <= set(delivered) | set(quarantined)
        # Each duplicate needs a message that was processed but not acknowledged: bounded.
        assert duplicates <= 4, f"{duplicates} duplicates"
        print(f"kill -9 test: {len(unanswered)} resent, {duplicates} duplicate(s)")

        # SIGHUP reloads, SIGTERM stops cleanly.
        proc = daemon.proc
        assert proc is not None
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "event=reloaded" in daemon.log(), 10, "the reload log line")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
        controller.stop()


def test_sigterm_finishes_the_message_in_flight(clamd: RealClamd, tmp_path: Path) -> None:
    controller, sink, sink_port = start_sink()
    sink.gate = threading.Event()  # the relay holds the re-injection until told
    settings = make_settings(
        tmp_path / "spool", reinject_port=sink_port, clamd_socket=str(clamd.socket)
    )
    settings_path = tmp_path / "tower.json"
    settings_path.write_text(settings.model_dump_json())
    daemon = Daemon(settings_path, tmp_path / "scand.log", settings.ports.scanner_http)
    daemon.start()
    replies: list[int] = []

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", settings.ports.filter, timeout=30) as smtp:
            smtp.ehlo("relay.test")
            smtp.mail("sender@example.org")
            smtp.rcpt("to@example.com")
            replies.append(smtp.data(_mail("in-flight"))[0])

    sender = threading.Thread(target=send)
    try:
        sender.start()
        wait_until(lambda: sink.holding == 1, 10, "the re-injection to reach the relay")
        proc = daemon.proc
        assert proc is not None
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "event=stopping in_flight=1" in daemon.log(), 10, "draining")
        assert proc.poll() is None  # still finishing the message
        sink.gate.set()
        sender.join(30)
        assert replies == [250]
        assert len(sink.received) == 1
        assert proc.wait(30) == 0
        assert "event=stopped" in daemon.log()
    finally:
        sink.gate.set()
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
        controller.stop()


def test_pooled_sessions_give_each_message_its_own_answer(clamd: RealClamd) -> None:
    engine = ClamdEngine(str(clamd.socket), timeout_s=10, pool_size=2)
    infected = _mail("pooled-eicar", attachment=testdata.eicar())
    clean = _mail("pooled-clean")
    for _ in range(3):
        assert engine.scan(clean) == []
        assert [f.name for f in engine.scan(infected)] == ["Mailtower.Test.EICAR.UNOFFICIAL"]
    assert len(engine.pool._idle) == 1  # one session served all six scans
