"""cvdupdate's config at the GOC: the settings' wants merged in, what cvdupdate learnt kept."""

from __future__ import annotations

import json

import pytest

from mailtower.goc import cvdupdate
from mailtower.settings import ClamavUpstream

# What cvdupdate wrote after some runs: main with a 429 cool-down, daily up to date.
LEARNT = {
    "dbs": {
        "main.cvd": {
            "url": "https://database.clamav.net/main.cvd",
            "retry after": 1765003600.0,
            "last modified": 1765000000.0,
            "last checked": 1765000000.0,
            "DNS field": 1,
            "local version": 62,
            "CDIFFs": [],
        },
        "daily.cvd": {
            "url": "https://database.clamav.net/daily.cvd",
            "retry after": 0,
            "last modified": 1765000000.0,
            "last checked": 1765000000.0,
            "DNS field": 2,
            "local version": 27850,
            "CDIFFs": ["daily-27849.cdiff", "daily-27850.cdiff"],
        },
    },
    "uuid": "6f1c7a52-0000-4000-8000-000000000001",
}
CONFIG = {"nameserver": "", "max retry": 3, "# cdiffs to keep": 30, "rotate logs": True}


def _want(**upstream) -> dict:
    return cvdupdate.wanted(ClamavUpstream.model_validate(upstream), home="/h")


def test_merge_keeps_what_cvdupdate_learnt():
    config, state = cvdupdate.merge(_want(nameserver="192.0.2.53"), CONFIG, LEARNT)
    assert state["uuid"] == LEARNT["uuid"]  # its User-Agent stays the same mirror
    assert state["dbs"]["main.cvd"]["retry after"] == 1765003600.0  # the cool-down holds
    assert state["dbs"]["main.cvd"]["local version"] == 62
    assert state["dbs"]["daily.cvd"]["CDIFFs"] == ["daily-27849.cdiff", "daily-27850.cdiff"]
    # Its own config keys stay; the settings' are set.
    assert config["max retry"] == 3 and config["# cdiffs to keep"] == 30
    assert config["nameserver"] == "192.0.2.53"
    assert config["db directory"] == "/h/database" and config["state file"] == "/h/state.json"


def test_merge_adds_and_drops_databases_as_the_settings_say():
    want = _want(databases={"daily": 2, "test": 0}, url="http://10.201.0.53/")
    _, state = cvdupdate.merge(want, CONFIG, LEARNT)
    assert sorted(state["dbs"]) == ["daily.cvd", "test.cvd"]  # main dropped
    assert state["dbs"]["test.cvd"] == {
        "url": "http://10.201.0.53/test.cvd",
        "retry after": 0,
        "last modified": 0,
        "last checked": 0,
        "DNS field": 0,
        "local version": 0,
        "CDIFFs": [],
    }
    # The url override moves daily to the other base, keeping its version.
    assert state["dbs"]["daily.cvd"]["url"] == "http://10.201.0.53/daily.cvd"
    assert state["dbs"]["daily.cvd"]["local version"] == 27850


def test_merge_of_a_new_mirror_gives_only_the_wanted_databases():
    config, state = cvdupdate.merge(_want(), {}, {})
    assert sorted(state["dbs"]) == ["bytecode.cvd", "daily.cvd", "main.cvd"]
    assert [state["dbs"][n]["DNS field"] for n in ("main.cvd", "daily.cvd", "bytecode.cvd")] == [
        1,
        2,
        7,
    ]
    assert "uuid" not in state  # cvdupdate makes its own on its first run
    assert config["nameserver"] == ""
    # every key cvdupdate 1.2.0 reads without a default (seen in the lab: KeyError at start)
    for key in ("max retry", "rotate logs", "# logs to keep", "rotate cdiffs", "# cdiffs to keep"):
        assert key in config, key
    # …and an operator's own choice of one of them is kept
    kept, _ = cvdupdate.merge(_want(), {"# logs to keep": 7}, {})
    assert kept["# logs to keep"] == 7


def test_merge_leaves_its_inputs_alone_and_is_idempotent():
    before = json.dumps(LEARNT, sort_keys=True)
    once = cvdupdate.merge(_want(), CONFIG, LEARNT)
    assert json.dumps(LEARNT, sort_keys=True) == before
    assert cvdupdate.merge(_want(), *once) == once


def test_apply_writes_only_when_something_changed(tmp_path):
    home = tmp_path / "home"
    want = cvdupdate.wanted(ClamavUpstream(databases={"test": 2}), home=str(home))
    wanted = tmp_path / "wanted.json"
    wanted.write_text(json.dumps(want))
    config = home / "config.json"
    assert cvdupdate.apply(wanted, config) is True
    state_path = home / "state.json"
    state = json.loads(state_path.read_text())
    assert list(state["dbs"]) == ["test.cvd"]
    # cvdupdate runs and learns; a second merge keeps that and writes nothing.
    state["uuid"] = "u-1"
    state["dbs"]["test.cvd"]["local version"] = 3
    state_path.write_text(json.dumps(state))
    mtime = state_path.stat().st_mtime_ns
    assert cvdupdate.apply(wanted, config) is False
    assert state_path.stat().st_mtime_ns == mtime
    assert json.loads(state_path.read_text())["dbs"]["test.cvd"]["local version"] == 3


def test_apply_refuses_a_broken_state_file(tmp_path):
    want = cvdupdate.wanted(ClamavUpstream(), home=str(tmp_path))
    wanted = tmp_path / "wanted.json"
    wanted.write_text(json.dumps(want))
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(SystemExit, match="state.json is unreadable"):
        cvdupdate.apply(wanted, tmp_path / "config.json")


@pytest.mark.parametrize(
    ("text", "seconds"), [("2m", 120), ("1h", 3600), ("90", 90), ("1w", 604800)]
)
def test_interval_seconds(text, seconds):
    assert cvdupdate.interval_seconds(text) == seconds
