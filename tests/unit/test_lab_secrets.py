"""Each lab tower has its own secrets and the lab GOC knows each tower's own (issue 15, finding
4). GocSettings refusing shared passwords: tests/unit/test_settings_hosts.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mailtower.controller.lab import lxc, plan
from mailtower.settings import GocSettings, Secrets


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(plan, "STATE_DIR", tmp_path / ".lab")
    return tmp_path / ".lab"


def test_no_two_lab_towers_share_a_secret(state: Path) -> None:
    a, b = lxc.tower_secrets("lab-a"), lxc.tower_secrets("lab-b")
    assert set(a) == set(b) == set(lxc.TOWER_SECRETS)
    assert not set(a.values()) & set(b.values())
    assert lxc.tower_secrets("lab-a") == a  # generated once, then kept
    assert (state / "secrets.json").stat().st_mode & 0o777 == 0o600


def test_an_older_labs_shared_set_becomes_the_first_towers(state: Path) -> None:
    state.mkdir()
    old = {n: f"old-{n}-0123456789" for n in lxc.TOWER_SECRETS + lxc.GOC_SECRETS}
    (state / "secrets.json").write_text(json.dumps(old))
    a, b = lxc.tower_secrets("lab-a"), lxc.tower_secrets("lab-b")
    assert a == {n: old[n] for n in lxc.TOWER_SECRETS}
    assert not set(a.values()) & set(b.values())
    assert lxc.goc_secrets() == {n: old[n] for n in lxc.GOC_SECRETS}


def test_the_lab_goc_holds_each_towers_own_passwords(state: Path) -> None:
    from inventory._lab import goc_data, lab_tower_data
    from roles.goc import sync_side

    side = sync_side(GocSettings.model_validate(goc_data()))
    assert [t.name for t in side.towers] == ["lab-a", "lab-b"]
    for tower in side.towers:
        data = lab_tower_data(tower.name.removeprefix("lab-"))
        own = Secrets.model_validate(data["secrets"])
        assert data["name"] == tower.name
        assert tower.sync_password == own.sql_sync
        assert tower.goc_sync_password == own.goc_sync
        assert tower.status_password == own.goc_status
    # What the GOC's deploy writes to goc.json no longer has a password for all towers.
    assert set(side.model_dump()) == {"dsn", "eye_password", "towers"}
