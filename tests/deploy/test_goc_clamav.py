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

from mailtower.goc import cvdupdate, fangfrisch
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
    with_feeds = _goc_with_feed()
    unit = render(
        "goc/etc/systemd/system/mailtower-cvdupdate.service",
        settings,
        goc=with_feeds,
        cvd=cvdupdate_run(with_feeds),
    ).splitlines()
    assert f"ReadWritePaths={cvdupdate.HOME} {CLAMAV_DIR} {fangfrisch.HOME}" in unit
    assert "ProtectSystem=strict" in unit and "NoNewPrivileges=yes" in unit


def _stand_in(path: Path, log: Path, rc: int) -> str:
    path.write_text(f'#!/bin/sh\necho "{path.name} $*" >> {log}\nexit {rc}\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.mark.parametrize(
    ("merge_rc", "cvd_rc", "publish_rc", "want_rc", "want_calls"),
    [
        (0, 0, 0, 0, ["python", "cvd", "mailtower"]),
        # cvdupdate failed: asked whether the upstream forbids us (403), still published
        (0, 3, 0, 3, ["python", "cvd", "python", "mailtower"]),
        (0, 0, 2, 2, ["python", "cvd", "mailtower"]),
        (0, 3, 2, 2, ["python", "cvd", "python", "mailtower"]),
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
        "--feeds-dir", fangfrisch.FEEDS_DIR, "--feeds",  # none enabled: '' (gone in $*)
    ]  # fmt: skip
    if "cvd" in want_calls:
        assert calls[1].split()[1:] == ["update", "--config", f"{cvdupdate.HOME}/config.json"]
    if cvd_rc:
        assert calls[2].split()[1:] == [
            "-m", "mailtower.goc.cvdupdate", "--config", f"{cvdupdate.HOME}/config.json",
            "--after-failure",
        ]  # fmt: skip


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


def _goc_with_feed(**options: str) -> GocSettings:
    clamav = _goc().clamav
    assert clamav is not None
    feeds = [
        {"name": "urlhaus", "enabled": True, "options": {"auth_key": "k" * 8, **options}},
        {"name": "sanesecurity"},  # off by default: not in Fangfrisch's config
    ]
    return _goc_with(clamav={**clamav.model_dump(mode="json"), "feeds": feeds})


@pytest.mark.parametrize(("ff_rc", "ff_says"), [(0, ""), (0, "WARNING digest mismatch"), (1, "")])
def test_the_timers_script_refreshes_the_feeds_then_publishes_them(
    render, settings, tmp_path, ff_rc, ff_says
):
    log = tmp_path / "calls"
    g = _goc_with_feed()
    ff = tmp_path / "fangfrisch"
    ff.write_text(f'#!/bin/sh\necho "fangfrisch $*" >> {log}\necho "{ff_says}" >&2\nexit {ff_rc}\n')
    ff.chmod(0o755)
    run = cvdupdate_run(g)
    cvd = {
        **run,
        "python": _stand_in(tmp_path / "python", log, 0),
        "cvd": _stand_in(tmp_path / "cvd", log, 0),
        "mailtower": _stand_in(tmp_path / "mailtower", log, 0),
        "fangfrisch": {**run["fangfrisch"], "bin": str(ff), "log": str(tmp_path / "ff.log")},
    }
    script = tmp_path / "cvdupdate-run"
    script.write_text(render("goc/usr/local/lib/mailtower/cvdupdate-run", settings, goc=g, cvd=cvd))
    script.chmod(0o755)
    done = subprocess.run([str(script)], capture_output=True, text=True, env=dict(os.environ))
    assert done.returncode == 0, done.stderr  # a feed failure is recorded, not the unit's
    calls = log.read_text().splitlines()
    assert [c.split()[0] for c in calls] == ["python", "cvd", "fangfrisch", "mailtower"]
    assert calls[2].split()[1:] == ["--conf", fangfrisch.CONFIG, "refresh"]
    publish = calls[-1].split()
    assert publish[-8:] == [
        "--feeds-dir", fangfrisch.FEEDS_DIR, "--feeds", "urlhaus",
        "--fangfrisch-rc", str(ff_rc), "--fangfrisch-log", str(tmp_path / "ff.log"),
    ]  # fmt: skip
    assert (tmp_path / "ff.log").read_text().strip() == ff_says
    assert ff_says in done.stderr  # and in the journal


def test_fangfrisch_config_enables_only_the_enabled_feeds():
    g = _goc_with_feed(prefix="http://10.201.0.53/")
    assert g.clamav is not None
    text = fangfrisch.config_text(g.clamav)
    import configparser

    parsed = configparser.ConfigParser(interpolation=None)
    parsed.read_string(text)
    assert parsed.sections() == ["urlhaus"]
    section = parsed["urlhaus"]
    assert section["enabled"] == "yes"
    assert section["local_directory"] == f"{fangfrisch.FEEDS_DIR}/urlhaus"
    assert (section["auth_key"], section["prefix"]) == ("k" * 8, "http://10.201.0.53/")
    assert parsed["DEFAULT"]["db_url"] == fangfrisch.DB_URL
    assert fangfrisch.enabled(g.clamav) == ["urlhaus"]
    assert fangfrisch.enabled(_goc().clamav) == []


@pytest.mark.parametrize(
    "options",
    [{"enabled": "no"}, {"local_directory": "/etc"}, {"auth_key": "a\n[x]"}, {"Bad Key": "1"}],
)
def test_a_feeds_options_cannot_reach_past_its_section(options):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        _goc_with_feed(**options)
