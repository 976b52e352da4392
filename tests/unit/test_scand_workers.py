"""scand as a supervisor and worker processes (the real daemon, ``python -m mailtower.scand``):
a dead worker is replaced, a killed supervisor leaves no worker behind, SIGTERM lets the
messages in flight finish, /health and /metrics answer for every worker."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from scand_fakes import SinkHandler, make_settings, scand_argv, start_sink, wait_until

from mailtower.settings import TowerSettings

WORKERS = 2


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    settings: TowerSettings
    sink: SinkHandler
    log_path: Path
    controller: Controller

    def get(self, path: str) -> tuple[int | None, bytes]:
        url = f"http://127.0.0.1:{self.settings.ports.scanner_http}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError:
            return None, b""

    def health(self) -> dict[str, object] | None:
        status, body = self.get("/health")
        return json.loads(body) if status is not None else None

    def ready_workers(self) -> list[int]:
        doc = self.health()
        if doc is None:
            return []
        workers = doc["workers"]
        assert isinstance(workers, dict)
        return [p["pid"] for p in workers["processes"] if p["ready"]]

    def metric(self, name: str) -> float | None:
        _status, body = self.get("/metrics")
        for line in body.decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return None

    def send(self, subject: str) -> tuple[int, bytes]:
        raw = f"Subject: {subject}\r\nMessage-ID: <{subject}@test>\r\n\r\nhello\r\n".encode()
        with smtplib.SMTP("127.0.0.1", self.settings.ports.filter, timeout=30) as smtp:
            smtp.ehlo("relay.test")
            smtp.mail("sender@example.org")
            smtp.rcpt("to@example.com")
            return smtp.data(raw)

    def log(self) -> str:
        return self.log_path.read_text()


def _start(tmp_path: Path, workers: int = WORKERS) -> Daemon:
    """scand with ``workers`` workers; only the in-process engines (YARA, reputation, Skeptic)."""
    controller, sink, sink_port = start_sink()
    settings = make_settings(tmp_path / "spool", reinject_port=sink_port)
    settings = settings.model_copy(update={"engines": []})
    settings_path = tmp_path / "tower.json"
    settings_path.write_text(settings.model_dump_json())
    log_path = tmp_path / "scand.log"
    argv = scand_argv([sys.executable, "-m", "mailtower.scand"], settings_path)
    with log_path.open("ab") as log:
        proc = subprocess.Popen([*argv, "--workers", str(workers)], stdout=log, stderr=log)
    d = Daemon(proc, settings, sink, log_path, controller)
    if workers > 1:
        wait_until(lambda: len(d.ready_workers()) == workers, 60, f"workers ready ({log_path})")
    else:
        wait_until(lambda: d.health() is not None, 60, f"/health ({log_path})")
    return d


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = _start(tmp_path)
    try:
        yield d
    finally:
        if d.sink.gate is not None:
            d.sink.gate.set()
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(10)
        d.controller.stop()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_health_and_metrics_cover_every_worker(daemon: Daemon) -> None:
    pids = daemon.ready_workers()
    assert len(set(pids)) == WORKERS and daemon.proc.pid not in pids
    for n in range(6):
        code, _ = daemon.send(f"m{n}")
        assert code == 250
    assert daemon.metric('mailtower_messages_total{verdict="clean"}') == 6
    assert daemon.metric("mailtower_scand_workers_ready") == WORKERS
    assert daemon.metric("mailtower_in_flight") == 0


def test_a_dead_worker_is_replaced_and_its_counts_kept(daemon: Daemon) -> None:
    for n in range(4):
        daemon.send(f"before{n}")
    victim, survivor = daemon.ready_workers()
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: len(daemon.ready_workers()) == WORKERS and victim not in daemon.ready_workers(),
        60,
        "a new worker in the dead one's place",
    )
    assert survivor in daemon.ready_workers()
    assert "event=worker_died" in daemon.log()
    assert daemon.metric("mailtower_scand_worker_restarts_total") == 1
    daemon.send("after")
    # The dead worker's messages still count (prometheus multiprocess files outlive it).
    assert daemon.metric('mailtower_messages_total{verdict="clean"}') == 5


def test_kill_9_of_the_supervisor_leaves_no_worker(daemon: Daemon, tmp_path: Path) -> None:
    pids = daemon.ready_workers()
    supervisor = daemon.proc.pid
    stale = list(Path(tempfile.gettempdir()).glob(f"mailtower-scand-metrics-{supervisor}-*"))
    assert len(stale) == 1  # its metrics directory, named by its pid
    daemon.proc.kill()
    daemon.proc.wait(10)
    wait_until(lambda: not any(_alive(p) for p in pids), 10, "the workers to die with scand")
    assert stale[0].exists()  # SIGKILL: no clean-up ...
    (tmp_path / "again").mkdir()
    again = _start(tmp_path / "again")
    try:
        assert not stale[0].exists()  # ... until the next supervisor starts
    finally:
        again.proc.send_signal(signal.SIGTERM)
        assert again.proc.wait(30) == 0
        again.controller.stop()


def test_sigterm_finishes_messages_in_flight(daemon: Daemon) -> None:
    """A message held at re-injection when SIGTERM comes still gets its 250; scand exits 0."""
    daemon.sink.gate = threading.Event()
    replies: list[tuple[int, bytes]] = []
    sender = threading.Thread(target=lambda: replies.append(daemon.send("inflight")))
    sender.start()
    wait_until(lambda: daemon.sink.holding == 1, 30, "the message held at re-injection")
    daemon.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: (daemon.health() or {}).get("status") == "draining", 10, "/health: draining")
    assert daemon.proc.poll() is None  # still waiting for the message in flight
    daemon.sink.gate.set()
    sender.join(30)
    assert replies and replies[0][0] == 250, replies
    assert daemon.proc.wait(30) == 0
    assert [r.content.count(b"Subject: inflight") for r in daemon.sink.received] == [1]


def test_one_worker_is_a_single_process(tmp_path: Path) -> None:
    d = _start(tmp_path, workers=1)
    try:
        children = subprocess.run(
            ["pgrep", "-P", str(d.proc.pid)], capture_output=True, text=True
        ).stdout.split()
        assert children == []
        assert d.send("single")[0] == 250
        assert (d.health() or {}).get("status") == "ok"
        assert d.metric('mailtower_messages_total{verdict="clean"}') == 1
        assert d.metric("mailtower_events_spooled") == 1
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(30) == 0
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(10)
        d.controller.stop()
