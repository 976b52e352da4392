"""cvdupdate's config at the GOC: the settings' wants merged in, what cvdupdate learnt kept."""

from __future__ import annotations

import http.server
import json
import threading

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


class _Answer(http.server.BaseHTTPRequestHandler):
    code = 403
    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        type(self).seen.append(dict(self.headers))
        self.send_response(type(self).code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(("code", "cools"), [(403, True), (404, False), (200, False)])
def test_a_403_after_a_failed_update_cools_every_database_down_24_hours(tmp_path, code, cools):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    _Answer.code, _Answer.seen = code, []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        state_path = tmp_path / "state.json"
        config_path = tmp_path / "config.json"
        config_path.write_text(json.dumps({"state file": str(state_path)}))
        state = {
            "uuid": "u-1",
            "dbs": {
                "main.cvd": {"url": f"{url}/main.cvd", "retry after": 0},
                "daily.cvd": {"url": f"{url}/daily.cvd", "retry after": 0},
            },
        }
        state_path.write_text(json.dumps(state))
        until = cvdupdate.forbidden_cooldown(config_path, now=1000.0)
    finally:
        server.shutdown()
    after = json.loads(state_path.read_text())
    assert len(_Answer.seen) == 1  # one question, with cvdupdate's User-Agent
    assert _Answer.seen[0]["User-Agent"].startswith("CVDUPDATE/1.2.0 (u-1)")
    if cools:
        assert until == 1000.0 + 24 * 3600
        assert {d["retry after"] for d in after["dbs"].values()} == {until}
    else:
        assert until is None and after == state
