"""The scanners' engines with new configuration or packages: restarted only in the monitor's
drained windows (issue 19). The scand unit restarts them before scand starts, as root; the
upgrade script installs packages with Debian's restarts held back and records what it did."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import sample_settings
from test_templates import _unit_service

from mailtower.scand import engines, stack
from mailtower.scanning.engines.icap import parse_icap_url
from roles._common import VENV
from roles.scanner import (
    DEPLOYING,
    ENGINE_PACKAGES,
    ENGINES_REFRESH,
    ENGINES_UPGRADE,
    marker_needed,
)

SCAND = "scanner/etc/systemd/system/mailtower-scand.service"
MD5SUMS = "0123456789abcdef0123456789abcdef  usr/sbin/clamd\\n"


@pytest.mark.parametrize("icap", [None, "icap://127.0.0.1:1344/virus_scan"])
def test_scand_unit_refreshes_the_engines_as_root_before_it_starts(render, settings, icap):
    url = parse_icap_url(icap) if icap else None
    unit = _unit_service(render(SCAND, settings, icap=url))
    pre = unit["ExecStartPre"]
    # -I: run as root, nothing from the working directory or PYTHON* variables on sys.path
    assert pre.startswith("+/opt/mailtower/venv/bin/python -I -m mailtower.scand.engines refresh ")
    assert ENGINES_REFRESH.startswith(f"{VENV}/bin/python -I -m ")  # the deploy's, as root too
    assert f"--clamd {settings.clamd_socket}" in pre
    assert ("--icap 127.0.0.1:1344" in pre) == bool(icap)
    wait = int(re.search(r"--timeout (\d+)", pre).group(1))
    # the engines are back before the monitor's window gives up, and systemd waits for them
    assert wait < settings.upgrade.restart_timeout_s < int(unit["TimeoutStartSec"])
    assert unit["User"] == "mailtower"  # scand itself stays unprivileged


def test_the_upgrade_script_records_the_file_scand_watches(render, settings):
    text = render(
        f"scanner{ENGINES_UPGRADE}",
        settings,
        packages=ENGINE_PACKAGES,
        record=str(engines.FILES[-1]),
    )
    assert f"> {engines.FILES[-1]}.tmp" in text
    assert "--only-upgrade " + " ".join(ENGINE_PACKAGES) in text


@pytest.fixture
def script(render, tmp_path: Path):
    """The rendered script, its system paths moved under tmp_path, with a fake apt-get and
    dpkg-query on PATH: apt-get checks the policy denies restarts and logs what dpkg would."""
    sbin, bin_ = tmp_path / "usr-sbin", tmp_path / "bin"
    sbin.mkdir()
    bin_.mkdir()
    log, record = tmp_path / "dpkg.log", tmp_path / "lib" / "engines-packages"
    log.write_text("2026-12-01 10:00:00 status installed c-icap:amd64 1:0.5.10-5\n")
    text = render(
        f"scanner{ENGINES_UPGRADE}", sample_settings(), packages=["clamav-daemon"], record=record
    )
    text = text.replace("/usr/sbin/", f"{sbin}/").replace("/var/log/dpkg.log", str(log))
    path = tmp_path / "mailtower-engines-upgrade"
    path.write_text(text)
    path.chmod(0o755)
    (bin_ / "apt-get").write_text(
        "#!/bin/sh\n"
        f'"{sbin}/policy-rc.d" clamav-daemon restart; [ $? -eq 101 ] || exit 9\n'
        'echo "$@" > "$APT_ARGS"\n'
        f'[ -n "$INSTALLS" ] && echo "2026-12-07 13:00:00 status installed $INSTALLS" >> {log}\n'
        "exit 0\n"
    )
    (bin_ / "dpkg-query").write_text(  # the version, and the package's md5sums list
        '#!/bin/sh\n[ "$1" = --control-show ] && { printf "$MD5SUMS"; exit 0; }\n'
        'echo "clamav-daemon $VERSION"\n'
    )
    for f in bin_.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IXUSR)

    def run(
        *args: str, installs: str = "", version: str = "1.0.7", md5sums: str = MD5SUMS
    ) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "PATH": f"{bin_}:{os.environ['PATH']}",
            "APT_ARGS": str(tmp_path / "apt-args"),
            "INSTALLS": installs,
            "VERSION": version,
            "MD5SUMS": md5sums,
        }
        return subprocess.run([str(path), *args], env=env, capture_output=True, text=True)

    run.sbin, run.record, run.args = sbin, record, tmp_path / "apt-args"  # type: ignore[attr-defined]
    return run


def test_upgrade_holds_restarts_back_and_records_what_it_installed(script) -> None:
    (script.sbin / "policy-rc.d").write_text("#!/bin/sh\nexit 0\n")  # the host's own
    done = script(installs="clamav-daemon:amd64 1.0.7")
    assert done.returncode == 0, done.stderr
    assert "--only-upgrade clamav-daemon" in script.args.read_text()
    assert "--force-confold" in script.args.read_text()
    assert script.record.read_text().startswith("clamav-daemon 1.0.7\n")
    assert (script.sbin / "policy-rc.d").read_text() == "#!/bin/sh\nexit 0\n"  # restored
    assert not (script.sbin / "policy-rc.d.mailtower-saved").exists()
    first = script.record.read_text()
    done = script("--reinstall", "clamav-daemon", installs="clamav-daemon:amd64 1.0.7")
    assert done.returncode == 0 and script.args.read_text().strip() == "install -y -q -o " + (
        "Dpkg::Options::=--force-confold -o Dpkg::Options::=--force-confdef "
        "--reinstall clamav-daemon"
    )
    # the same versions and files: the same record (a reinstall of them restarts nothing), and
    # the same on every scanner that installed them — never when (the roll's first scanner of
    # a record goes alone, then batches: a record per scanner would make every batch one)
    assert script.record.read_text() == first
    done = script(installs="clamav-daemon:amd64 1.0.8", version="1.0.8")
    assert done.returncode == 0 and script.record.read_text() != first  # a new version
    newer = script.record.read_text()
    done = script(installs="clamav-daemon:amd64 1.0.8", version="1.0.8", md5sums="ff  x\\n")
    assert done.returncode == 0 and script.record.read_text() != newer  # other files


def test_upgrade_that_installs_nothing_leaves_the_record_and_no_policy(script) -> None:
    done = script()
    assert done.returncode == 0, done.stderr
    assert "nothing installed" in done.stdout
    assert not script.record.exists()  # no scanner behind, no roll
    assert not (script.sbin / "policy-rc.d").exists()  # services start again as usual


def test_scand_refuses_a_second_restart_until_systemd_and_the_monitor_are_done(render, settings):
    """POST /stack/restart's cooldown (scand.stack.restart_cooldown_s) is the unit's RestartSec
    and the monitor's wait for the restarted scand."""
    unit = _unit_service(render(SCAND, settings))
    expected = int(unit["RestartSec"]) + settings.upgrade.restart_timeout_s
    assert stack.restart_cooldown_s(settings) == expected


def test_the_deploy_marks_itself_in_progress_only_when_it_writes_something() -> None:
    """The scanner role's marker (scand: nothing to roll while it exists) is created and removed
    only by a deploy that changes what scand's digest names: an unchanged tower's deploy
    reports no change."""
    local = {"/opt/mailtower/wheelhouse.tar": "a" * 64, "/etc/mailtower/tower.json": "b" * 64}
    assert str(stack.DEPLOYING) == DEPLOYING
    assert not marker_needed(dict(local), local, left=False)  # unchanged: nothing runs
    assert marker_needed({**local, "/etc/mailtower/tower.json": "c" * 64}, local, left=False)
    assert marker_needed({**local, "/opt/mailtower/wheelhouse.tar": None}, local, left=False)
    assert marker_needed(dict(local), local, left=True)  # an interrupted deploy's: removed
