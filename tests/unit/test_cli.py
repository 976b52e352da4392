"""The ``mailtower`` operator command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mailtower._text import json_line, shown
from mailtower.cli import main
from mailtower.scand.quarantine import QuarantineStore
from mailtower.scanning import testdata


def test_quarantine_list_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = QuarantineStore(tmp_path / "quarantine")
    qid = store.write(
        b"raw",
        {
            "envelope": {"mail_from": "a@example.org", "rcpt_tos": []},
            "findings": [{"engine": "clamd", "name": "Bad.Thing"}],
        },
    )
    assert main(["quarantine", "list", "--spool", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert qid in out and "Bad.Thing" in out and "<a@example.org>" in out
    assert main(["quarantine", "list", "--json", "--spool", str(tmp_path)]) == 0
    assert [e["id"] for e in json.loads(capsys.readouterr().out)] == [qid]
    assert main(["quarantine", "show", qid, "--spool", str(tmp_path)]) == 0
    assert f"{qid}.eml" in capsys.readouterr().out


def test_quarantine_show_unknown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["quarantine", "show", "20260101T000000Z-000000000000", "--spool", str(tmp_path)]) == 1
    )
    assert "no quarantined message" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["quarantine"], ["signatures"], ["bogus"]])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_signatures(tmp_path: Path) -> None:
    assert main(["signatures", "--out", str(tmp_path / "mirror")]) == 0
    written = {p.name: p.read_text() for p in (tmp_path / "mirror").iterdir()}
    assert written == testdata.clamav_signatures()


# -- what mail put into the quarantine is printed escaped (issue 15, low finding) ---------------

HOSTILE_SENDER = "evil\x1b]0;owned\x07\x1b[2J\x7f\x9b31m\u202eexe.txt\udcff\\x1b@example.org"
RAW_CONTROLS = ("\x1b", "\x07", "\x7f", "\x9b", "\u202e", "\udcff")


def _hostile_entry(tmp_path: Path) -> str:
    store = QuarantineStore(tmp_path / "quarantine")
    return store.write(
        b"raw",
        {
            "envelope": {"mail_from": HOSTILE_SENDER, "rcpt_tos": ["b\x1b[31m@example.com"]},
            "verdict": "unprocessable",
            "findings": [{"engine": "container", "name": "limit\x1b[1m", "part": "x"}],
        },
    )


def test_quarantine_list_escapes_control_characters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    qid = _hostile_entry(tmp_path)
    assert main(["quarantine", "list", "--spool", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert qid in out and "unprocessable" in out
    assert not any(c in out for c in RAW_CONTROLS), repr(out)
    assert (
        "<evil\\x1b]0;owned\\x07\\x1b[2J\\x7f\\x9b31m\\u202eexe.txt\\xff\\\\x1b@example.org>" in out
    )
    assert "limit\\x1b[1m" in out


def test_quarantine_list_of_bytes_that_were_not_utf8_does_not_crash(tmp_path: Path) -> None:
    # capsys never encodes; a real stdout (UTF-8, strict) raised UnicodeEncodeError on the
    # lone surrogate aiosmtpd makes of a byte that was not UTF-8.
    qid = _hostile_entry(tmp_path)
    for argv in (["list"], ["list", "--json"], ["show", qid]):
        done = subprocess.run(
            [sys.executable, "-m", "mailtower.cli", "quarantine", *argv, "--spool", str(tmp_path)],
            capture_output=True,
            env={**os.environ, "PYTHONIOENCODING": "utf-8"},
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode()
        assert not any(c.encode("utf-8", "surrogateescape") in done.stdout for c in RAW_CONTROLS)


def test_shown_and_json_line() -> None:
    assert shown("a\tb\\c\u00e9\U0001f600") == "a\\x09b\\\\cé\U0001f600"
    assert shown("\u2028\U000e0001") == "\\u2028\\U000e0001"
    value = {"s": "x\x1b\x7f\x9b\u202e\udcff\U000e0001é"}
    line = json_line(value)
    assert line.isprintable() and json.loads(line) == value


def test_quarantine_delete(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    qid = _hostile_entry(tmp_path)
    assert main(["quarantine", "delete", qid, "--spool", str(tmp_path)]) == 0
    assert "deleted (unprocessable" in capsys.readouterr().out
    assert list((tmp_path / "quarantine").iterdir()) == []
    assert main(["quarantine", "delete", qid, "--spool", str(tmp_path)]) == 1
    assert "no quarantined message" in capsys.readouterr().err
