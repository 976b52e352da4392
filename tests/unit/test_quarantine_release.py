"""``mailtower quarantine release``: re-inject a quarantined message to the relay."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from scand_fakes import SinkHandler, free_port, make_settings, start_sink

from mailtower.cli import main
from mailtower.scand.quarantine import QuarantineStore

RAW = b"From: a@example.org\r\nTo: b@example.com\r\nSubject: held\r\n\r\nbody line\r\n"


@pytest.fixture
def sink() -> Iterator[tuple[SinkHandler, int]]:
    controller, handler, port = start_sink()
    try:
        yield handler, port
    finally:
        controller.stop()


def _setup(tmp_path: Path, reinject_port: int) -> tuple[QuarantineStore, str, list[str]]:
    settings = make_settings(tmp_path / "spool", reinject_port=reinject_port)
    settings_path = tmp_path / "tower.json"
    settings_path.write_text(settings.model_dump_json())
    store = QuarantineStore(tmp_path / "spool" / "quarantine")
    qid = store.write(
        RAW,
        {
            "envelope": {
                "mail_from": "a@example.org",
                "rcpt_tos": ["b@example.com", "c@example.com"],
            },
            "verdict": "virus",
            "findings": [{"engine": "clamd", "name": "Bad.Thing"}],
        },
    )
    argv = ["--spool", str(tmp_path / "spool"), "--settings", str(settings_path)]
    return store, qid, argv


def test_release_delivers_with_envelope_and_headers(
    tmp_path: Path,
    sink: tuple[SinkHandler, int],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    handler, port = sink
    monkeypatch.setenv("SUDO_USER", "alice")
    store, qid, argv = _setup(tmp_path, port)
    assert main(["quarantine", "release", qid, *argv]) == 0
    out = capsys.readouterr().out
    assert qid in out and "queued as Q00001" in out and f"127.0.0.1:{port}" in out
    [got] = handler.received
    assert got.mail_from == "a@example.org"
    assert got.rcpt_tos == ["b@example.com", "c@example.com"]
    released, verdict, original = got.content.split(b"\r\n", 2)
    assert released.startswith(b"X-Mailtower-Released: ") and released.endswith(b"; by=alice")
    assert verdict == f"X-Mailtower-Verdict: released; was=virus; tower=tower-t; id={qid}".encode()
    assert original == RAW
    meta = store.get(qid).meta
    assert meta["released_at"] and meta["released_by"] == "alice"
    assert store.get(qid).message_path.read_bytes() == RAW  # files kept

    assert main(["quarantine", "list", "--spool", argv[1]]) == 0
    assert "[released " in capsys.readouterr().out

    # A second release is refused, unless forced.
    assert main(["quarantine", "release", qid, *argv]) == 1
    assert "already released" in capsys.readouterr().err
    assert len(handler.received) == 1
    assert main(["quarantine", "release", qid, "--force", *argv]) == 0
    assert len(handler.received) == 2


def test_release_unknown_id(
    tmp_path: Path, sink: tuple[SinkHandler, int], capsys: pytest.CaptureFixture[str]
) -> None:
    handler, port = sink
    _, _, argv = _setup(tmp_path, port)
    assert main(["quarantine", "release", "20260101T000000Z-000000000000", *argv]) == 1
    assert "no quarantined message" in capsys.readouterr().err
    assert main(["quarantine", "release", "../etc/passwd", *argv]) == 1
    assert "is not a quarantine id" in capsys.readouterr().err
    assert handler.received == []


def test_release_refused_by_relay_is_not_marked(
    tmp_path: Path, sink: tuple[SinkHandler, int], capsys: pytest.CaptureFixture[str]
) -> None:
    handler, port = sink
    handler.refuse = "452 4.3.1 Insufficient system storage"
    store, qid, argv = _setup(tmp_path, port)
    before = store.get(qid).meta
    assert main(["quarantine", "release", qid, *argv]) == 1
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err and "452" in err and "not marked released" in err
    assert store.get(qid).meta == before
    assert handler.received == []


def test_release_relay_unreachable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()  # nothing listens there
    store, qid, argv = _setup(tmp_path, port)
    assert main(["quarantine", "release", qid, *argv]) == 1
    assert f"127.0.0.1:{port}" in capsys.readouterr().err
    assert "released_at" not in store.get(qid).meta


def test_release_without_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store, qid, argv = _setup(tmp_path, free_port())
    argv[-1] = str(tmp_path / "missing.json")
    assert main(["quarantine", "release", qid, *argv]) == 1
    assert "not found" in capsys.readouterr().err
    assert json.loads((store.root / f"{qid}.json").read_text()).get("released_at") is None


def test_release_spool_defaults_to_settings(
    tmp_path: Path, sink: tuple[SinkHandler, int], capsys: pytest.CaptureFixture[str]
) -> None:
    handler, port = sink
    _, qid, argv = _setup(tmp_path, port)
    assert main(["quarantine", "release", qid, *argv[2:]]) == 0  # no --spool
    assert len(handler.received) == 1


def test_an_unprocessable_entry_lists_and_releases(
    tmp_path: Path, sink: tuple[SinkHandler, int], capsys: pytest.CaptureFixture[str]
) -> None:
    # What scand writes when it sets a message aside (scand.server.Scanner._failed), here for
    # a recipient whose local part is not ASCII: released with SMTPUTF8, as scand now sends it.
    handler, port = sink
    _, _, argv = _setup(tmp_path, port)
    store = QuarantineStore(tmp_path / "spool" / "quarantine")
    qid = store.write(
        RAW,
        {
            "envelope": {"mail_from": "a@example.org", "rcpt_tos": ["jörg@example.com"]},
            "verdict": "unprocessable",
            "findings": [],
            "reason": "re-injection refused: RCPT TO:<jörg@example.com> answered 550",
            "relay_queue_id": "4ABCDE12F3",
            "relay_arrival": "2026-12-06T12:00:05+00:00",
        },
    )
    assert main(["quarantine", "list", "--spool", argv[1]]) == 0
    [line] = [x for x in capsys.readouterr().out.splitlines() if qid in x]
    assert "unprocessable" in line
    assert main(["quarantine", "release", qid, *argv]) == 0
    [got] = [r for r in handler.received if r.rcpt_tos == ["jörg@example.com"]]
    assert b"X-Mailtower-Verdict: released; was=unprocessable;" in got.content
    assert store.get(qid).meta["released_at"]


class RefuseRecipients(SinkHandler):
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # type: ignore[no-untyped-def]
        return "550 5.1.1 Recipient address rejected"


def test_a_failed_release_prints_what_mail_put_there_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    handler = RefuseRecipients()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        store, _, argv = _setup(tmp_path, port)
        qid = store.write(
            RAW, {"envelope": {"mail_from": "a@example.org", "rcpt_tos": ["b\x1b[2J@example.com"]}}
        )
        assert main(["quarantine", "release", qid, *argv]) == 1
        err = capsys.readouterr().err
        assert "answered 5" in err and "b\\x1b[2J@example.com" in err and "\x1b" not in err
    finally:
        controller.stop()
