"""The scanner bench's floor (tests/bench/floor_filter.py) and the figures it adds.

The floor is the evidence of what any filter of scand's design can reach on the bench machine,
so it must really do what scand does besides scanning: take the message with scand's SMTP
receiving, hand it to clamd when told, and re-inject it intact.
"""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from scand_fakes import FakeClamd, free_port, make_settings, start_sink, wait_until

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "bench"))

import scanner_vs_amavis as bench  # noqa: E402

MESSAGE = (
    b"From: a@example.org\r\nTo: b@customer.example.com\r\nSubject: floor\r\n\r\n"
    b"first line\r\n.a line that starts with a dot\r\n..two\r\nlast line\r\n"
)


def _start_floor(
    tmp_path: Path, sink_port: int, clamd: str | None
) -> tuple[subprocess.Popen[bytes], int]:
    settings = make_settings(tmp_path / "spool", reinject_port=sink_port)
    path = tmp_path / "tower.json"
    path.write_text(settings.model_dump_json())
    port = free_port()
    argv = [sys.executable, str(bench.FLOOR), str(path), str(port)]
    if clamd:
        argv += ["--clamd", clamd]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(argv, env=env, start_new_session=True)

    def answers() -> bool:
        try:
            smtplib.SMTP("127.0.0.1", port, timeout=2).quit()
        except OSError:
            return proc.poll() is not None  # stop waiting: it died
        return True

    wait_until(answers, 30, "the floor filter answers")
    assert proc.poll() is None, "the floor filter exited"
    return proc, port


@pytest.fixture
def sink() -> Iterator[tuple[object, int]]:
    controller, handler, port = start_sink()
    yield handler, port
    controller.stop()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(10)


def test_the_floor_reinjects_each_message_intact(tmp_path: Path, sink: tuple) -> None:
    handler, sink_port = sink
    proc, port = _start_floor(tmp_path, sink_port, None)
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            refused = client.sendmail("a@example.org", ["b@customer.example.com"], MESSAGE)
        assert refused == {}
        wait_until(lambda: len(handler.received) == 1, 10, "the message re-injected")
        got = handler.received[0]
        assert got.mail_from == "a@example.org"
        assert got.rcpt_tos == ["b@customer.example.com"]
        assert got.content.endswith(MESSAGE)  # after the floor's one header line
        assert got.content.startswith(b"X-Floor: not scanned\r\n")
    finally:
        _stop(proc)


def test_the_floor_with_clamd_asks_clamd_first(tmp_path: Path, sink: tuple) -> None:
    """With --clamd every message goes to clamd (one INSTREAM of the raw message) before it is
    re-injected; with no clamd there, nothing passes."""
    handler, sink_port = sink
    clamd = FakeClamd(tmp_path / "clamd.sock")
    proc, port = _start_floor(tmp_path, sink_port, clamd.path)
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail("a@example.org", ["b@customer.example.com"], MESSAGE)
        wait_until(lambda: len(handler.received) == 1, 10, "the message re-injected")
        assert clamd.streams == [MESSAGE]
    finally:
        _stop(proc)
        clamd.close()
    proc, port = _start_floor(tmp_path, sink_port, str(tmp_path / "no-clamd.sock"))
    try:
        with (
            smtplib.SMTP("127.0.0.1", port, timeout=10) as client,
            pytest.raises(smtplib.SMTPDataError),
        ):
            client.sendmail("a@example.org", ["b@customer.example.com"], MESSAGE)
        time.sleep(0.3)
        assert len(handler.received) == 1
    finally:
        _stop(proc)


def _row(rate: float, cpu_all: float, p99: float) -> dict[str, object]:
    return {
        "messages_per_s": rate,
        "added_latency_ms": {"p99": p99},
        "cpu_ms_per_message": {"all": cpu_all},
        "errors": 0,
        "lost": 0,
        "leaked": 0,
        "false_positives": 0,
        "rss_peak_mib": 150.0,
    }


def test_goals_print_the_floor_and_the_cpu_budget_of_the_throughput_goal() -> None:
    report = {
        "amavisd-new": _row(100.0, 18.0, 150.0),
        "mailtower-scand": _row(120.0, 15.0, 240.0),
        "floor: hop": _row(500.0, 3.0, 30.0),
        "floor: hop+clamd": _row(210.0, 9.0, 135.0),
        "rounds_detail": [
            {
                "amavisd-new": {"messages_per_s": 100.0, "added_p99_ms": 150.0},
                "mailtower-scand": {"messages_per_s": 120.0, "added_p99_ms": 240.0},
                "floor: hop": {"messages_per_s": 500.0, "added_p99_ms": 30.0},
                "floor: hop+clamd": {"messages_per_s": 210.0, "added_p99_ms": 135.0},
            }
        ],
    }
    goals = bench.goals(report)
    cpus = os.cpu_count() or 1
    # The machine's CPU time per message at twice amavisd-new's 100 messages/s.
    assert goals["cpu_ms_per_message_budget_at_2x"] == round(cpus * 1000 / 200, 2)
    assert goals["cpu_ms_per_message_all"]["floor: hop+clamd"] == 9.0
    assert goals["floor: hop+clamd"] == {
        "throughput_ratio_median_of_rounds": 2.1,
        "p99_added_latency_ratio_median_of_rounds": 0.9,
    }
    assert goals["throughput_ratio_median_of_rounds"] == 1.2
    assert goals["throughput_goal_met"] is False
    del report["floor: hop"], report["floor: hop+clamd"]
    assert "cpu_ms_per_message_budget_at_2x" not in bench.goals(report)
