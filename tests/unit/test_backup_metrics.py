"""The repository host's backup metrics (mailtower.backup_metrics): read from real
``pgbackrest info --output=json`` output (tests/unit/data/pgbackrest-info.json, captured by
test_backup_pgbackrest.py with CAPTURE_INFO=…, which checks the same on a live repository),
written as a node-exporter textfile promtool accepts."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from needs import missing

from mailtower import backup_metrics

CAPTURED = Path(__file__).parent / "data" / "pgbackrest-info.json"


def captured() -> list[dict]:
    return json.loads(CAPTURED.read_text())


def test_parse_reads_the_captured_info() -> None:
    (s,) = backup_metrics.parse(CAPTURED.read_text())
    entry = captured()[0]
    stop = entry["backup"][0]["timestamp"]["stop"]
    assert (s.name, s.status_code, s.status_message) == ("lab-x", 0, "ok")
    assert s.last_full == s.last_backup == stop
    assert s.counts == {"full": 1, "diff": 0, "incr": 0}
    wal = entry["archive"][0]["max"]
    assert s.archive_segment == f"lab-x/15-1/{wal[:16]}/{wal}-*"


def test_a_diff_is_the_newest_backup_not_the_newest_full_and_errors_do_not_count() -> None:
    entry = captured()[0]
    full = entry["backup"][0]
    diff = copy.deepcopy(full) | {"type": "diff", "label": full["label"] + "_x"}
    diff["timestamp"] = {
        "start": full["timestamp"]["stop"] + 10,
        "stop": full["timestamp"]["stop"] + 20,
    }
    broken = copy.deepcopy(full) | {"error": True}
    broken["timestamp"] = {
        "start": diff["timestamp"]["stop"] + 5,
        "stop": diff["timestamp"]["stop"] + 9,
    }
    entry["backup"] = [full, diff, broken]
    (s,) = backup_metrics.parse(json.dumps([entry]))
    assert s.last_full == full["timestamp"]["stop"]
    assert s.last_backup == diff["timestamp"]["stop"]
    assert s.counts == {"full": 1, "diff": 1, "incr": 0}


def test_a_stanza_without_backups_or_archive_reads_as_never() -> None:
    entry = {
        "name": "goc",
        "status": {"code": 2, "message": "no valid backups"},
        "backup": [],
        "archive": [],
    }
    (s,) = backup_metrics.parse(json.dumps([entry]))
    assert (s.status_code, s.last_full, s.last_backup, s.archive_segment) == (2, 0, 0, None)
    text = backup_metrics.render([s], 1000.0, {})
    assert 'mailtower_backup_last_full_timestamp_seconds{stanza="goc"} 0\n' in text
    assert 'mailtower_backup_archive_last_push_timestamp_seconds{stanza="goc"} 0\n' in text


@pytest.mark.parametrize("text", ["not json", "{}", '[{"status": {}}]'])
def test_what_is_not_pgbackrest_info_is_refused(text: str) -> None:
    with pytest.raises((ValueError, KeyError)):
        backup_metrics.parse(text)


def test_archived_times_finds_the_newest_segment_in_the_repository(tmp_path: Path) -> None:
    (s,) = backup_metrics.parse(CAPTURED.read_text())
    wal = captured()[0]["archive"][0]["max"]
    directory = tmp_path / "archive" / "lab-x" / "15-1" / wal[:16]
    directory.mkdir(parents=True)
    segment = directory / f"{wal}-0123abcd.zst"
    segment.write_bytes(b"x")
    os.utime(segment, (1_700_000_000, 1_700_000_000))
    older = directory / "000000010000000000000001-aa.zst"
    older.write_bytes(b"x")
    assert backup_metrics.archived_times([s], str(tmp_path)) == {"lab-x": 1_700_000_000}
    assert backup_metrics.archived_times([s], str(tmp_path / "elsewhere")) == {"lab-x": 0.0}


def _promtool_accepts(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        missing("promtool (package prometheus)")
    assert promtool
    proc = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_main_writes_the_textfile_from_pgbackrest_and_up_0_when_it_fails(tmp_path: Path) -> None:
    fake = tmp_path / "pgbackrest"
    fake.write_text(f"#!/bin/sh\ncat {CAPTURED}\n")
    fake.chmod(0o755)
    out = tmp_path / "backup.prom"
    args = ["--repo-path", str(tmp_path), "--output", str(out), "--pgbackrest", str(fake)]
    assert backup_metrics.main(args) == 0
    text = out.read_text()
    assert "mailtower_backup_info_up 1\n" in text
    assert 'mailtower_backup_status_code{stanza="lab-x"} 0\n' in text
    assert 'mailtower_backup_sets{stanza="lab-x",type="full"} 1\n' in text
    _promtool_accepts(text)

    fake.write_text("#!/bin/sh\necho 'ERROR: [056]: unable to find primary cluster' >&2\nexit 56\n")
    assert backup_metrics.main(args) == 0
    text = out.read_text()
    assert "mailtower_backup_info_up 0\n" in text and "stanza=" not in text
    _promtool_accepts(text)
    assert not Path(f"{out}.tmp").exists()


def test_the_module_runs_as_a_script_with_the_standard_library_alone(tmp_path: Path) -> None:
    # The deploy uploads the file itself (roles/backup.py): it must import no mailtower module.
    script = tmp_path / "backup-metrics"
    shutil.copy(backup_metrics.__file__, script)
    proc = subprocess.run(
        [
            sys.executable,
            "-I",
            str(script),
            "--output",
            str(tmp_path / "x.prom"),
            "--pgbackrest",
            "/bin/false",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "mailtower_backup_info_up 0" in (tmp_path / "x.prom").read_text()


def test_a_quiet_stanza_is_probed_with_check_and_its_new_segment_counted(tmp_path: Path) -> None:
    wal = captured()[0]["archive"][0]["max"]
    directory = tmp_path / "archive" / "lab-x" / "15-1" / wal[:16]
    directory.mkdir(parents=True)
    old = directory / f"{wal}-aa.zst"
    old.write_bytes(b"x")
    os.utime(old, (1_000_000, 1_000_000))  # long ago: the database has been quiet
    calls = tmp_path / "calls"
    fake = tmp_path / "pgbackrest"
    # `check` archives a segment (here: the same name, as if pushed again now).
    fake.write_text(
        f'#!/bin/sh\necho "$*" >> {calls}\n'
        f'case "$*" in *check*) touch {old};; *) cat {CAPTURED};; esac\n'
    )
    fake.chmod(0o755)
    out = tmp_path / "backup.prom"
    base = ["--repo-path", str(tmp_path), "--output", str(out), "--pgbackrest", str(fake)]
    assert backup_metrics.main([*base, "--probe-after", "900"]) == 0
    assert calls.read_text().splitlines() == ["--output=json info", "--stanza=lab-x check"]
    pushed = re.search(
        r'archive_last_push_timestamp_seconds\{stanza="lab-x"\} (\d+)', out.read_text()
    )
    assert pushed and abs(float(pushed.group(1)) - time.time()) < 60
    # Fresh now: the next run does not probe.
    assert backup_metrics.main([*base, "--probe-after", "900"]) == 0
    assert calls.read_text().splitlines()[2:] == ["--output=json info"]
