"""scand's side of a rolling upgrade: /health names what runs and what is installed, and
POST /stack/restart (with the canary secret) stops scand for systemd to start the new code."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from test_scand_rules_api import TOKEN, Rig, rig  # noqa: F401  (the fixture)

from mailtower.scand import stack


def test_health_names_running_and_installed_and_sees_new_settings(rig: Rig, tmp_path) -> None:  # noqa: F811
    doc = rig.health()
    assert doc["stack"] is not None and doc["stack"] == doc["stack_installed"]
    settings_path = tmp_path / "tower.json"
    data = json.loads(settings_path.read_text())
    data["upgrade"] = {"batch": 2}
    settings_path.write_text(json.dumps(data))  # what a deploy writes
    after = rig.health()
    assert after["stack"] == doc["stack"] and after["stack_installed"] != doc["stack"]


def _install_new_settings(tmp_path) -> None:
    settings_path = tmp_path / "tower.json"
    data = json.loads(settings_path.read_text())
    data["upgrade"] = {"batch": 2}
    settings_path.write_text(json.dumps(data))  # what a deploy writes


def test_restart_needs_the_token_and_something_to_restart_then_stops_scand(
    rig: Rig,  # noqa: F811
    tmp_path,
    monkeypatch,
) -> None:
    stops: list[bool] = []
    monkeypatch.setattr(stack, "restart_self", lambda: stops.append(True))
    status, doc = rig.post("/stack/restart", headers={})
    assert status == 403 and "X-Mailtower-Token" in doc["reason"]
    status, doc = rig.post("/stack/restart", headers={"X-Mailtower-Token": "wrong" * 4})
    assert status == 403
    # it runs what is installed: nothing to restart for
    status, doc = rig.post("/stack/restart", headers=TOKEN)
    assert status == 409 and doc["status"] == "current" and "nothing to restart" in doc["reason"]
    _install_new_settings(tmp_path)
    status, doc = rig.post("/stack/restart", headers=TOKEN)
    assert status == 200 and doc["status"] == "restarting" and "stack_installed" in doc
    deadline = time.monotonic() + 5
    while not stops and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stops == [True]
    # a second restart within RestartSec + upgrade.restart_timeout_s is refused (the stop
    # is faked here, so this scand still runs the old code)
    status, doc = rig.post("/stack/restart", headers=TOKEN)
    assert status == 409 and doc["status"] == "cooldown", doc
    assert 0 < doc["retry_after_s"] <= stack.restart_cooldown_s(rig.scanner.settings)
    time.sleep(0.5)
    assert stops == [True]


def test_not_ready_to_roll_while_a_deploy_writes_or_systemd_has_not_reloaded(
    rig: Rig,  # noqa: F811
    tmp_path,
    monkeypatch,
) -> None:
    marker = tmp_path / "deploy-in-progress"
    monkeypatch.setattr(stack, "DEPLOYING", marker)
    _install_new_settings(tmp_path)
    doc = rig.health()
    assert doc["stack_installed"] not in (None, doc["stack"]) and doc["stack_pending"] is None
    marker.write_text("")
    doc = rig.health()
    assert doc["stack_installed"] is None and "deploy" in doc["stack_pending"]
    status, doc = rig.post("/stack/restart", headers=TOKEN)
    assert status == 409 and doc["status"] == "current" and "deploy" in doc["reason"]
    marker.unlink()
    monkeypatch.setattr(stack, "need_daemon_reload", lambda: True)
    doc = rig.health()
    assert doc["stack_installed"] is None and "daemon-reload" in doc["stack_pending"]


def test_need_daemon_reload_asks_systemd_for_the_units_and_caches(monkeypatch) -> None:
    asked: list[tuple[str, ...]] = []
    answer = "no\nyes\nno\n"

    def show(units):
        asked.append(tuple(units))
        return subprocess.CompletedProcess(units, 0, answer, "")

    monkeypatch.setattr(stack, "_reload_seen", None)
    assert stack.need_daemon_reload(show) is True
    assert asked == [stack.UNITS]
    answer = "no\nno\nno\n"
    assert stack.need_daemon_reload(show) is True and len(asked) == 1  # cached
    monkeypatch.setattr(stack, "_reload_seen", (time.monotonic() - stack.RELOAD_CACHE_S, True))
    assert stack.need_daemon_reload(show) is False and len(asked) == 2

    def absent(units):
        raise FileNotFoundError(stack.SYSTEMCTL)

    monkeypatch.setattr(stack, "_reload_seen", None)
    assert stack.need_daemon_reload(absent) is False  # no systemd: nothing to wait for


def test_a_scand_started_on_unloaded_units_is_behind_once_they_are_loaded(monkeypatch) -> None:
    loaded = stack.digest(None)
    if loaded is None:
        pytest.skip("mailtower is not installed as a distribution here")
    monkeypatch.setattr(stack, "need_daemon_reload", lambda: True)
    assert stack.running_digest(None) != loaded
    monkeypatch.setattr(stack, "need_daemon_reload", lambda: False)
    assert stack.running_digest(None) == loaded


def test_digest_follows_the_wheel_record_settings_and_unit(tmp_path) -> None:
    settings, unit = tmp_path / "tower.json", tmp_path / "unit"
    settings.write_text("{}")
    unit.write_text("[Service]\n")
    first = stack.digest(settings, unit)
    if first is None:
        pytest.skip("mailtower is not installed as a distribution here")
    assert stack.digest(settings, unit) == first
    unit.write_text("[Service]\nEnvironment=X=1\n")
    assert stack.digest(settings, unit) != first
