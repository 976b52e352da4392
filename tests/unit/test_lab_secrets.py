"""Each lab tower has its own secrets, the lab GOC knows each tower's own, and the GOC's data
refuses passwords shared between towers (issue 15, finding 4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mailtower.controller.lab import lxc, plan
from mailtower.settings import Secrets


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
    from roles.goc import GocData

    side = GocData.model_validate(goc_data()).side()
    for tower in side.towers:
        data = lab_tower_data(tower.name.removeprefix("lab-"))
        own = Secrets.model_validate(data["secrets"])
        assert data["name"] == tower.name
        assert tower.sync_password == own.sql_sync
        assert tower.goc_sync_password == own.goc_sync
        assert tower.status_password == own.goc_status


def _goc(towers: dict) -> dict:
    return {
        "towers": [
            {"name": name, "sql": [f"10.1.{i}.12"], "monitor": f"10.1.{i}.11"}
            for i, name in enumerate(towers)
        ],
        "secrets": {"eye_db": "e" * 16, "towers": towers},
    }


def _own(tag: str) -> dict[str, str]:
    return {k: f"{tag}-{k}-0123456789" for k in ("sql_sync", "goc_sync", "goc_status")}


def test_the_goc_refuses_a_password_two_towers_share() -> None:
    from roles.goc import GocData

    GocData.model_validate(_goc({"t-a": _own("a"), "t-b": _own("b")})).side()
    shared = {**_own("b"), "goc_status": _own("a")["goc_status"]}
    with pytest.raises(ValueError, match="share a password"):
        GocData.model_validate(_goc({"t-a": _own("a"), "t-b": shared})).side()


@pytest.mark.parametrize(
    "secrets, message",
    [
        ({"sync": "s" * 16, "status": "t" * 16}, "no longer share"),
        ({"towers": {"t-a": "a" * 16}}, "secrets.towers.t-a"),
        ({"towers": {"t-a": {"sql_sync": "a" * 16}}}, "secrets.towers.t-a"),
    ],
)
def test_the_goc_names_the_old_shared_form(secrets: dict, message: str) -> None:
    from roles.goc import GocData

    data = _goc({"t-a": _own("a")})
    data["secrets"] = {"eye_db": "e" * 16, "towers": {"t-a": _own("a")}, **secrets}
    with pytest.raises(ValueError, match=message):
        GocData.model_validate(data).side()
