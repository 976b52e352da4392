"""scand's side of a rolling upgrade: /health names what runs and what is installed, and
POST /stack/restart (with the canary secret) stops scand for systemd to start the new code."""

from __future__ import annotations

import json
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


def test_restart_needs_the_token_then_stops_scand(rig: Rig, monkeypatch) -> None:  # noqa: F811
    stops: list[bool] = []
    monkeypatch.setattr(stack, "restart_self", lambda: stops.append(True))
    status, doc = rig.post("/stack/restart", headers={"X-Mailtower-Token": "wrong" * 4})
    assert status == 403
    status, doc = rig.post("/stack/restart", headers=TOKEN)
    assert status == 200 and doc["status"] == "restarting" and "stack_installed" in doc
    deadline = time.monotonic() + 5
    while not stops and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stops == [True]


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
