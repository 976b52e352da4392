"""ClamAV's databases through GOC → monitor → scanners (mailtower.clamavdb), with ClamAV's own
officially signed test databases (test-1..6.cvd, test-2..6.cdiff) and the real sigtool."""

from __future__ import annotations

import http.server
import io
import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import needs
import pytest

from mailtower import clamavdb, cli
from mailtower.clamavdb import DatabaseError, _cvd, _mirror
from mailtower.clamavdb.cli import upstream_state
from mailtower.controller.lab.clamav_testfiles import ensure

UPSTREAM = {"last_check": 1000.0, "last_ok": 1000.0, "cooldown_until": 0.0, "last_error": ""}


@pytest.fixture(scope="module")
def files() -> Path:
    return ensure()


@pytest.fixture
def sigtool() -> None:
    if shutil.which("sigtool") is None:
        needs.missing("sigtool (Debian's clamav package)")


def upstream_dir(root: Path, version: int, cdiffs: range | list[int] = range(0)) -> Path:
    """cvdupdate's db directory as it is at ``version``: test.cvd and the given CDIFFs."""
    src = ensure()
    root.mkdir(parents=True, exist_ok=True)
    for old in root.iterdir():
        old.unlink()
    shutil.copyfile(src / f"test-{version}.cvd", root / "test.cvd")
    for k in cdiffs:
        shutil.copyfile(src / f"test-{k}.cdiff", root / f"test-{k}.cdiff")
    return root


def flip(path: Path, offset: int | None = None) -> None:
    """Flip one byte (by default in the middle: the signed body, past the 512-byte header)."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


def served_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --- one file -----------------------------------------------------------------------------


def test_read_header_of_each_test_database(files: Path) -> None:
    header = clamavdb.read_header(files / "test-6.cvd")
    assert header == clamavdb.CvdHeader(
        version=6, built="22 Jun 2021 21:34 -0400", sigs=14, flevel=81
    )
    assert [clamavdb.read_header(files / f"test-{n}.cvd").version for n in range(1, 7)] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]


@pytest.mark.parametrize(
    "content", [b"", b"ClamAV-VDB:short", b"x" * 600, b"ClamAV-VDB:a:b:c:d" + b" " * 500]
)
def test_read_header_refuses_what_is_no_database(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "x.cvd").write_bytes(content)
    with pytest.raises(DatabaseError, match=r"x\.cvd: (not a ClamAV database|malformed)"):
        clamavdb.read_header(tmp_path / "x.cvd")


def test_verify_cvd_accepts_clamavs_signed_file(files: Path, sigtool: None) -> None:
    assert clamavdb.verify_cvd(files / "test-3.cvd").version == 3


@pytest.mark.parametrize("offset", [None, 5000, -1], ids=["middle", "body", "last-byte"])
def test_verify_cvd_refuses_one_flipped_byte(
    tmp_path: Path, files: Path, sigtool: None, offset: int | None
) -> None:
    bad = tmp_path / "test.cvd"
    shutil.copyfile(files / "test-3.cvd", bad)
    flip(bad, offset)
    with pytest.raises(DatabaseError, match=r"test\.cvd: refused: sigtool --info"):
        clamavdb.verify_cvd(bad)


def test_verify_chain_1_to_6(files: Path, sigtool: None) -> None:
    cdiffs = [files / f"test-{k}.cdiff" for k in range(2, 7)]
    clamavdb.verify_chain(files / "test-1.cvd", cdiffs, files / "test-6.cvd")


def test_verify_chain_refuses_a_flipped_cdiff(tmp_path: Path, files: Path, sigtool: None) -> None:
    cdiffs = []
    for k in range(2, 7):
        shutil.copyfile(files / f"test-{k}.cdiff", tmp_path / f"test-{k}.cdiff")
        cdiffs.append(tmp_path / f"test-{k}.cdiff")
    flip(tmp_path / "test-4.cdiff")
    with pytest.raises(DatabaseError, match=r"test-4\.cdiff: refused: sigtool --run-cdiff"):
        clamavdb.verify_chain(files / "test-1.cvd", cdiffs, files / "test-6.cvd")


def test_verify_chain_refuses_a_gap(files: Path, sigtool: None) -> None:
    cdiffs = [files / f"test-{k}.cdiff" for k in (2, 3, 5, 6)]
    with pytest.raises(DatabaseError, match=r"do not lead from version 1 .* \[2, 3, 4, 5, 6\]"):
        clamavdb.verify_chain(files / "test-1.cvd", cdiffs, files / "test-6.cvd")


def test_verify_chain_refuses_cdiffs_that_do_not_give_the_cvd(
    tmp_path: Path, files: Path, sigtool: None
) -> None:
    # test-3.cdiff applied to test-2 must give test-3; named as if it led to test-2 from test-1,
    # it is applied to the wrong base: sigtool or the tree comparison must refuse it.
    shutil.copyfile(files / "test-3.cdiff", tmp_path / "test-2.cdiff")
    with pytest.raises(DatabaseError, match="test-2.cdiff: refused|do not give this CVD"):
        clamavdb.verify_chain(
            files / "test-1.cvd", [tmp_path / "test-2.cdiff"], files / "test-2.cvd"
        )


def test_tree_comparison_finds_every_difference(tmp_path: Path) -> None:
    left, right = tmp_path / "left", tmp_path / "right"
    for tree in (left, right):
        tree.mkdir()
        (tree / "test.hdb").write_bytes(b"a:1:A\n")
        (tree / "test.info").write_bytes(b"info\n")
    assert _cvd._tree_difference(left, right) == ""
    (right / "test.hdb").write_bytes(b"a:1:B\n")  # same size, one byte
    assert _cvd._tree_difference(left, right) == "test.hdb differs"
    (right / "test.hdb").write_bytes(b"a:1:A\n")
    (right / "test.ndb").write_bytes(b"")
    assert "only in the CVD: ['test.ndb']" in _cvd._tree_difference(left, right)


def test_live_versions_prefers_cld_and_ignores_other_files(tmp_path: Path, files: Path) -> None:
    shutil.copyfile(files / "test-3.cvd", tmp_path / "test.cvd")
    shutil.copyfile(files / "test-6.cvd", tmp_path / "test.cld")  # freshclam's, applied CDIFFs
    shutil.copyfile(files / "test-2.cvd", tmp_path / "daily.cvd")
    shutil.copyfile(files / "test-5.cvd", tmp_path / "main.cld")
    shutil.copyfile(files / "test-4.cdiff", tmp_path / "test-4.cdiff")
    (tmp_path / "freshclam.dat").write_bytes(b"\0" * 600)
    (tmp_path / "local.ndb").write_text("x\n")
    assert clamavdb.live_versions(tmp_path) == {"daily": 2, "main": 5, "test": 6}
    assert clamavdb.live_versions(tmp_path / "absent") == {}


# --- publish ------------------------------------------------------------------------------


def test_first_publish_serves_the_cvd_alone(tmp_path: Path, files: Path, sigtool: None) -> None:
    source = upstream_dir(tmp_path / "cvdupdate", 3, range(2, 4))
    dest = tmp_path / "served"
    assert clamavdb.publish(source, dest, ["test"], UPSTREAM) == {"test": 3}
    assert served_files(dest) == ["index.json", "test.cvd"]  # no base: no CDIFF verifiable
    assert (dest / "test.cvd").read_bytes() == (files / "test-3.cvd").read_bytes()
    index = clamavdb.read_index(dest)
    entry = index["databases"]["test"]
    assert (entry["version"], entry["sigs"], entry["built"], entry["cdiffs"]) == (
        3,
        11,
        "22 Jun 2021 20:40 -0400",
        {},
    )
    assert entry["size"] == (files / "test-3.cvd").stat().st_size
    assert index["upstream"] == {**UPSTREAM, "refusals": 0}
    assert clamavdb.mirror_versions(dest) == {"test": 3}


def test_publish_adds_the_verified_cdiffs_and_is_idempotent(
    tmp_path: Path, files: Path, sigtool: None
) -> None:
    dest = tmp_path / "served"
    clamavdb.publish(upstream_dir(tmp_path / "up", 3), dest, ["test"], UPSTREAM)
    source = upstream_dir(tmp_path / "up", 6, range(2, 7))
    assert clamavdb.publish(source, dest, ["test"], UPSTREAM) == {"test": 6}
    assert served_files(dest) == [
        "index.json",
        "test-4.cdiff",
        "test-5.cdiff",
        "test-6.cdiff",
        "test.cvd",
    ]
    assert sorted(clamavdb.read_index(dest)["databases"]["test"]["cdiffs"]) == [
        "test-4.cdiff",
        "test-5.cdiff",
        "test-6.cdiff",
    ]
    before = snapshot(dest)
    assert clamavdb.publish(source, dest, ["test"], UPSTREAM) == {"test": 6}
    assert snapshot(dest) == before  # nothing rewritten, not even index.json


def test_a_flipped_cdiff_is_refused_and_the_signed_cvd_served_alone(
    tmp_path: Path, files: Path, sigtool: None
) -> None:
    dest = tmp_path / "served"
    clamavdb.publish(upstream_dir(tmp_path / "up", 3), dest, ["test"], UPSTREAM)
    source = upstream_dir(tmp_path / "up", 6, range(4, 7))
    flip(source / "test-5.cdiff")
    with pytest.raises(DatabaseError, match=r"1 of 1 .*test-5\.cdiff: refused"):
        clamavdb.publish(source, dest, ["test"], UPSTREAM)
    after = snapshot(dest)
    # no CDIFF of the broken chain is served; the CVD, verified on its own, is
    assert sorted(after) == ["index.json", "test.cvd"]
    assert after["test.cvd"][0] == (files / "test-6.cvd").read_bytes()
    index = clamavdb.read_index(dest)
    assert index["databases"]["test"]["version"] == 6
    assert index["databases"]["test"]["cdiffs"] == {}
    assert index["upstream"]["refusals"] == 1
    assert "test-5.cdiff" in index["upstream"]["last_error"]


def test_a_flipped_cvd_keeps_the_published_state_and_is_set_aside(
    tmp_path: Path, files: Path, sigtool: None
) -> None:
    dest = tmp_path / "served"
    clamavdb.publish(upstream_dir(tmp_path / "up", 3), dest, ["test"], UPSTREAM)
    before = snapshot(dest)
    source = upstream_dir(tmp_path / "up", 5, range(4, 6))
    flip(source / "test.cvd")
    with pytest.raises(DatabaseError, match=r"1 of 1 .*test\.cvd: refused"):
        clamavdb.publish(source, dest, ["test"], UPSTREAM)
    assert snapshot(dest)["test.cvd"] == before["test.cvd"]
    assert clamavdb.mirror_versions(dest) == {"test": 3}
    # cvdupdate finds no test.cvd and fetches it again; the bad copy is kept for a look
    assert not (source / "test.cvd").exists() and (source / "test.cvd.refused").is_file()
    shutil.copyfile(files / "test-5.cvd", source / "test.cvd")
    assert clamavdb.publish(source, dest, ["test"], UPSTREAM) == {"test": 5}
    assert set(clamavdb.read_index(dest)["databases"]["test"]["cdiffs"]) == {
        "test-4.cdiff",
        "test-5.cdiff",
    }


def test_a_refused_database_does_not_stop_the_others(
    tmp_path: Path, files: Path, sigtool: None
) -> None:
    source = upstream_dir(tmp_path / "up", 3)
    shutil.copyfile(files / "test-2.cvd", source / "other.cvd")
    flip(source / "test.cvd")
    dest = tmp_path / "served"
    with pytest.raises(DatabaseError, match=r"1 of 2 .*test\.cvd: refused") as caught:
        clamavdb.publish(source, dest, ["test", "other"], UPSTREAM)
    assert "other" not in str(caught.value)
    assert served_files(dest) == ["index.json", "other.cvd"]
    assert clamavdb.mirror_versions(dest) == {"other": 2}


def test_a_missing_cvd_is_a_refusal(tmp_path: Path, sigtool: None) -> None:
    (tmp_path / "up").mkdir()
    with pytest.raises(DatabaseError, match=r"daily\.cvd: missing; fix: let cvdupdate"):
        clamavdb.publish(tmp_path / "up", tmp_path / "served", ["daily"], UPSTREAM)
    assert clamavdb.read_index(tmp_path / "served")["upstream"]["refusals"] == 1


def test_an_older_or_changed_version_is_refused(tmp_path: Path, files: Path, sigtool: None) -> None:
    dest = tmp_path / "served"
    clamavdb.publish(upstream_dir(tmp_path / "up", 4), dest, ["test"], UPSTREAM)
    before = snapshot(dest)
    with pytest.raises(DatabaseError, match="version 3 is older than the served 4"):
        clamavdb.publish(upstream_dir(tmp_path / "up", 3), dest, ["test"], UPSTREAM)
    source = upstream_dir(tmp_path / "up", 4)
    flip(source / "test.cvd")
    with pytest.raises(DatabaseError, match="version 4 is already served with other contents"):
        clamavdb.publish(source, dest, ["test"], UPSTREAM)
    assert snapshot(dest)["test.cvd"] == before["test.cvd"]


def test_a_gap_in_the_cdiffs_serves_the_cvd_alone(
    tmp_path: Path, files: Path, sigtool: None
) -> None:
    dest = tmp_path / "served"
    clamavdb.publish(upstream_dir(tmp_path / "up", 1), dest, ["test"], UPSTREAM)
    clamavdb.publish(upstream_dir(tmp_path / "up", 3, range(2, 4)), dest, ["test"], UPSTREAM)
    assert served_files(dest) == ["index.json", "test-2.cdiff", "test-3.cdiff", "test.cvd"]
    source = upstream_dir(tmp_path / "up", 6, [4, 6])  # test-5.cdiff never came
    assert clamavdb.publish(source, dest, ["test"], UPSTREAM) == {"test": 6}
    # The CDIFFs up to 3 lead nowhere now; freshclam downloads the whole CVD instead.
    assert served_files(dest) == ["index.json", "test.cvd"]
    assert clamavdb.read_index(dest)["databases"]["test"]["cdiffs"] == {}
    assert (dest / "test.cvd").read_bytes() == (files / "test-6.cvd").read_bytes()


def test_publish_keeps_only_the_newest_cdiffs(
    tmp_path: Path, files: Path, sigtool: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_mirror, "KEEP_CDIFFS", 2)
    dest = tmp_path / "served"
    clamavdb.publish(upstream_dir(tmp_path / "up", 1), dest, ["test"], UPSTREAM)
    clamavdb.publish(upstream_dir(tmp_path / "up", 4, range(2, 5)), dest, ["test"], UPSTREAM)
    assert served_files(dest) == ["index.json", "test-3.cdiff", "test-4.cdiff", "test.cvd"]
    clamavdb.publish(upstream_dir(tmp_path / "up", 6, range(2, 7)), dest, ["test"], UPSTREAM)
    assert served_files(dest) == ["index.json", "test-5.cdiff", "test-6.cdiff", "test.cvd"]
    assert sorted(clamavdb.read_index(dest)["databases"]["test"]["cdiffs"]) == [
        "test-5.cdiff",
        "test-6.cdiff",
    ]


# --- index.json ---------------------------------------------------------------------------

GOOD_ENTRY = {"version": 3, "sha256": "a" * 64, "size": 10, "built": "", "sigs": 1, "cdiffs": {}}


@pytest.mark.parametrize(
    "document",
    [
        b'{"format": 1, "databases": {"test": {"version": 3',  # truncated
        b"[]",
        b'{"format": 2, "databases": {}}',
        b'{"format": 1}',
        json.dumps({"format": 1, "databases": {"test": {**GOOD_ENTRY, "version": "3"}}}).encode(),
        json.dumps({"format": 1, "databases": {"test": {**GOOD_ENTRY, "sha256": "x"}}}).encode(),
        json.dumps({"format": 1, "databases": {"../x": GOOD_ENTRY}}).encode(),
        json.dumps(
            {"format": 1, "databases": {"test": {**GOOD_ENTRY, "cdiffs": {"../x": "a" * 64}}}}
        ).encode(),
        # a version that would have a pull count ten billion CDIFFs (seen: MemoryError)
        json.dumps({"format": 1, "databases": {"test": {**GOOD_ENTRY, "version": 10**10}}})
        .encode(),
        json.dumps({"format": 1, "databases": {"test": {**GOOD_ENTRY, "size": 1 << 40}}})
        .encode(),
    ],
    ids=[
        "truncated", "list", "format-2", "no-databases", "version-str", "sha", "name", "cdiff",
        "huge-version", "huge-size",
    ],
)  # fmt: skip
def test_read_index_refuses_a_malformed_index(tmp_path: Path, document: bytes) -> None:
    (tmp_path / "index.json").write_bytes(document)
    with pytest.raises(DatabaseError, match=r"index\.json: malformed index"):
        clamavdb.read_index(tmp_path)


def test_read_index_of_an_empty_directory(tmp_path: Path) -> None:
    assert clamavdb.read_index(tmp_path) == {}
    assert clamavdb.mirror_versions(tmp_path) == {}
    (tmp_path / "index.json").write_text(json.dumps({"format": 1, "databases": {"t": GOOD_ENTRY}}))
    assert clamavdb.mirror_versions(tmp_path) == {"t": 3}


# --- pull ---------------------------------------------------------------------------------


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single byte ranges (freshclam reads a CVD's header with Range)."""

    requests: list[tuple[str, str]]  # (path, Range) of each GET, for the test to read

    def log_message(self, *args: Any) -> None:
        pass

    def send_head(self) -> Any:
        spec = self.headers.get("Range", "")
        self.requests.append((self.path, spec))
        path = Path(self.translate_path(self.path))
        if not spec.startswith("bytes=") or not path.is_file():
            return super().send_head()
        first, _, last = spec[len("bytes=") :].partition("-")
        data = path.read_bytes()
        start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        return io.BytesIO(data[start : end + 1])


@pytest.fixture
def requests() -> list[tuple[str, str]]:
    return []


@pytest.fixture
def goc(tmp_path: Path, requests: list[tuple[str, str]]) -> Iterator[tuple[Path, str]]:
    """A served directory behind HTTP at <url>/clamav, as the GOC's nginx serves it."""
    root = tmp_path / "www"
    (root / "clamav").mkdir(parents=True)

    class Handler(RangeHandler):
        pass

    Handler.requests = requests

    def handler(*args: Any, **kwargs: Any) -> RangeHandler:
        return Handler(*args, directory=str(root), **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root / "clamav", f"http://127.0.0.1:{server.server_address[1]}/clamav"
    server.shutdown()
    server.server_close()
    thread.join(5)


def rewrite_index(served: Path, **changes: Any) -> None:
    index = json.loads((served / "index.json").read_text())
    index["databases"]["test"].update(changes)
    (served / "index.json").write_text(json.dumps(index))


def test_pull_mirrors_the_goc_and_copies_its_upstream(
    tmp_path: Path, goc: tuple[Path, str], sigtool: None
) -> None:
    served, url = goc
    upstream = {**UPSTREAM, "cooldown_until": 5000.0, "last_error": "HTTP 429"}
    clamavdb.publish(upstream_dir(tmp_path / "up", 3), served, ["test"], upstream)
    mirror = tmp_path / "mirror"
    assert clamavdb.pull(url, mirror, ["test"]) == {"test": 3}
    clamavdb.publish(upstream_dir(tmp_path / "up", 6, range(2, 7)), served, ["test"], upstream)
    assert clamavdb.pull(url + "/", mirror, ["test"]) == {"test": 6}
    assert served_files(mirror) == served_files(served)
    for name in served_files(served):
        if name != "index.json":
            assert (mirror / name).read_bytes() == (served / name).read_bytes(), name
    goc_index, our_index = clamavdb.read_index(served), clamavdb.read_index(mirror)
    assert our_index["databases"] == goc_index["databases"]
    assert our_index["upstream"] == goc_index["upstream"] == {**upstream, "refusals": 0}
    before = snapshot(mirror)
    clamavdb.pull(url, mirror, ["test"])
    assert snapshot(mirror) == before


def _mirror_at_3(tmp_path: Path, served: Path, url: str) -> tuple[Path, dict[str, Any]]:
    clamavdb.publish(upstream_dir(tmp_path / "up", 3), served, ["test"], UPSTREAM)
    mirror = tmp_path / "mirror"
    clamavdb.pull(url, mirror, ["test"])
    clamavdb.publish(upstream_dir(tmp_path / "up", 6, range(2, 7)), served, ["test"], UPSTREAM)
    return mirror, snapshot(mirror)


def test_pull_refuses_a_file_whose_hash_is_not_the_index(
    tmp_path: Path, goc: tuple[Path, str], sigtool: None
) -> None:
    served, url = goc
    mirror, before = _mirror_at_3(tmp_path, served, url)
    rewrite_index(served, sha256="0" * 64)
    with pytest.raises(DatabaseError, match=rf"{url}/test\.cvd: refused: sha256 [0-9a-f]+ is not"):
        clamavdb.pull(url, mirror, ["test"])
    assert snapshot(mirror)["test.cvd"] == before["test.cvd"]
    assert clamavdb.mirror_versions(mirror) == {"test": 3}
    assert served_files(mirror) == ["index.json", "test.cvd"]


@pytest.mark.parametrize("name", ["test.cvd", "test-5.cdiff"])
def test_pull_refuses_a_file_whose_signature_fails(
    tmp_path: Path, goc: tuple[Path, str], sigtool: None, name: str
) -> None:
    served, url = goc
    mirror, before = _mirror_at_3(tmp_path, served, url)
    flip(served / name)  # the GOC's disk rotted after publishing: the index's hash follows it
    digest = _mirror._sha256(served / name)
    if name == "test.cvd":
        rewrite_index(served, sha256=digest)
    else:
        entry = clamavdb.read_index(served)["databases"]["test"]
        rewrite_index(served, cdiffs={**entry["cdiffs"], name: digest})
    with pytest.raises(DatabaseError, match=rf"{url}/{name}: refused: sigtool"):
        clamavdb.pull(url, mirror, ["test"])
    assert served_files(mirror) == ["index.json", "test.cvd"]
    if name == "test.cvd":  # the mirror keeps what it had
        assert snapshot(mirror)["test.cvd"] == before["test.cvd"]
        assert clamavdb.mirror_versions(mirror) == {"test": 3}
    else:  # the signed CVD is served alone, without the broken chain
        assert snapshot(mirror)["test.cvd"][0] == (served / "test.cvd").read_bytes()
        assert clamavdb.mirror_versions(mirror) == {"test": 6}


@pytest.mark.parametrize(
    ("index", "match"),
    [
        (b'{"format": 1, "databases": {"te', r"/index\.json: malformed index"),
        (None, r"/index\.json: HTTP 404"),
        (b"{" * (2 << 20), r"/index\.json: larger than"),
    ],
    ids=["truncated", "absent", "huge"],
)
def test_pull_refuses_a_bad_index_and_keeps_the_mirror(
    tmp_path: Path, goc: tuple[Path, str], sigtool: None, index: bytes | None, match: str
) -> None:
    served, url = goc
    mirror, before = _mirror_at_3(tmp_path, served, url)
    if index is None:
        (served / "index.json").unlink()
    else:
        (served / "index.json").write_bytes(index)
    with pytest.raises(DatabaseError, match=match):
        clamavdb.pull(url, mirror, ["test"])
    assert snapshot(mirror) == before


def test_pull_names_an_unreachable_goc(tmp_path: Path) -> None:
    with pytest.raises(
        DatabaseError, match=r"http://127\.0\.0\.1:9/clamav/index\.json: unreachable"
    ):
        clamavdb.pull("http://127.0.0.1:9/clamav", tmp_path / "mirror", ["test"], timeout_s=5)
    assert not (tmp_path / "mirror").exists() or not any((tmp_path / "mirror").iterdir())


def test_pull_refuses_a_database_the_goc_does_not_serve(
    tmp_path: Path, goc: tuple[Path, str], sigtool: None
) -> None:
    served, url = goc
    clamavdb.publish(upstream_dir(tmp_path / "up", 3), served, ["test"], UPSTREAM)
    with pytest.raises(DatabaseError, match="does not serve daily"):
        clamavdb.pull(url, tmp_path / "mirror", ["test", "daily"])
    assert clamavdb.mirror_versions(tmp_path / "mirror") == {"test": 3}


# --- freshclam against a published directory ---------------------------------------------


@pytest.mark.integration
def test_freshclam_updates_from_a_published_directory_with_its_cdiffs(
    tmp_path: Path, goc: tuple[Path, str], requests: list[tuple[str, str]], sigtool: None
) -> None:
    freshclam = shutil.which("freshclam")
    if freshclam is None:
        needs.missing("freshclam (Debian's clamav-freshclam package)")
    served, url = goc
    clamavdb.publish(upstream_dir(tmp_path / "up", 3), served, ["test"], UPSTREAM)
    clamavdb.publish(upstream_dir(tmp_path / "up", 6, range(2, 7)), served, ["test"], UPSTREAM)
    scanner = tmp_path / "scanner"
    scanner.mkdir()
    shutil.copyfile(ensure() / "test-3.cvd", scanner / "test.cvd")
    config = tmp_path / "freshclam.conf"
    config.write_text(
        f"DatabaseMirror {url}\nDNSDatabaseInfo no\nScriptedUpdates yes\n"
        f"DatabaseDirectory {scanner}\nDatabaseOwner root\nUpdateLogFile {tmp_path}/fc.log\n"
        "ExcludeDatabase main\nExcludeDatabase daily\nExcludeDatabase bytecode\n"
        "ExtraDatabase test\n"
    )
    done = subprocess.run(
        [freshclam, "--no-dns", f"--config-file={config}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = done.stdout + done.stderr
    assert "test.cld updated (version: 6" in out, out
    # The CDIFFs did it: test.cvd was only asked for its header (a Range), never downloaded.
    assert [(p, r) for p, r in requests if p == "/clamav/test.cvd"] == [
        ("/clamav/test.cvd", "bytes=0-511")
    ]
    cdiffs = [p for p, _ in requests if p.endswith(".cdiff")]
    assert cdiffs == ["/clamav/test-4.cdiff", "/clamav/test-5.cdiff", "/clamav/test-6.cdiff"]
    assert clamavdb.live_versions(scanner) == {"test": 6}


# --- the command --------------------------------------------------------------------------


def test_upstream_state_from_cvdupdates_state_file(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text(
        json.dumps(
            {
                "dbs": {
                    "main.cvd": {"retry after": 0},
                    "daily.cvd": {"retry after": 9000.5},
                    "other.cvd": {"retry after": 99999.0},  # not ours: ignored
                },
                "uuid": "x",
            }
        )
    )
    up = upstream_state(["main", "daily"], state, 3, now=1000.0)
    assert up["last_check"] == 1000.0 and "last_ok" not in up
    assert up["cooldown_until"] == 9000.5
    assert "cvdupdate exited with status 3" in up["last_error"]
    assert "asked to wait until" in up["last_error"]
    assert upstream_state(["main"], state, 0, now=1000.0) == {
        "last_check": 1000.0,
        "last_ok": 1000.0,
        "cooldown_until": 0.0,
        "last_error": "",
    }
    broken = upstream_state(["main"], tmp_path / "absent.json", 0, now=5.0)
    assert "cvdupdate's state is unreadable" in broken["last_error"]


def test_cli_publish_then_status(
    tmp_path: Path, sigtool: None, capsys: pytest.CaptureFixture[str]
) -> None:
    source = upstream_dir(tmp_path / "up", 3)
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"dbs": {"test.cvd": {"retry after": 0}}}))
    dest = tmp_path / "served"
    argv = ["clamavdb", "publish", "--source", str(source), "--dest", str(dest)]
    argv += ["--databases", "test", "--cvdupdate-state", str(state), "--cvdupdate-rc", "0"]
    assert cli.main(argv) == 0
    assert f"{dest}: serving test 3" in capsys.readouterr().out
    assert cli.main(["clamavdb", "status", str(dest)]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["live"] == {"test": 3}
    assert status["databases"]["test"]["version"] == 3
    assert status["upstream"]["last_ok"] > 0 and status["upstream"]["refusals"] == 0
    shutil.copyfile(ensure() / "test-4.cvd", source / "test.cvd")
    flip(source / "test.cvd")
    assert cli.main(argv) == 1
    assert "refused" in capsys.readouterr().err
    assert clamavdb.read_index(dest)["upstream"]["refusals"] == 1
