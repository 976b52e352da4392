"""The GOC's mirror of ClamAV's official databases: nginx's /clamav/, cvdupdate's timer and
unit, and the timer's script (run here with stand-ins for cvdupdate and mailtower)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from test_templates import CLAMAV, _goc

from mailtower.goc import cvdupdate
from mailtower.settings import GocSettings
from roles.goc import CLAMAV_DIR, CVD_RUN, CVD_USER, cvdupdate_run, serve_port

SITE = "goc/etc/nginx/sites-enabled/mailtower-bundles"


def _goc_with(**changes) -> GocSettings:
    data = _goc().model_dump(mode="json")
    data.update(changes)
    return GocSettings.model_validate(data)


def _site(render, settings, g: GocSettings) -> list[str]:
    text = render(
        SITE,
        settings,
        goc=g,
        publish_dir="/srv/mailtower/bundles",
        clamav_dir=CLAMAV_DIR,
        port=serve_port(g),
    )
    return [line.split("#")[0].strip() for line in text.splitlines()]


def _block(lines: list[str], opening: str) -> list[str]:
    start = lines.index(opening)
    depth, out = 0, []
    for line in lines[start:]:
        out.append(line)
        depth += line.count("{") - line.count("}")
        if depth == 0:
            return out
    raise AssertionError(f"{opening} is not closed")


def test_goc_serves_the_clamav_mirror_read_only_beside_the_bundles(render, settings):
    lines = _site(render, settings, _goc())
    clamav = _block(lines, "location /clamav/ {")
    assert "alias /srv/mailtower/clamav/;" in clamav
    assert "limit_except GET {" in clamav and "deny all;" in clamav
    assert "root /srv/mailtower/bundles;" in lines
    # The same admission as the bundles: the towers' monitors, the readers, the GOC itself.
    allowed = [line.split()[1].rstrip(";") for line in lines if line.startswith("allow ")]
    assert allowed == ["10.1.0.11", "10.201.0.1", "127.0.0.1"]
    assert lines.index("deny all;") < lines.index("location /clamav/ {")
    assert "location ~ /\\. {" in lines  # publish's temporary files never served


def test_goc_with_the_clamav_mirror_only_serves_no_bundle_directory(render, settings):
    g = _goc_with(bundles=None)
    lines = _site(render, settings, g)
    assert serve_port(g) == 8026  # the towers' default goc.bundle_port
    assert "listen 0.0.0.0:8026;" in lines
    assert "location /clamav/ {" in lines
    assert not any(line.startswith("root ") for line in lines)
    assert "return 404;" in _block(lines, "location / {")


def test_goc_with_bundles_only_serves_no_clamav(render, settings):
    lines = _site(render, settings, _goc_with(clamav=None))
    assert "location /clamav/ {" not in lines
    assert "root /srv/mailtower/bundles;" in lines


@pytest.mark.parametrize(
    ("interval", "every", "delay"), [("1h", 3600, 300), ("2m", 120, 12), ("1d", 86400, 300)]
)
def test_cvdupdate_timer_follows_the_check_interval(render, settings, interval, every, delay):
    g = _goc_with(clamav={**CLAMAV, "check_interval": interval})
    timer = render(
        "goc/etc/systemd/system/mailtower-cvdupdate.timer", settings, goc=g, cvd=cvdupdate_run(g)
    )
    assert f"OnUnitActiveSec={every}s" in timer.splitlines()
    assert f"RandomizedDelaySec={delay}s" in timer.splitlines()
    assert "OnActiveSec=1min" in timer.splitlines()


def test_cvdupdate_runs_as_its_own_user_and_writes_only_its_directories(render, settings):
    g = _goc()
    unit = render(
        "goc/etc/systemd/system/mailtower-cvdupdate.service", settings, goc=g, cvd=cvdupdate_run(g)
    ).splitlines()
    assert f"User={CVD_USER}" in unit and f"Group={CVD_USER}" in unit
    assert f"ExecStart={CVD_RUN}" in unit
    assert f"ReadWritePaths={cvdupdate.HOME} {CLAMAV_DIR}" in unit
    assert "ProtectSystem=strict" in unit and "NoNewPrivileges=yes" in unit


def _stand_in(path: Path, log: Path, rc: int) -> str:
    path.write_text(f'#!/bin/sh\necho "{path.name} $*" >> {log}\nexit {rc}\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.mark.parametrize(
    ("merge_rc", "cvd_rc", "publish_rc", "want_rc", "want_calls"),
    [
        (0, 0, 0, 0, ["python", "cvd", "mailtower"]),
        (0, 3, 0, 3, ["python", "cvd", "mailtower"]),  # cvdupdate failed: still published
        (0, 0, 2, 2, ["python", "cvd", "mailtower"]),
        (0, 3, 2, 2, ["python", "cvd", "mailtower"]),
        (1, 0, 0, 1, ["python", "mailtower"]),  # config not merged: no check, failure recorded
    ],
)
def test_the_timers_script_publishes_even_when_cvdupdate_failed(
    render, settings, tmp_path, merge_rc, cvd_rc, publish_rc, want_rc, want_calls
):
    log = tmp_path / "calls"
    g = _goc()
    cvd = {
        **cvdupdate_run(g),
        "python": _stand_in(tmp_path / "python", log, merge_rc),
        "cvd": _stand_in(tmp_path / "cvd", log, cvd_rc),
        "mailtower": _stand_in(tmp_path / "mailtower", log, publish_rc),
    }
    script = tmp_path / "cvdupdate-run"
    script.write_text(render("goc/usr/local/lib/mailtower/cvdupdate-run", settings, goc=g, cvd=cvd))
    script.chmod(0o755)
    done = subprocess.run([str(script)], capture_output=True, text=True, env=dict(os.environ))
    assert done.returncode == want_rc, done.stderr
    calls = log.read_text().splitlines()
    assert [c.split()[0] for c in calls] == want_calls
    publish = calls[-1].split()
    expected_rc = merge_rc or cvd_rc
    assert publish[1:] == [
        "clamavdb", "publish",
        "--source", f"{cvdupdate.HOME}/database",
        "--dest", CLAMAV_DIR,
        "--databases", "bytecode,daily,extra,main",
        "--cvdupdate-state", f"{cvdupdate.HOME}/state.json",
        "--cvdupdate-rc", str(expected_rc),
    ]  # fmt: skip
    if "cvd" in want_calls:
        assert calls[1].split()[1:] == ["update", "--config", f"{cvdupdate.HOME}/config.json"]


def test_cvdupdate_wanted_config_from_settings():
    g = _goc()
    assert g.clamav is not None
    want = cvdupdate.wanted(g.clamav)
    assert want["config"] == {
        "db directory": f"{cvdupdate.HOME}/database",
        "log directory": f"{cvdupdate.HOME}/logs",
        "state file": f"{cvdupdate.HOME}/state.json",
        "nameserver": "192.0.2.53",
    }
    # The url base override (its trailing slash dropped); each database its TXT field.
    assert want["dbs"] == {
        "bytecode.cvd": {"url": "https://mirror.example/clamav/bytecode.cvd", "DNS field": 7},
        "daily.cvd": {"url": "https://mirror.example/clamav/daily.cvd", "DNS field": 2},
        "extra.cvd": {"url": "https://mirror.example/clamav/extra.cvd", "DNS field": 0},
        "main.cvd": {"url": "https://mirror.example/clamav/main.cvd", "DNS field": 1},
    }
    json.dumps(want)  # what the deploy uploads


def test_lab_stand_in_upstream_serves_the_goc_and_the_controller_only(render, settings):
    from roles.lab_clamav_upstream import readers

    text = render(
        "lab_clamav_upstream/etc/nginx/sites-enabled/clamav-upstream",
        settings,
        address="10.201.0.53",
        port=80,
        root="/srv/clamav-upstream",
        readers=readers(),
    )
    lines = [line.split("#")[0].strip() for line in text.splitlines()]
    assert "listen 10.201.0.53:80;" in lines and "root /srv/clamav-upstream;" in lines
    allowed = [line.split()[1].rstrip(";") for line in lines if line.startswith("allow ")]
    assert allowed == ["10.201.9.10", "10.201.0.1", "127.0.0.1"]
    assert lines.index("deny all;") > lines.index("allow 127.0.0.1;")
