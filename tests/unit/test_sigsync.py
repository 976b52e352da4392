"""sigsync mirrors exactly the index, refuses mismatching files, and removes what left it."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest

from mailtower.scand import sigsync
from mailtower.scand.errors import SignatureSyncError
from mailtower.scanning import testdata


@pytest.fixture
def mirror(tmp_path):
    root = tmp_path / "mirror"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *a):
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def publish(root: Path, files: dict[str, str], lie: str | None = None) -> None:
    index = {}
    for name, text in files.items():
        (root / name).write_text(text)
        index[name] = hashlib.sha256(text.encode()).hexdigest()
    if lie:
        index[lie] = "0" * 64
    (root / "index.json").write_text(json.dumps({"files": index}))


def test_sync_installs_then_is_idempotent(mirror, tmp_path):
    root, url = mirror
    db = tmp_path / "db"
    db.mkdir()
    publish(root, testdata.clamav_signatures())
    assert sorted(sigsync.sync(url, db)) == sorted(testdata.clamav_signatures())
    assert (db / "mailtower-test.ndb").read_text() == testdata.clamav_signatures()[
        "mailtower-test.ndb"
    ]
    assert sigsync.sync(url, db) == []


def test_removed_from_index_is_removed_locally(mirror, tmp_path):
    root, url = mirror
    db = tmp_path / "db"
    db.mkdir()
    publish(root, {"a.ndb": "A:0:*:41414141\n", "b.ndb": "B:0:*:42424242\n"})
    sigsync.sync(url, db)
    (db / "official.cvd").write_text("not ours")
    publish(root, {"a.ndb": "A:0:*:41414141\n"})
    (root / "b.ndb").unlink()
    assert sigsync.sync(url, db) == ["b.ndb"]
    assert not (db / "b.ndb").exists()
    assert (db / "official.cvd").exists(), "files the tool never wrote are left alone"


def test_mismatching_file_is_refused_and_not_installed(mirror, tmp_path):
    root, url = mirror
    db = tmp_path / "db"
    db.mkdir()
    publish(root, {"a.ndb": "A:0:*:41414141\n"})
    (root / "evil.ndb").write_text("tampered")
    publish(root, {"a.ndb": "A:0:*:41414141\n"}, lie="evil.ndb")
    with pytest.raises(SignatureSyncError, match="does not match"):
        sigsync.sync(url, db)
    assert not (db / "evil.ndb").exists()


def test_unreachable_mirror_names_the_url(tmp_path):
    with pytest.raises(SignatureSyncError, match="127.0.0.1:9/index.json"):
        sigsync.sync("http://127.0.0.1:9", tmp_path, timeout=2)


def test_unsafe_names_are_refused(mirror, tmp_path):
    root, url = mirror
    (root / "index.json").write_text(json.dumps({"files": {"../etc/passwd": "0" * 64}}))
    with pytest.raises(SignatureSyncError, match="unsafe"):
        sigsync.sync(url, tmp_path)


def test_official_database_files_are_never_written_or_removed(mirror, tmp_path):
    root, url = mirror
    dest = tmp_path / "db"
    dest.mkdir()
    (dest / "daily.cld").write_bytes(b"live official database")
    publish(root, {"main.cvd": "not through sigsync"})
    with pytest.raises(SignatureSyncError, match="official database file"):
        sigsync.sync(url, dest)
    assert not (dest / "main.cvd").exists()
    # A state that names one (written by an older sigsync, or by hand) removes nothing of it.
    (dest / sigsync.STATE).write_text(json.dumps(["daily.cld", "old.ndb"]))
    (dest / "old.ndb").write_text("x")
    publish(root, {"mailtower-test.ndb": "sig"})
    (root / "main.cvd").unlink()
    assert sigsync.sync(url, dest) == ["mailtower-test.ndb", "old.ndb"]
    assert (dest / "daily.cld").read_bytes() == b"live official database"
    assert not (dest / "old.ndb").exists()


def test_no_reload_writes_the_files_and_never_asks_clamd(mirror, tmp_path, monkeypatch):
    root, url = mirror
    dest = tmp_path / "db"
    dest.mkdir()
    publish(root, {"mailtower-test.ndb": "sig"})
    asked: list[str] = []
    monkeypatch.setattr(sigsync, "reload_clamd", lambda path: asked.append(path) or True)
    argv = ["--mirror", url, "--dir", str(dest), "--clamd", str(tmp_path / "c.ctl")]
    assert sigsync.main([*argv, "--no-reload"]) == 0
    assert (dest / "mailtower-test.ndb").read_text() == "sig" and asked == []
    publish(root, {"mailtower-test.ndb": "sig2"})
    assert sigsync.main(argv) == 0
    assert asked == [str(tmp_path / "c.ctl")]
