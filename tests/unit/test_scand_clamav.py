"""scand's official ClamAV database requests (POST /clamav/apply, /clamav/rollback) and its
health's "clamav" versions: a scand HTTP server in-process, freshclam and the engines' reload
stood in for (tests/unit/test_clamav_real.py runs the real ones)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from clamav_rig import CANARY, FakeFreshclam, clamav_settings, paths
from prometheus_client import generate_latest

from mailtower.clamavdb import live_versions, read_header
from mailtower.monitor import health
from mailtower.scand import clamav_apply
from mailtower.scand.errors import ApplyError
from mailtower.scand.http import Source, start_http
from mailtower.settings import TowerSettings

TOKEN = {"X-Mailtower-Token": CANARY}


def fake_db(path: Path, version: int, body: bytes = b"") -> Path:
    """A database file whose header says ``version`` (what live_versions reads)."""
    header = f"ClamAV-VDB:06 Dec 2026 10-00 +0000:{version}:{version * 10}:90:x:y:z:0".encode()
    path.write_bytes(header.ljust(512, b" ") + (body or f"v{version}".encode()))
    return path


class _Source(Source):
    def __init__(self, settings: TowerSettings) -> None:
        super().__init__()
        self.settings = settings

    def current_settings(self) -> TowerSettings:
        return self.settings

    async def health(self) -> tuple[int, dict[str, object]]:
        return 200, {"status": "ok"}

    def metrics(self) -> bytes:
        return generate_latest()

    async def reload_rules(self, version: int | None) -> None:
        return None


@dataclass
class Rig:
    tmp: Path
    paths: clamav_apply.Paths
    freshclam: FakeFreshclam
    port: int
    reloads: list[str]
    source: _Source

    def post(self, path: str, body: bytes = b"", headers=TOKEN) -> tuple[int, dict]:
        return asyncio.run(health.request("127.0.0.1", self.port, "POST", path, body, headers, 30))

    def apply(self, **versions: int) -> tuple[int, dict]:
        import json

        return self.post("/clamav/apply", json.dumps({"versions": versions}).encode())

    def health(self) -> dict:
        return asyncio.run(health.check("127.0.0.1", self.port, 10.0))[1]

    def upstream(self, name: str, version: int) -> Path:
        """A file of the mirror's, for the fake freshclam to stage."""
        (self.tmp / "upstream").mkdir(exist_ok=True)
        return fake_db(self.tmp / "upstream" / f"{name}-{version}", version)


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    settings = clamav_settings(tmp_path, ["main", "daily", "test"])
    p = paths(tmp_path)
    freshclam = FakeFreshclam(tmp_path, p.staged)
    for name, value in (
        ("STAGED_DIR", p.staged),
        ("PREVIOUS_DIR", p.previous),
        ("FRESHCLAM_CONF", p.freshclam_conf),
        ("FRESHCLAM", str(freshclam.program)),
    ):
        monkeypatch.setattr(clamav_apply, name, value)
    reloads: list[str] = []
    real_reload = clamav_apply.reload_engines

    def reload(settings, paths, icap_control, timeout_s) -> None:  # no engines: record it
        reloads.append(",".join(sorted(f"{db}={v}" for db, v in live_versions(paths.live).items())))
        real_reload(settings, paths, icap_control, timeout_s)

    monkeypatch.setattr(clamav_apply, "reload_engines", reload)
    (tmp_path / "live" / "mailtower-test.ndb").write_text("sigsync's\n")
    fake_db(p.live / "main.cvd", 60)
    fake_db(p.live / "daily.cld", 100)
    source = _Source(settings)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(start_http(source, "127.0.0.1", 0), loop).result(5)
    port = server.sockets[0].getsockname()[1]
    yield Rig(tmp_path, p, freshclam, port, reloads, source)
    loop.call_soon_threadsafe(server.close)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def test_health_reports_the_live_versions_of_the_configured_databases(rig: Rig) -> None:
    fake_db(rig.paths.live / "other.cvd", 3)  # not in settings.clamav.databases
    doc = rig.health()
    assert doc["clamav"] == {"main": 60, "daily": 100} and doc["clamav_busy"] is False
    fake_db(rig.paths.live / "daily.cvd", 90)  # a stale .cvd beside the .cld: the .cld counts
    assert rig.health()["clamav"]["daily"] == 100


def test_health_has_no_clamav_without_the_setting(rig: Rig) -> None:
    rig.source.settings = rig.source.settings.model_copy(update={"clamav": None})
    doc = rig.health()
    assert "clamav" not in doc and "clamav_busy" not in doc


def test_requests_need_the_token_and_a_versions_body(rig: Rig) -> None:
    assert rig.post("/clamav/apply", b'{"versions": {"daily": 101}}', headers={})[0] == 403
    assert rig.post("/clamav/rollback", headers={"X-Mailtower-Token": "x" * 24})[0] == 403
    for body in (b'{"version": 3}', b'{"versions": {}}', b'{"versions": {"daily": 0}}', b"["):
        status, doc = rig.post("/clamav/apply", body)
        assert status == 400 and "versions" in doc["reason"], (body, doc)
    status, doc = rig.apply(safebrowsing=3)
    assert status == 409 and "safebrowsing" in doc["reason"] and "loads" in doc["reason"], doc
    assert rig.freshclam.calls == [] and rig.reloads == []


def test_apply_stages_keeps_the_previous_installs_and_reloads(rig: Rig) -> None:
    rig.freshclam.plan(
        {"daily.cld": rig.upstream("daily", 101), "test.cvd": rig.upstream("test", 6)}
    )
    status, doc = rig.apply(daily=101, test=6)
    assert status == 200, doc
    assert doc["clamav"] == {"main": 60, "daily": 101, "test": 6}
    assert (doc["installed"], doc["reloaded"]) == (True, True)
    assert rig.freshclam.calls == [f"--no-dns --stdout --config-file={rig.paths.freshclam_conf}"]
    assert rig.reloads == ["daily=101,main=60,test=6"]  # one reload, with everything in place
    # the previous: what was live for the databases asked (test was not there)
    assert live_versions(rig.paths.previous) == {"daily": 100}
    assert (rig.paths.live / "mailtower-test.ndb").exists()  # sigsync's files untouched
    probe = (rig.paths.live / clamav_apply.PROBE_NAME).read_text()
    assert probe.startswith("Mailtower.Bundle.Probe-")
    assert rig.health()["clamav"] == {"main": 60, "daily": 101, "test": 6}
    # Asked again: nothing to stage, nothing to reload.
    status, doc = rig.apply(daily=101, test=6)
    assert (status, doc["installed"], doc["reloaded"]) == (200, False, False), doc
    assert len(rig.freshclam.calls) == 1 and len(rig.reloads) == 1


def test_a_cvd_replacing_a_cld_removes_the_stale_one(rig: Rig) -> None:
    rig.freshclam.plan({"daily.cvd": rig.upstream("daily", 120)}, remove=["daily.cld"])
    assert rig.apply(daily=120)[0] == 200
    assert not (rig.paths.live / "daily.cld").exists()
    assert read_header(rig.paths.live / "daily.cvd").version == 120
    rig.freshclam.plan({"daily.cld": rig.upstream("daily", 121)}, remove=["daily.cvd"])
    assert rig.apply(daily=121)[0] == 200
    assert sorted(p.name for p in rig.paths.live.glob("daily.*")) == ["daily.cld"]


def test_staged_versions_other_than_asked_are_refused_naming_the_database(rig: Rig) -> None:
    rig.freshclam.plan({"daily.cld": rig.upstream("daily", 102)}, say="daily.cld updated")
    status, doc = rig.apply(daily=101)
    assert status == 409, doc
    assert "daily: asked 101, staged 102" in doc["reason"]
    assert doc["clamav"] == {"main": 60, "daily": 100}  # live unchanged, nothing reloaded
    assert rig.reloads == [] and live_versions(rig.paths.live)["daily"] == 100


def test_a_failing_freshclam_is_a_bad_gateway_with_its_last_errors(rig: Rig) -> None:
    rig.freshclam.plan(
        say="Trying host 127.0.0.2...\nERROR: Can't download test.cvd from "
        "http://127.0.0.2:8080/clamav/test.cvd\nERROR: Update failed for database: test",
        rc=58,
    )
    status, doc = rig.apply(test=6)
    assert status == 502, doc
    assert "test: asked 6, staged none" in doc["reason"]
    assert "Update failed for database: test" in doc["reason"]
    assert rig.reloads == [] and "test" not in live_versions(rig.paths.live)


def test_an_older_version_than_live_is_refused(rig: Rig) -> None:
    status, doc = rig.apply(daily=99)
    assert status == 409 and "daily 100 is live, newer than the asked 99" in doc["reason"], doc
    assert rig.freshclam.calls == []


def test_a_reload_that_does_not_take_puts_the_previous_back(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig.freshclam.plan(
        {"daily.cld": rig.upstream("daily", 101), "test.cvd": rig.upstream("test", 6)}
    )
    recorded = clamav_apply.reload_engines
    calls = {"n": 0}

    def failing_once(*args, **kwargs) -> None:
        recorded(*args, **kwargs)  # the rig's record of what was live at each reload
        calls["n"] += 1
        if calls["n"] == 1:
            raise ApplyError("engine clamd has not loaded the new ClamAV databases after 300 s")

    monkeypatch.setattr(clamav_apply, "reload_engines", failing_once)
    status, doc = rig.apply(daily=101, test=6)
    assert status == 409, doc
    assert "has not loaded" in doc["reason"] and "daily 100, test (none) are back" in doc["reason"]
    # reloaded with the new ones, then with the previous ones: test gone again
    assert rig.reloads == ["daily=101,main=60,test=6", "daily=100,main=60"]
    assert doc["clamav"] == {"main": 60, "daily": 100}
    assert rig.health()["clamav_busy"] is False


def test_a_failed_put_back_is_a_500(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    rig.freshclam.plan({"daily.cld": rig.upstream("daily", 101)})

    def never(*args, **kwargs) -> None:
        raise ApplyError("clamd at /run/clamav/clamd.ctl did not take RELOAD; is it running?")

    monkeypatch.setattr(clamav_apply, "reload_engines", never)
    status, doc = rig.apply(daily=101)
    assert status == 500 and "look at clamd" in doc["reason"], doc
    # the files are the previous ones all the same: clamd, once back, loads those
    assert live_versions(rig.paths.live)["daily"] == 100


def test_rollback_restores_what_the_last_apply_kept(rig: Rig) -> None:
    status, doc = rig.post("/clamav/rollback")
    assert status == 409 and "nothing to roll back to" in doc["reason"], doc
    rig.freshclam.plan(
        {"daily.cld": rig.upstream("daily", 101), "test.cvd": rig.upstream("test", 6)}
    )
    assert rig.apply(daily=101, test=6)[0] == 200
    status, doc = rig.post("/clamav/rollback")
    assert status == 200 and doc["clamav"] == {"main": 60, "daily": 100}, doc
    assert rig.reloads[-1] == "daily=100,main=60"
    assert (rig.paths.live / "daily.cld").read_bytes().endswith(b"v100")
    # Again: already there, the engines are checked (reloaded, probed) once more.
    status, doc = rig.post("/clamav/rollback")
    assert (status, doc["installed"], doc["clamav"]["daily"]) == (200, False, 100), doc


def test_one_request_at_a_time_and_busy_in_health(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate, entered = threading.Event(), threading.Event()
    real_freshclam = clamav_apply.run_freshclam

    def slow(paths, timeout_s):
        entered.set()
        gate.wait(10)
        return real_freshclam(paths, timeout_s)

    monkeypatch.setattr(clamav_apply, "run_freshclam", slow)
    rig.freshclam.plan({"daily.cld": rig.upstream("daily", 101)})
    answers: list[tuple[int, dict]] = []
    first = threading.Thread(target=lambda: answers.append(rig.apply(daily=101)))
    first.start()
    assert entered.wait(10)
    assert rig.health()["clamav_busy"] is True
    second = threading.Thread(target=lambda: answers.append(rig.post("/clamav/rollback")))
    second.start()
    gate.set()
    first.join(20)
    second.join(20)
    # the rollback waited for the apply, then found what the apply had kept
    assert [a[0] for a in answers] == [200, 200], answers
    assert answers[1][1]["clamav"]["daily"] == 100


# --- third-party feeds: the monitor's mirror serves them beside the official databases -------


class FeedMirror:
    """The monitor's served directory (index.json + feeds/) behind HTTP."""

    def __init__(self, root: Path) -> None:
        import http.server

        self.root = root
        (root / "feeds").mkdir(parents=True)

        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), lambda *a, **k: Quiet(*a, directory=str(root), **k)
        )
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def serve(self, serial: int, contents: dict[str, str]) -> None:
        import hashlib
        import json

        for old in (self.root / "feeds").iterdir():
            old.unlink()
        entries = {}
        for name, text in contents.items():
            (self.root / "feeds" / name).write_text(text)
            digest = hashlib.sha256(text.encode()).hexdigest()
            entries[name] = {"sha256": digest, "size": len(text.encode()), "feed": "urlhaus"}
        index = {"format": 1, "databases": {}, "feeds": entries, "feeds_serial": serial}
        (self.root / "index.json").write_text(json.dumps(index))


@pytest.fixture
def feeds(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> Iterator[FeedMirror]:
    import dataclasses

    mirror = FeedMirror(rig.tmp / "mirror")
    with_mirror = dataclasses.replace(
        clamav_apply.Paths.of(rig.source.settings), mirror=mirror.url
    )  # the rig's directories and fake freshclam, this mirror
    monkeypatch.setattr(clamav_apply.Paths, "of", classmethod(lambda cls, s: with_mirror))
    yield mirror
    mirror.server.shutdown()
    mirror.server.server_close()


NDB = "Lab.Feed.Url-{n}:0:*:687474703a2f2f6d616c776172652e6c61622e696e76616c6964\n"


def feed_files(rig: Rig) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(rig.paths.live.glob("feed-*"))}


def test_a_feed_set_alone_is_synced_installed_and_reported(rig: Rig, feeds: FeedMirror) -> None:
    feeds.serve(1, {"urlhaus_clamav.ndb": NDB.format(n=1), "junk.ndb": NDB.format(n=2)})
    status, doc = rig.apply(feeds=1)
    assert status == 200, doc
    assert doc["clamav"] == {"main": 60, "daily": 100, "feeds": 1}
    assert feed_files(rig) == {
        "feed-junk.ndb": NDB.format(n=2),
        "feed-urlhaus_clamav.ndb": NDB.format(n=1),
    }
    assert rig.freshclam.calls == []  # the official databases were current: no freshclam
    assert rig.reloads == ["daily=100,main=60"]  # one reload, in the window
    assert (rig.paths.live / "mailtower-test.ndb").exists()  # sigsync's files untouched
    assert rig.health()["clamav"]["feeds"] == 1
    assert rig.apply(feeds=1)[1]["installed"] is False


def test_feeds_and_a_database_in_one_window_and_rolled_back_together(
    rig: Rig, feeds: FeedMirror
) -> None:
    feeds.serve(1, {"urlhaus_clamav.ndb": NDB.format(n=1), "junk.ndb": NDB.format(n=2)})
    assert rig.apply(feeds=1)[0] == 200
    feeds.serve(2, {"urlhaus_clamav.ndb": NDB.format(n=3)})
    rig.freshclam.plan({"daily.cld": rig.upstream("daily", 101)})
    status, doc = rig.apply(daily=101, feeds=2)
    assert status == 200 and doc["clamav"] == {"main": 60, "daily": 101, "feeds": 2}, doc
    assert feed_files(rig) == {"feed-urlhaus_clamav.ndb": NDB.format(n=3)}  # junk.ndb gone
    assert len(rig.reloads) == 2
    status, doc = rig.post("/clamav/rollback")
    assert status == 200 and doc["clamav"] == {"main": 60, "daily": 100, "feeds": 1}, doc
    assert sorted(feed_files(rig)) == ["feed-junk.ndb", "feed-urlhaus_clamav.ndb"]
    assert feed_files(rig)["feed-urlhaus_clamav.ndb"] == NDB.format(n=1)


def test_a_feed_set_the_mirror_does_not_serve_or_a_bad_file_is_refused(
    rig: Rig, feeds: FeedMirror
) -> None:
    feeds.serve(3, {"urlhaus_clamav.ndb": NDB.format(n=1)})
    status, doc = rig.apply(feeds=2)
    assert status == 502 and "serves feed set 3, not the asked 2" in doc["reason"], doc
    (feeds.root / "feeds" / "urlhaus_clamav.ndb").write_text(NDB.format(n=9))  # not the index's
    status, doc = rig.apply(feeds=3)
    assert status == 502 and "urlhaus_clamav.ndb: refused: sha256" in doc["reason"], doc
    assert doc["clamav"] == {"main": 60, "daily": 100} and feed_files(rig) == {}
    assert rig.reloads == []


def test_a_reload_that_does_not_take_takes_the_new_feeds_away(
    rig: Rig, feeds: FeedMirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    feeds.serve(1, {"urlhaus_clamav.ndb": NDB.format(n=1)})
    recorded = clamav_apply.reload_engines
    calls = {"n": 0}

    def failing_once(*args, **kwargs) -> None:
        recorded(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            raise ApplyError("engine clamd has not loaded the new ClamAV databases after 300 s")

    monkeypatch.setattr(clamav_apply, "reload_engines", failing_once)
    status, doc = rig.apply(feeds=1)
    assert status == 409 and "feeds (none) are back" in doc["reason"], doc
    assert feed_files(rig) == {} and "feeds" not in rig.health()["clamav"]
    assert not (rig.paths.live / clamav_apply.FEEDS_MANIFEST).exists()
