"""``mailtower scan``: the CLI contract other tools depend on (exit codes, JSON lines, paths)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from archive_builders import zip_of
from pipeline_fixtures import EICAR, ORDINARY, with_attachment

from mailtower.cli import main
from mailtower.controller import inventory

CLEAN = ORDINARY["pdf-png-docx"]()
INFECTED = with_attachment(EICAR, "eicar.txt", "text/plain")
SECRETS = {k: "x" * 20 for k in ("sql_relay", "sql_scanner", "sql_monitor", "sql_replication")}


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["scan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def json_lines(out: str) -> dict[str, dict]:
    return {rec["path"]: rec for rec in map(json.loads, out.splitlines())}


def test_clean_file_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "a.eml", CLEAN)
    code, out, _ = run(capsys, str(path))
    assert code == 0
    assert out == f"{path}: clean\n"


def test_any_infected_message_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clean = write(tmp_path / "a.eml", CLEAN)
    bad = write(tmp_path / "b.eml", INFECTED)
    code, out, _ = run(capsys, str(clean), str(bad))
    assert code == 1
    lines = out.splitlines()
    assert lines[0] == f"{clean}: clean"
    assert lines[1].startswith(f"{bad}: virus (")
    assert "yara:Mailtower_EICAR_Test_File@2" in lines[1]


def test_json_lines_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clean = write(tmp_path / "a.eml", CLEAN)
    bad = write(tmp_path / "b.eml", INFECTED)
    code, out, _ = run(capsys, "--json", str(clean), str(bad))
    assert code == 1
    records = json_lines(out)
    assert len(out.splitlines()) == 2
    assert records[str(clean)] == {"path": str(clean), "verdict": "clean", "findings": []}
    infected = records[str(bad)]
    assert set(infected) == {"path", "verdict", "findings"}
    assert infected["verdict"] == "virus"
    assert {"engine": "yara", "name": "Mailtower_EICAR_Test_File", "part": "2"} in (
        infected["findings"]
    )
    assert all(set(f) == {"engine", "name", "part"} for f in infected["findings"])


def test_directory_is_scanned_recursively(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path / "top.eml", CLEAN)
    write(tmp_path / "a" / "b" / "c" / "deep", INFECTED)  # any regular file, any name
    write(tmp_path / "a" / "other.msg", CLEAN)
    code, out, _ = run(capsys, "--json", str(tmp_path))
    assert code == 1
    verdicts = {
        Path(p).relative_to(tmp_path).as_posix(): r["verdict"] for p, r in json_lines(out).items()
    }
    assert verdicts == {"top.eml": "clean", "a/other.msg": "clean", "a/b/c/deep": "virus"}


def test_maildir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    maildir = tmp_path / "Maildir"
    write(maildir / "cur" / "1700000000.M1P1.host:2,S", CLEAN)
    write(maildir / "new" / "1700000001.M2P2.host", INFECTED)
    write(maildir / ".Archive" / "cur" / "1600000000.M3P3.host:2,S", CLEAN)
    (maildir / ".Archive" / "new").mkdir()
    # Not messages: deliveries in progress and the mail server's own files.
    write(maildir / "tmp" / "1700000002.M4P4.host", INFECTED)
    write(maildir / "dovecot-uidlist", b"3 V1700000000 N4\n")
    write(maildir / ".Archive" / "maildirfolder", b"")
    code, out, _ = run(capsys, "--json", str(maildir))
    assert code == 1
    verdicts = {
        Path(p).relative_to(maildir).as_posix(): r["verdict"] for p, r in json_lines(out).items()
    }
    assert verdicts == {
        "cur/1700000000.M1P1.host:2,S": "clean",
        "new/1700000001.M2P2.host": "virus",
        ".Archive/cur/1600000000.M3P3.host:2,S": "clean",
    }


def test_ban_ext(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "z.eml", with_attachment(zip_of({"a.txt": b"hi"}), "files.zip"))
    assert run(capsys, str(path))[0] == 0
    code, out, _ = run(capsys, "--json", "--ban-ext", "7z,.ZIP", str(path))
    assert code == 1
    record = json_lines(out)[str(path)]
    assert record["verdict"] == "banned"
    assert {"engine": "policy", "name": "policy.banned-extension.zip", "part": "2"} in (
        record["findings"]
    )


def test_yara_rules_are_added(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "local.yar").write_text(
        'rule Local_Invoice_Subject { meta: severity = "virus" '
        'strings: $a = "Subject: Invoice and report" condition: $a }\n'
    )
    path = write(tmp_path / "m.eml", CLEAN)
    code, out, _ = run(capsys, "--json", "--yara-rules", str(rules), str(path))
    assert code == 1
    record = json_lines(out)[str(path)]
    assert record["verdict"] == "virus"
    assert {"engine": "yara", "name": "Local_Invoice_Subject", "part": "message"} in record[
        "findings"
    ]
    # The project's own rules still run next to the added ones.
    bad = write(tmp_path / "b.eml", INFECTED)
    code, out, _ = run(capsys, "--json", "--yara-rules", str(rules), str(bad))
    assert json_lines(out)[str(bad)]["verdict"] == "virus"


def test_unreachable_clamd_is_tempfail(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "a.eml", CLEAN)
    code, out, _ = run(capsys, "--json", "--clamd", str(tmp_path / "no-clamd.sock"), str(path))
    assert code == 1
    assert json_lines(out)[str(path)]["verdict"] == "tempfail"


def test_config_provides_limits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = inventory.tower_settings(
        {"name": "t1", "hostname": "mx.t1.example", "secrets": SECRETS},
        {
            "relay": ["192.0.2.10"],
            "monitor": ["192.0.2.11"],
            "sql": ["192.0.2.12", "192.0.2.13"],
            "scanners": ["192.0.2.101"],
        },
    )
    config = tmp_path / "tower.json"
    config.write_text(settings.model_dump_json())
    path = write(tmp_path / "mail" / "a.eml", CLEAN)
    assert run(capsys, "--config", str(config), str(path))[0] == 0


# -- usage and configuration errors: exit 2 with a message naming the problem ---------------------


def test_missing_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "a.eml", CLEAN)
    code, out, err = run(capsys, str(tmp_path / "a.eml"), str(tmp_path / "nope.eml"))
    assert code == 2
    assert out == ""  # nothing scanned: the command line is wrong
    assert f"no such file or directory: {tmp_path / 'nope.eml'}" in err


@pytest.mark.parametrize("content", ["{not json", '{"name": "t1"}'])
def test_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str) -> None:
    config = write(tmp_path / "tower.json", content.encode())
    path = write(tmp_path / "a.eml", CLEAN)
    code, _, err = run(capsys, "--config", str(config), str(path))
    assert code == 2
    assert str(config) in err and "invalid tower settings" in err


def test_missing_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "a.eml", CLEAN)
    code, _, err = run(capsys, "--config", str(tmp_path / "none.json"), str(path))
    assert code == 2
    assert f"{tmp_path / 'none.json'}: not found" in err


def test_yara_rule_that_does_not_compile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = tmp_path / "rules"
    bad = write(rules / "broken.yar", b"rule Broken { condition: }\n")
    path = write(tmp_path / "a.eml", CLEAN)
    code, out, err = run(capsys, "--yara-rules", str(rules), str(path))
    assert code == 2
    assert out == ""
    assert str(bad) in err


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_yara_rules_dir_without_rules(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    rules = tmp_path / "rules"
    if kind == "empty":
        rules.mkdir()
    path = write(tmp_path / "a.eml", CLEAN)
    code, _, err = run(capsys, "--yara-rules", str(rules), str(path))
    assert code == 2
    assert str(rules) in err


def test_bad_clamd_address(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "a.eml", CLEAN)
    code, _, err = run(capsys, "--clamd", "localhost", str(path))
    assert code == 2
    assert "clamd address 'localhost'" in err


@pytest.mark.parametrize("argv", [[], ["--ban-ext", "exe,,scr", "x.eml"], ["--bogus", "x.eml"]])
def test_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["scan", *argv])
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_names_mail_put_there_are_printed_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An archive member's name is the sender's; it reaches the output as a finding's part.
    hostile = "evil\x1b]0;owned\x07\x9b.exe"
    path = write(
        tmp_path / "m.eml",
        with_attachment(zip_of({hostile: b"MZ" + b"\0" * 200}), "a.zip", "application/zip"),
    )
    code, out, _ = run(capsys, str(path))
    assert code == 1 and "evil\\x1b]0;owned\\x07\\x9b.exe" in out, out
    assert not any(c in out for c in "\x1b\x07\x9b")
    code, out, _ = run(capsys, "--json", str(path))
    assert not any(c in out for c in "\x1b\x07\x9b")
    parts = [f["part"] for f in json.loads(out)["findings"]]
    assert any(hostile in part for part in parts)  # the same value, escaped only in the text
