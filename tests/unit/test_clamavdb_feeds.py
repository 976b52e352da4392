"""Third-party feeds (Fangfrisch's files) through GOC → monitor → scanner staging: publish
loads each file in the real libclamav (clamscan), pull and sync_feeds check every sha256."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import needs
import pytest
import test_clamavdb as base

from mailtower import cli
from mailtower.clamavdb import (
    FEEDS,
    DatabaseError,
    _feeds,
    mirror_versions,
    publish,
    pull,
    read_index,
    sync_feeds,
)
from mailtower.clamavdb.cli import fangfrisch_error

# the official-database tests' fixtures: ClamAV's test files, the GOC behind HTTP, sigtool
UPSTREAM, upstream_dir = base.UPSTREAM, base.upstream_dir
files, goc, requests, sigtool = base.files, base.goc, base.requests, base.sigtool

GOOD = "Lab.Feed.Url-1:0:*:687474703a2f2f6d616c776172652e6c61622e696e76616c6964\n"
BAD = "Lab.Feed.Broken-1:0:*:zz\n"  # not hex: libclamav says "Malformed database"


@pytest.fixture(autouse=True)
def clamscan() -> None:
    if shutil.which("clamscan") is None:
        needs.missing("clamscan (Debian's clamav package)")


def fangfrisch_dir(root: Path, feeds: dict[str, dict[str, str]]) -> Path:
    """Fangfrisch's local directories: <root>/<feed>/<file> (and its .sha256 beside)."""
    shutil.rmtree(root, ignore_errors=True)
    for feed, contents in feeds.items():
        (root / feed).mkdir(parents=True)
        for name, text in contents.items():
            (root / feed / name).write_text(text)
            (root / feed / f"{name}.sha256").write_text("not a database\n")
    return root


def served(dest: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((dest / "feeds").iterdir())}


def test_publish_serves_the_files_that_load_with_a_serial(tmp_path: Path, sigtool: None) -> None:
    src, dest = upstream_dir(tmp_path / "up", 3), tmp_path / "served"
    ff = fangfrisch_dir(tmp_path / "ff", {"urlhaus": {"urlhaus_clamav.ndb": GOOD}})
    assert publish(src, dest, ["test"], UPSTREAM, ff, ["urlhaus"]) == {"test": 3}
    index = read_index(dest)
    assert index["feeds_serial"] == 1
    entry = index["feeds"]["urlhaus_clamav.ndb"]
    assert (entry["feed"], entry["size"]) == ("urlhaus", len(GOOD))
    assert entry["sha256"] == _feeds.sha256_of(dest / "feeds" / "urlhaus_clamav.ndb")
    assert served(dest) == {"urlhaus_clamav.ndb": GOOD}  # the .sha256 files are not served
    assert mirror_versions(dest) == {"test": 3, FEEDS: 1}
    # Nothing new: the same serial, the index not rewritten.
    before = (dest / "index.json").read_bytes()
    publish(src, dest, ["test"], UPSTREAM, ff, ["urlhaus"])
    assert (dest / "index.json").read_bytes() == before


def test_without_feeds_there_is_no_feed_set(tmp_path: Path, sigtool: None) -> None:
    src, dest = upstream_dir(tmp_path / "up", 3), tmp_path / "served"
    publish(src, dest, ["test"], UPSTREAM, tmp_path / "ff", [])
    assert "feeds_serial" not in read_index(dest)
    assert mirror_versions(dest) == {"test": 3}


def test_a_file_that_does_not_load_is_refused_and_its_previous_copy_stays(
    tmp_path: Path, sigtool: None
) -> None:
    src, dest = upstream_dir(tmp_path / "up", 3), tmp_path / "served"
    ff = fangfrisch_dir(tmp_path / "ff", {"sanesecurity": {"junk.ndb": GOOD}})
    publish(src, dest, ["test"], UPSTREAM, ff, ["sanesecurity"])
    fangfrisch_dir(ff, {"sanesecurity": {"junk.ndb": BAD, "phish.ndb": GOOD, "new.hdb": "x\n"}})
    with pytest.raises(DatabaseError, match=r"2 refusal\(s\).*junk\.ndb: refused: libclamav"):
        publish(src, dest, ["test"], UPSTREAM, ff, ["sanesecurity"])
    index = read_index(dest)
    assert sorted(index["feeds"]) == ["junk.ndb", "phish.ndb"]  # new.hdb: never loaded
    assert served(dest) == {"junk.ndb": GOOD, "phish.ndb": GOOD}
    assert index["feeds_serial"] == 2  # phish.ndb joined
    assert index["upstream"]["refusals"] == 2
    assert "Malformed database" in index["upstream"]["last_error"]
    assert index["databases"]["test"]["version"] == 3  # the official database still served


def test_a_change_or_a_feed_turned_off_is_a_new_serial(tmp_path: Path, sigtool: None) -> None:
    src, dest = upstream_dir(tmp_path / "up", 3), tmp_path / "served"
    ff = fangfrisch_dir(tmp_path / "ff", {"a": {"a.ndb": GOOD}, "b": {"b.hdb": _hdb()}})
    publish(src, dest, ["test"], UPSTREAM, ff, ["a", "b"])
    assert read_index(dest)["feeds_serial"] == 1
    fangfrisch_dir(ff, {"a": {"a.ndb": GOOD + GOOD.replace("Url-1", "Url-2")}, "b": {}})
    (ff / "b" / "b.hdb").write_text(_hdb())
    publish(src, dest, ["test"], UPSTREAM, ff, ["a", "b"])
    assert read_index(dest)["feeds_serial"] == 2
    publish(src, dest, ["test"], UPSTREAM, ff, ["a"])  # b turned off: its file goes
    assert (read_index(dest)["feeds_serial"], served(dest).keys()) == (3, {"a.ndb"})
    publish(src, dest, ["test"], UPSTREAM, ff, [])  # every feed off: an empty set, serial 4
    index = read_index(dest)
    assert (index["feeds"], index["feeds_serial"], served(dest)) == ({}, 4, {})
    assert mirror_versions(dest) == {"test": 3, FEEDS: 4}  # the scanners drop theirs too
    publish(src, dest, ["test"], UPSTREAM)  # no feeds argument: the served set stays
    assert read_index(dest)["feeds_serial"] == 4


def test_two_feeds_with_one_file_name_are_refused(tmp_path: Path, sigtool: None) -> None:
    src, dest = upstream_dir(tmp_path / "up", 3), tmp_path / "served"
    ff = fangfrisch_dir(tmp_path / "ff", {"a": {"x.ndb": GOOD}, "b": {"x.ndb": GOOD}})
    with pytest.raises(DatabaseError, match=r"b/x\.ndb: refused: feed a serves a file"):
        publish(src, dest, ["test"], UPSTREAM, ff, ["a", "b"])
    assert read_index(dest)["feeds"]["x.ndb"]["feed"] == "a"


def _hdb() -> str:
    return "44d88612fea8a8f36de82e1278abb02f:68:Lab.Feed.Hash-1\n"


def _goc_with_feeds(tmp_path: Path, served_dir: Path, feeds: dict[str, dict[str, str]]) -> None:
    ff = fangfrisch_dir(tmp_path / "ff", feeds)
    publish(upstream_dir(tmp_path / "up", 3), served_dir, ["test"], UPSTREAM, ff, sorted(feeds))


def test_pull_takes_the_gocs_feed_set_whole(
    tmp_path: Path, goc: tuple[Path, str], sigtool: None
) -> None:
    served_dir, url = goc
    _goc_with_feeds(tmp_path, served_dir, {"urlhaus": {"urlhaus_clamav.ndb": GOOD}})
    mirror = tmp_path / "mirror"
    assert pull(url, mirror, ["test"]) == {"test": 3}  # feeds come whatever databases say
    assert served(mirror) == served(served_dir)
    assert read_index(mirror)["feeds"] == read_index(served_dir)["feeds"]
    assert mirror_versions(mirror) == {"test": 3, FEEDS: 1}
    # The GOC's set 2 with one file altered on the way: set 2 refused whole, set 1 stays.
    _goc_with_feeds(
        tmp_path, served_dir, {"urlhaus": {"urlhaus_clamav.ndb": GOOD * 2, "more.ndb": GOOD}}
    )
    (served_dir / "feeds" / "more.ndb").write_text(GOOD.replace("Url-1", "Url-9"))
    with pytest.raises(DatabaseError, match=r"feeds/more\.ndb: refused: sha256.*set 2 refused"):
        pull(url, mirror, ["test"])
    assert served(mirror) == {"urlhaus_clamav.ndb": GOOD}
    assert mirror_versions(mirror)[FEEDS] == 1
    (served_dir / "feeds" / "more.ndb").write_text(GOOD)
    pull(url, mirror, ["test"])
    assert served(mirror) == {"urlhaus_clamav.ndb": GOOD * 2, "more.ndb": GOOD}
    assert mirror_versions(mirror)[FEEDS] == 2
    _goc_with_feeds(tmp_path, served_dir, {"urlhaus": {"more.ndb": GOOD}})
    pull(url, mirror, ["test"])
    assert served(mirror) == {"more.ndb": GOOD}  # what the GOC no longer lists goes


def test_sync_feeds_stages_the_asked_set_only(
    tmp_path: Path, goc: tuple[Path, str], sigtool: None
) -> None:
    served_dir, url = goc
    _goc_with_feeds(tmp_path, served_dir, {"urlhaus": {"urlhaus_clamav.ndb": GOOD}})
    staged = tmp_path / "staged" / "feeds"
    with pytest.raises(DatabaseError, match=r"serves feed set 1, not the asked 2"):
        sync_feeds(url, staged, 2)
    staged.mkdir(parents=True)
    (staged / "stale.ndb").write_text(GOOD)
    listed = sync_feeds(url, staged, 1)
    assert sorted(listed) == ["urlhaus_clamav.ndb"]
    assert {p.name: p.read_text() for p in staged.iterdir()} == {"urlhaus_clamav.ndb": GOOD}
    (served_dir / "feeds" / "urlhaus_clamav.ndb").write_text(BAD)  # changed behind the index
    (staged / "urlhaus_clamav.ndb").write_text(BAD)  # a staged copy is checked again too
    with pytest.raises(DatabaseError, match=r"urlhaus_clamav\.ndb: refused: sha256"):
        sync_feeds(url, staged, 1)
    assert [p.name for p in staged.iterdir()] == ["urlhaus_clamav.ndb"]  # no .part left


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ({"feeds": {"../x.ndb": {}}, "feeds_serial": 1}, "feeds has"),
        ({"feeds": {"x.ndb": {"sha256": "0", "size": 1, "feed": "a"}}, "feeds_serial": 1}, "x.ndb"),
        ({"feeds": {}, "feeds_serial": "1"}, "feeds_serial"),
        ({"feeds": {"x.cvd": {}}, "feeds_serial": 1}, "feeds has"),
    ],
)
def test_read_index_refuses_a_malformed_feed_section(
    tmp_path: Path, document: dict[str, Any], problem: str
) -> None:
    doc = {"format": 1, "databases": {}, **document}
    (tmp_path / "index.json").write_text(json.dumps(doc))
    with pytest.raises(DatabaseError, match=problem):
        read_index(tmp_path)


def test_fangfrisch_failures_are_recorded_and_publish_still_runs(
    tmp_path: Path, sigtool: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fangfrisch_error(0, None) == ""
    log = tmp_path / "fangfrisch.log"
    log.write_text("")
    assert fangfrisch_error(0, log) == ""
    log.write_text(
        "WARNING https://x/urlhaus_clamav.ndb sha256 digest mismatch (expected a, got b)\n"
    )
    assert "digest mismatch" in fangfrisch_error(0, log)
    assert fangfrisch_error(1, None) == "fangfrisch refresh: exit status 1"
    ff = fangfrisch_dir(tmp_path / "ff", {"urlhaus": {"urlhaus_clamav.ndb": GOOD}})
    dest = tmp_path / "served"
    argv = ["clamavdb", "publish", "--source", str(upstream_dir(tmp_path / "up", 3))]
    argv += ["--dest", str(dest), "--databases", "test", "--feeds", "urlhaus"]
    argv += ["--feeds-dir", str(ff), "--fangfrisch-rc", "0", "--fangfrisch-log", str(log)]
    assert cli.main(argv) == 0  # a failed refresh is recorded; what was fetched is served
    index = read_index(dest)
    assert "fangfrisch refresh: WARNING" in index["upstream"]["last_error"]
    assert index["feeds_serial"] == 1
    assert "digest mismatch" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["x.ign2", "x.ign", "x.fp", "x.sfp"])
def test_a_feed_never_brings_what_switches_detections_off(name: str) -> None:
    # ignore lists and trusted-file lists would silence the official databases, and a feed
    # file between the hops is protected by an unsigned index's sha256 only
    assert not _feeds.is_feed_file(name)
    assert _feeds.is_feed_file("x.ndb")
