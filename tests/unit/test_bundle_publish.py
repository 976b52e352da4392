"""Publishing bundles into a served directory (the GOC's, a monitor's mirror): latest.json,
refusals that change nothing, pruning, and ``mailtower bundle publish``."""

from __future__ import annotations

import hashlib
import json
import stat
import threading
from pathlib import Path

import pytest
from bundle_builders import (
    PROBE_RULE,
    Keys,
    make_keys,
    repack,
    replace_member,
    rule_files,
    rules_copy,
    signed_bundle,
    snapshot,
)

from mailtower import bundles
from mailtower.cli import main

Capsys = pytest.CaptureFixture[str]


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path / "keys")


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    return rules_copy(tmp_path / "rules")


def _built(tmp_path: Path, keys: Keys, rules: Path, version: int) -> Path:
    out = tmp_path / "built" / f"v{version}.tar.gz"
    out.parent.mkdir(exist_ok=True)
    bundles.build(rules, keys.private, version, out)
    return out


def _published(directory: Path) -> dict[str, str]:
    """The files a reader can see (hidden ones — the lock — are not served)."""
    return {k: v for k, v in snapshot(directory).items() if not k.startswith(".")}


def test_publish_writes_the_bundle_then_latest(tmp_path: Path, keys: Keys, rules: Path) -> None:
    source = _built(tmp_path, keys, rules, 3)
    directory = tmp_path / "srv" / "bundles"
    done = bundles.publish(source, keys.public, directory)

    assert done.version == 3 and done.path == directory / "rules-3.tar.gz"
    assert done.path.read_bytes() == source.read_bytes()
    doc = json.loads((directory / "latest.json").read_bytes())
    assert set(doc) == {"version", "file", "sha256", "size", "published_at", "key_id"}
    assert doc["version"] == 3 and doc["file"] == "rules-3.tar.gz"
    assert doc["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert doc["size"] == source.stat().st_size
    assert doc["key_id"] == bundles.key_id(keys.public)
    assert doc["published_at"].endswith("Z")
    assert bundles.read_latest(directory) == done.latest
    assert bundles.parse_latest((directory / "latest.json").read_bytes()) == done.latest
    for name in ("latest.json", "rules-3.tar.gz"):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o644, name
    assert stat.S_IMODE(directory.stat().st_mode) & 0o005 == 0o005  # others may list and read
    # What is published verifies as what latest.json says it is.
    assert bundles.verify(directory / doc["file"], keys.public).version == 3


def test_read_latest_of_an_empty_directory_is_none(tmp_path: Path) -> None:
    assert bundles.read_latest(tmp_path) is None


def test_newer_bundle_replaces_latest(tmp_path: Path, keys: Keys, rules: Path) -> None:
    directory = tmp_path / "pub"
    bundles.publish(_built(tmp_path, keys, rules, 1), keys.public, directory)
    (rules / "yara" / "probe.yar").write_text(PROBE_RULE)
    done = bundles.publish(_built(tmp_path, keys, rules, 2), keys.public, directory)
    assert done.removed == ()
    latest = bundles.read_latest(directory)
    assert latest is not None and latest.version == 2
    assert sorted(p.name for p in directory.glob("rules-*")) == ["rules-1.tar.gz", "rules-2.tar.gz"]


def _refused(tmp_path: Path, keys: Keys, rules: Path, v1: Path) -> list[tuple[Path, type]]:
    other = make_keys(tmp_path / "other")
    foreign = _built(tmp_path / "other", other, rules, 9)
    tampered = repack(
        _built(tmp_path, keys, rules, 8),
        tmp_path / "tampered.tar.gz",
        replace_member("yara/scripts.yar", b"rule x { condition: true }"),
    )
    bad_rules = signed_bundle(
        tmp_path / "bad.tar.gz", keys.private, {**rule_files(rules), "skeptic/zz.toml": b"[[r"}, 7
    )
    return [
        (v1, bundles.StaleBundle),  # the version published already (a replay)
        (foreign, bundles.ForeignKeyBundle),
        (tampered, bundles.TamperedBundle),
        (bad_rules, bundles.InvalidRules),
        (tmp_path / "missing.tar.gz", bundles.MalformedBundle),
    ]


def test_refused_publish_changes_nothing(tmp_path: Path, keys: Keys, rules: Path) -> None:
    directory = tmp_path / "pub"
    v2 = _built(tmp_path, keys, rules, 2)
    bundles.publish(v2, keys.public, directory)
    older = _built(tmp_path, keys, rules, 1)
    before = snapshot(directory)
    for bad, error in [(older, bundles.StaleBundle), *_refused(tmp_path, keys, rules, v2)]:
        with pytest.raises(error):
            bundles.publish(bad, keys.public, directory)
        assert snapshot(directory) == before, bad.name


def test_refused_first_publish_leaves_nothing_to_read(
    tmp_path: Path, keys: Keys, rules: Path
) -> None:
    other = make_keys(tmp_path / "other")
    directory = tmp_path / "pub"
    with pytest.raises(bundles.ForeignKeyBundle):
        bundles.publish(_built(tmp_path, other, rules, 1), keys.public, directory)
    assert bundles.read_latest(directory) is None
    assert _published(directory) == {}


def test_prune_keeps_the_newest(tmp_path: Path, keys: Keys, rules: Path) -> None:
    directory = tmp_path / "pub"
    for version in (1, 2, 3, 4):
        done = bundles.publish(
            _built(tmp_path, keys, rules, version), keys.public, directory, keep=2
        )
    assert done.removed == (2,)
    assert sorted(p.name for p in directory.glob("rules-*")) == ["rules-3.tar.gz", "rules-4.tar.gz"]


def test_prune_removes_what_an_interrupted_publish_left(
    tmp_path: Path, keys: Keys, rules: Path
) -> None:
    directory = tmp_path / "pub"
    bundles.publish(_built(tmp_path, keys, rules, 1), keys.public, directory)
    # A publish of 9 that died before latest.json, and one that died while checking.
    (directory / "rules-9.tar.gz").write_bytes(b"half")
    (directory / ".incoming-dead.tar.gz").write_bytes(b"half")
    done = bundles.publish(_built(tmp_path, keys, rules, 5), keys.public, directory)
    assert done.removed == (9,)
    assert sorted(_published(directory)) == ["latest.json", "rules-1.tar.gz", "rules-5.tar.gz"]
    assert not (directory / ".incoming-dead.tar.gz").exists()


def test_publish_refuses_a_bad_keep(tmp_path: Path, keys: Keys, rules: Path) -> None:
    with pytest.raises(bundles.BundleError, match="keep must be"):
        bundles.publish(_built(tmp_path, keys, rules, 1), keys.public, tmp_path / "pub", keep=0)


def test_concurrent_publishes_serialize(tmp_path: Path, keys: Keys, rules: Path) -> None:
    directory = tmp_path / "pub"
    built = [_built(tmp_path, keys, rules, v) for v in (1, 2, 3, 4)]
    errors: list[BaseException] = []

    def run(path: Path) -> None:
        try:
            bundles.publish(path, keys.public, directory)
        except bundles.StaleBundle as exc:  # a lower version that lost the race
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(path,)) for path in built]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    latest = bundles.read_latest(directory)
    assert latest is not None and latest.version == 4
    published = {int(p.name.split("-")[1].split(".")[0]) for p in directory.glob("rules-*")}
    # Each publish saw the one before it: every version either published or refused as stale.
    assert len(published) + len(errors) == 4 and 4 in published


def _latest_doc(**changes: object) -> bytes:
    doc: dict[str, object] = {
        "version": 7,
        "file": "rules-7.tar.gz",
        "sha256": "ab" * 32,
        "size": 1234,
        "published_at": "2025-01-31T12:00:00Z",
        "key_id": "0123456789abcdef",
    }
    doc.update(changes)
    return json.dumps({k: v for k, v in doc.items() if v is not None}).encode()


def test_parse_latest_accepts_a_good_document_and_ignores_extra_fields() -> None:
    latest = bundles.parse_latest(_latest_doc(comment="added by a newer GOC"))
    assert (latest.version, latest.file, latest.size) == (7, "rules-7.tar.gz", 1234)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "must be an object"),
        (_latest_doc(sha256=None), "lacks sha256"),
        (_latest_doc(version=0), "version must be a positive integer"),
        (_latest_doc(version=True), "version must be a positive integer"),
        (_latest_doc(version="7"), "version must be a positive integer"),
        (_latest_doc(file="../etc/passwd"), "file must be 'rules-7.tar.gz'"),
        (_latest_doc(file="sub/rules-7.tar.gz"), "file must be 'rules-7.tar.gz'"),
        (_latest_doc(file="rules-6.tar.gz"), "file must be 'rules-7.tar.gz'"),
        (_latest_doc(sha256="AB" * 32), "sha256 must be"),
        (_latest_doc(size=0), "size must be"),
        (_latest_doc(size=-1), "size must be"),
        (_latest_doc(published_at="yesterday"), "published_at must be"),
        (_latest_doc(key_id="xyz"), "key_id must be"),
    ],
)
def test_parse_latest_refuses_a_malformed_document(data: bytes, reason: str) -> None:
    with pytest.raises(bundles.MalformedBundle, match=reason):
        bundles.parse_latest(data)


def test_malformed_latest_in_the_directory_is_named_and_blocks_publishing(
    tmp_path: Path, keys: Keys, rules: Path
) -> None:
    directory = tmp_path / "pub"
    directory.mkdir()
    (directory / "latest.json").write_bytes(b"{")
    with pytest.raises(bundles.MalformedBundle, match=f"{directory}/latest.json is not JSON"):
        bundles.read_latest(directory)
    before = _published(directory)
    with pytest.raises(bundles.MalformedBundle):
        bundles.publish(_built(tmp_path, keys, rules, 1), keys.public, directory)
    assert _published(directory) == before


# -- mailtower bundle publish --------------------------------------------------------------------


def _cli(bundle: Path, keys: Keys, directory: Path, *extra: str) -> int:
    argv = ["bundle", "publish", str(bundle), "--pubkey", str(keys.public_path)]
    return main([*argv, "--dir", str(directory), *extra])


def test_cli_publish(tmp_path: Path, keys: Keys, rules: Path, capsys: Capsys) -> None:
    directory = tmp_path / "pub"
    v1, v2 = _built(tmp_path, keys, rules, 1), _built(tmp_path, keys, rules, 2)
    assert _cli(v1, keys, directory) == 0
    assert capsys.readouterr().out == f"published version 1 at {directory}\n"
    assert _cli(v2, keys, directory, "--keep", "1", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and doc["version"] == 2 and doc["file"] == "rules-2.tar.gz"
    assert sorted(p.name for p in directory.glob("rules-*")) == ["rules-2.tar.gz"]


def test_cli_refusals_exit_1_and_change_nothing(
    tmp_path: Path, keys: Keys, rules: Path, capsys: Capsys
) -> None:
    directory = tmp_path / "pub"
    v1 = _built(tmp_path, keys, rules, 1)
    assert _cli(v1, keys, directory) == 0
    before = snapshot(directory)
    capsys.readouterr()
    for bad, error in _refused(tmp_path, keys, rules, v1):
        assert _cli(bad, keys, directory) == 1, bad.name
        err = capsys.readouterr().err
        assert err.startswith(f"mailtower bundle publish: refused ({error.code}): "), err
        assert snapshot(directory) == before, bad.name
    assert _cli(v1, keys, directory, "--json") == 1
    doc = json.loads(capsys.readouterr().out)
    assert (doc["ok"], doc["refused"]) == (False, "not-newer")


@pytest.mark.parametrize(
    "argv",
    [
        ["bundle", "publish", "f.tar.gz", "--pubkey", "p"],  # no --dir
        ["bundle", "publish", "f.tar.gz", "--dir", "d"],  # no --pubkey
        ["bundle", "publish", "f.tar.gz", "--pubkey", "p", "--dir", "d", "--keep", "0"],
        ["bundle", "publish", "--pubkey", "p", "--dir", "d"],  # no file
    ],
)
def test_cli_usage_errors_exit_2(argv: list[str], capsys: Capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_cli_unreadable_public_key_exits_2(
    tmp_path: Path, keys: Keys, rules: Path, capsys: Capsys
) -> None:
    v1 = _built(tmp_path, keys, rules, 1)
    argv = ["bundle", "publish", str(v1), "--pubkey", str(tmp_path / "nope.pub")]
    assert main([*argv, "--dir", str(tmp_path / "pub")]) == 2
    assert "failed (key-file)" in capsys.readouterr().err
    assert not (tmp_path / "pub").exists()
