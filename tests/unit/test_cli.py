"""The ``mailtower`` operator command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mailtower import testdata
from mailtower.cli import main
from mailtower.quarantine import QuarantineStore


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
