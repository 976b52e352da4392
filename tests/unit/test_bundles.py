"""Signed rule bundles: build, every refusal, install, rollback (mailtower.bundles)."""

from __future__ import annotations

import gzip
import json
import os
import stat
import tarfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import needs
import pytest
from bundle_builders import (
    PROBE_RULE,
    Keys,
    Member,
    make_keys,
    member,
    members,
    repack,
    replace_member,
    rule_files,
    rules_copy,
    signed_bundle,
    snapshot,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailtower import bundles
from mailtower.bundles import _clamav, _format
from mailtower.scanning.rules import RuleDirs

CREATED = datetime(2025, 1, 31, 12, 0, tzinfo=UTC)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path / "keys")


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    return rules_copy(tmp_path / "rules")


@pytest.fixture
def v1(tmp_path: Path, keys: Keys, rules: Path) -> Path:
    out = tmp_path / "rules-1.tar.gz"
    bundles.build(rules, keys.private, 1, out, created=CREATED)
    return out


# -- build and read ------------------------------------------------------------------------------


def test_build_then_verify_round_trip(v1: Path, keys: Keys, rules: Path) -> None:
    bundle = bundles.verify(v1, keys.public)
    assert bundle.version == 1
    assert bundle.manifest.created == "2025-01-31T12:00:00Z"
    assert bundle.manifest.key_id == bundles.key_id(keys.public)
    assert bundle.files == rule_files(rules)
    assert {name.split("/")[0] for name in bundle.files} == set(bundles.SECTIONS)
    doc = json.loads(bundle.manifest_bytes)
    assert doc["format"] == bundles.FORMAT_VERSION
    assert doc["files"]["clamav/mailtower-test.ndb"]["size"] == len(
        (rules / "clamav" / "mailtower-test.ndb").read_bytes()
    )


def test_build_is_deterministic(tmp_path: Path, keys: Keys, rules: Path, v1: Path) -> None:
    again = tmp_path / "again.tar.gz"
    bundles.build(rules, keys.private, 1, again, created=CREATED)
    assert again.read_bytes() == v1.read_bytes()
    assert v1.read_bytes()[4:8] == b"\0\0\0\0"  # gzip MTIME
    found = members(v1)
    names = [info.name for info, _ in found]
    assert names[:2] == ["manifest.json", "manifest.sig"]
    assert names[2:] == sorted(names[2:])
    for info, _ in found:
        assert (info.mtime, info.uid, info.gid, info.mode, info.uname) == (0, 0, 0, 0o644, "")
        assert info.isreg()


def test_build_leaves_out_what_is_not_a_rule_file(tmp_path: Path, keys: Keys, rules: Path) -> None:
    (rules / "skeptic" / "notes.txt").write_text("not rules")
    (rules / "yara" / "sub").mkdir()
    (rules / "build.sh").write_text("#!/bin/sh\n")  # outside the sections: ignored silently
    built = bundles.build(rules, keys.private, 1, tmp_path / "b.tar.gz")
    assert "yara/README.md" in built.skipped
    assert {"skeptic/notes.txt", "yara/sub"} <= set(built.skipped)
    assert not any("build.sh" in name for name in [*built.skipped, *built.manifest.files])
    assert all(_format.rule_file_name(name) for name in built.manifest.files)


@pytest.mark.parametrize(
    ("name", "content", "section"),
    [
        ("yara/broken.yar", b"rule Broken { condition: nope }\n", "yara"),
        (
            "skeptic/zz-broken.toml",
            b"[[rule]]\nid = 'skeptic.x.y'\nseverity = 'info'\nkind = 'no-such-kind'\n",
            "skeptic",
        ),
        ("reputation/broken.sha256", b"not-a-digest Some.Name\n", "reputation"),
    ],
)
def test_build_refuses_rules_that_do_not_load(
    tmp_path: Path, keys: Keys, rules: Path, name: str, content: bytes, section: str
) -> None:
    (rules / name).write_bytes(content)
    out = tmp_path / "b.tar.gz"
    with pytest.raises(bundles.InvalidRules) as exc:
        bundles.build(rules, keys.private, 1, out)
    assert str(exc.value).startswith(f"{section}: ")
    assert name.split("/")[1] in str(exc.value)
    assert str(tmp_path) not in str(exc.value)  # bundle names, not temp paths
    assert not out.exists()


def test_build_refuses_an_empty_rules_directory(tmp_path: Path, keys: Keys) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(bundles.InvalidRules, match="yara: no .yar"):
        bundles.build(tmp_path / "empty", keys.private, 1, tmp_path / "b.tar.gz")


@pytest.mark.parametrize("version", [0, -1, True])
def test_build_refuses_a_bad_version(tmp_path: Path, keys: Keys, rules: Path, version: int) -> None:
    with pytest.raises(bundles.BundleError, match="positive integer"):
        bundles.build(rules, keys.private, version, tmp_path / "b.tar.gz")


# -- refusals ------------------------------------------------------------------------------------


def _without(name: str) -> Callable[[list[Member]], list[Member]]:
    return lambda found: [(info, data) for info, data in found if info.name != name]


def _with(extra: Member) -> Callable[[list[Member]], list[Member]]:
    return lambda found: [*found, extra]


def test_unsigned_bundle_is_refused(tmp_path: Path, v1: Path, keys: Keys) -> None:
    bad = repack(v1, tmp_path / "bad.tar.gz", _without("manifest.sig"))
    with pytest.raises(bundles.UnsignedBundle, match="not signed"):
        bundles.read(bad, keys.public)
    empty = repack(v1, tmp_path / "empty.tar.gz", replace_member("manifest.sig", b""))
    with pytest.raises(bundles.UnsignedBundle):
        bundles.read(empty, keys.public)


def test_bundle_signed_by_another_key_is_refused(
    tmp_path: Path, keys: Keys, rules: Path, v1: Path
) -> None:
    other = make_keys(tmp_path / "other")
    foreign = tmp_path / "foreign.tar.gz"
    bundles.build(rules, other.private, 2, foreign)
    with pytest.raises(bundles.ForeignKeyBundle) as exc:
        bundles.read(foreign, keys.public)
    assert bundles.key_id(other.public) in str(exc.value)
    assert bundles.key_id(keys.public) in str(exc.value)
    bundles.read(foreign, other.public)  # the same bundle with the right key: accepted
    # Our manifest with another key's signature (claiming our key): the signature is wrong.
    forged_sig = other.private.sign(members(v1)[0][1])
    forged = repack(v1, tmp_path / "forged.tar.gz", replace_member("manifest.sig", forged_sig))
    with pytest.raises(bundles.TamperedBundle, match="does not match its signature"):
        bundles.read(forged, keys.public)


def _edited_manifest(found: list[Member]) -> list[Member]:
    (info, data), rest = found[0], found[1:]
    doc = json.loads(data)
    doc["version"] = 99
    return [(info, json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"), *rest]


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (replace_member("yara/scripts.yar", b"rule x { condition: true }\n"), "yara/scripts.yar"),
        (_with(member("yara/extra.yar", b"rule e { condition: false }\n")), "does not list"),
        (_with(member("notes.txt", b"hello")), "does not list: notes.txt"),
        (_without("skeptic/40-worms.toml"), "lacks files the manifest lists"),
        (_edited_manifest, "manifest.json does not match its signature"),
    ],
    ids=["file-changed", "extra-rule", "extra-file", "missing-file", "manifest-edited"],
)
def test_tampered_bundle_is_refused(
    tmp_path: Path,
    v1: Path,
    keys: Keys,
    edit: Callable[[list[Member]], list[Member]],
    reason: str,
) -> None:
    bad = repack(v1, tmp_path / "bad.tar.gz", edit)
    with pytest.raises(bundles.TamperedBundle, match=reason):
        bundles.read(bad, keys.public)


def test_same_size_change_is_found_by_hash(tmp_path: Path, v1: Path, keys: Keys) -> None:
    original = dict((info.name, data) for info, data in members(v1))["reputation/mailtower.sha256"]
    flipped = original[:-2] + (b"X" if original[-2:-1] != b"X" else b"Y") + original[-1:]
    assert len(flipped) == len(original)
    bad = repack(
        v1, tmp_path / "bad.tar.gz", replace_member("reputation/mailtower.sha256", flipped)
    )
    with pytest.raises(bundles.TamperedBundle, match="SHA-256"):
        bundles.read(bad, keys.public)


@pytest.mark.parametrize("current", [1, 2, 40])
def test_bundle_not_newer_than_current_is_refused(v1: Path, keys: Keys, current: int) -> None:
    with pytest.raises(bundles.StaleBundle, match=f"not newer than version {current}"):
        bundles.verify(v1, keys.public, current=current)


def test_bundle_newer_than_current_is_accepted(v1: Path, keys: Keys) -> None:
    assert bundles.verify(v1, keys.public, current=0).version == 1


@pytest.mark.parametrize(
    ("name", "content", "section", "where"),
    [
        ("yara/broken.yar", b"rule Broken {\n condition: nope\n}\n", "yara", "yara/broken.yar(2)"),
        ("skeptic/zz.toml", b"[[rule]\n", "skeptic", "zz.toml"),
        (
            "skeptic/zz.toml",
            b"[[rule]]\nid = 'skeptic.a.b'\nseverity = 'hostile'\nkind = 'nope'\n",
            "skeptic",
            "nope",
        ),
        ("reputation/x.tlsh", b"T1ZZ Family\n", "reputation", "reputation/x.tlsh:1"),
    ],
)
def test_signed_bundle_whose_rules_do_not_load_is_refused(
    tmp_path: Path, keys: Keys, rules: Path, name: str, content: bytes, section: str, where: str
) -> None:
    files = {**rule_files(rules), name: content}
    bad = signed_bundle(tmp_path / "bad.tar.gz", keys.private, files)
    bundles.read(bad, keys.public)  # authentic and intact…
    with pytest.raises(bundles.InvalidRules) as exc:  # …but it does not load
        bundles.verify(bad, keys.public)
    assert str(exc.value).startswith(f"{section}: ")
    assert where in str(exc.value)


def test_bundle_without_yara_or_skeptic_rules_is_refused(
    tmp_path: Path, keys: Keys, rules: Path
) -> None:
    for section in ("yara", "skeptic"):
        files = {n: d for n, d in rule_files(rules).items() if not n.startswith(section + "/")}
        bad = signed_bundle(tmp_path / f"no-{section}.tar.gz", keys.private, files)
        with pytest.raises(bundles.InvalidRules, match=f"^{section}: "):
            bundles.verify(bad, keys.public)


@pytest.mark.parametrize("use_clamscan", [True, False], ids=["clamscan", "parser"])
def test_clamav_database_that_does_not_load_is_refused(
    tmp_path: Path,
    keys: Keys,
    rules: Path,
    use_clamscan: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if use_clamscan and _clamav.find_clamscan() is None:
        needs.missing("clamscan is not installed")
    if not use_clamscan:
        monkeypatch.setattr(_clamav, "find_clamscan", lambda: None)
    good = signed_bundle(tmp_path / "good.tar.gz", keys.private, rule_files(rules))
    bundles.verify(good, keys.public)
    files = {**rule_files(rules), "clamav/local.ndb": b"Local.Sig:0:*:4142434\n"}
    bad = signed_bundle(tmp_path / "bad.tar.gz", keys.private, files)
    with pytest.raises(bundles.InvalidRules, match="^clamav: .*local.ndb"):
        bundles.verify(bad, keys.public)


# What libclamav itself accepts (0) or refuses: the fallback parser must agree on each line.
CLAMAV_LINES = [
    ("a.ndb", "Local.A:0:*:414243", True),
    ("a.ndb", "Local.A:0:*:41424344:73", True),
    ("a.ndb", "Local.A:0:*:41{2}4243", True),
    ("a.ndb", "Local.A:0:*:(41|42)434445", True),
    ("a.ndb", "Local.A:0:*:4142434?", True),
    ("a.ndb", "Local.A:0:*:41[1-2]424344", True),
    ("a.ndb", "Local.A:1:EOF-10:AABBCC", True),
    ("a.ndb", "Local.A:0:*:4142434", False),  # odd number of digits
    ("a.ndb", "Local.A:0:*:4142434G", False),
    ("a.ndb", "Local.A:0:*:4142", False),  # too short
    ("a.ndb", "Local.A:0:*:41*424344", False),  # a part of one byte
    ("a.ndb", "Local.A:0:*", False),
    ("a.ndb", "", False),  # libclamav refuses empty lines
    ("a.hdb", "44d88612fea8a8f36de82e1278abb02f:68:Local.H", True),
    ("a.hdb", "44d88612fea8a8f36de82e1278abb02:68:Local.H", False),
    ("a.hdb", "44d88612fea8a8f36de82e1278abb02f:68", False),
    ("a.hsb", "275a021bbfb6489e54d471899f7db9d1663fc695ec2fe2a2c4538aabf651fd0f:68:Local.S", True),
]


@pytest.mark.parametrize(("name", "line", "valid"), CLAMAV_LINES)
def test_clamav_parser_agrees_with_libclamav(
    tmp_path: Path, name: str, line: str, valid: bool
) -> None:
    content = f"Local.First:0:*:5a5a5a5a\n{line}\n" if name.endswith(".ndb") else f"{line}\n"
    data = content.encode()
    if valid:
        _clamav.check_file(name, data)
    else:
        with pytest.raises(bundles.InvalidRules, match=name):
            _clamav.check_file(name, data)
    clamscan = _clamav.find_clamscan()
    if clamscan is None:
        return
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / name).write_bytes(data)
    if valid:
        _clamav.check_directory(tmp_path / "db")
    else:
        with pytest.raises(bundles.InvalidRules, match="ClamAV does not load"):
            _clamav.check_directory(tmp_path / "db")


def test_clamav_ldb_needs_clamscan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_clamav, "find_clamscan", lambda: None)
    with pytest.raises(bundles.InvalidRules, match="only be checked by clamscan"):
        _clamav.check_file("x.ldb", b"Local.L;Engine:51-255,Target:0;0;414243\n")


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (member("yara/link.yar", kind=tarfile.SYMTYPE, link="/etc/passwd"), "symbolic link"),
        (member("yara/hard.yar", kind=tarfile.LNKTYPE, link="yara/scripts.yar"), "hard link"),
        (member("yara/sub", kind=tarfile.DIRTYPE), "directory"),
        (member("clamav/fifo.ndb", kind=tarfile.FIFOTYPE), "tar type"),
        (member("../escape.yar", b"x"), "outside the bundle"),
        (member("yara/../../escape.yar", b"x"), "outside the bundle"),
        (member("/etc/cron.d/evil", b"x"), "outside the bundle"),
        (member("yara/scripts.yar", b"rule dup { condition: true }"), "appears twice"),
    ],
    ids=["symlink", "hardlink", "dir", "fifo", "dotdot", "nested-dotdot", "absolute", "duplicate"],
)
def test_unsafe_member_is_refused(
    tmp_path: Path, v1: Path, keys: Keys, extra: Member, reason: str
) -> None:
    bad = repack(v1, tmp_path / "bad.tar.gz", _with(extra))
    with pytest.raises(bundles.UnsafeBundle, match=reason):
        bundles.read(bad, keys.public)


def test_member_claiming_a_huge_size_is_refused_before_reading(tmp_path: Path, keys: Keys) -> None:
    info = tarfile.TarInfo("reputation/huge.sha256")
    info.size = 100 * 1024**3  # 100 GiB claimed, a few bytes present
    raw = info.tobuf(format=tarfile.GNU_FORMAT) + b"x" * 512
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(gzip.compress(raw))
    with pytest.raises(bundles.UnsafeBundle, match="over the limit"):
        bundles.read(bad, keys.public)


@pytest.mark.parametrize(
    ("limit", "value", "reason"),
    [
        ("MAX_FILE_BYTES", 100, "over the limit of 100"),
        ("MAX_TOTAL_BYTES", 10_000, "more than 10000 bytes"),
        ("MAX_MEMBERS", 5, "more than 5 members"),
        ("MAX_BUNDLE_BYTES", 1000, "over the limit of 1000"),
    ],
)
def test_absurd_sizes_are_refused(
    v1: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch, limit: str, value: int, reason: str
) -> None:
    monkeypatch.setattr(_format, limit, value)
    with pytest.raises(bundles.UnsafeBundle, match=reason):
        bundles.read(v1, keys.public)


def test_unsafe_name_listed_in_a_signed_manifest_is_refused(
    tmp_path: Path, keys: Keys, rules: Path
) -> None:
    files = rule_files(rules)
    listed = {**files, "yara/../../etc/x.yar": b"x"}
    bad = signed_bundle(tmp_path / "bad.tar.gz", keys.private, files, listed=listed)
    with pytest.raises(bundles.MalformedBundle, match="not a rule file a bundle may hold"):
        bundles.read(bad, keys.public)


@pytest.mark.parametrize(
    "content",
    [b"", b"just text", gzip.compress(b"not a tar at all" * 100), b"\x1f\x8b\x08\x00garbage"],
    ids=["empty", "text", "gzip-not-tar", "corrupt-gzip"],
)
def test_not_a_bundle_is_refused(tmp_path: Path, keys: Keys, content: bytes) -> None:
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(content)
    with pytest.raises(bundles.MalformedBundle):
        bundles.read(bad, keys.public)


def test_missing_file_and_missing_manifest_are_refused(
    tmp_path: Path, v1: Path, keys: Keys
) -> None:
    with pytest.raises(bundles.MalformedBundle, match="cannot read"):
        bundles.read(tmp_path / "nope.tar.gz", keys.public)
    bad = repack(v1, tmp_path / "bad.tar.gz", _without("manifest.json"))
    with pytest.raises(bundles.MalformedBundle, match="no manifest.json"):
        bundles.read(bad, keys.public)


def test_unknown_format_version_is_refused(tmp_path: Path, v1: Path, keys: Keys) -> None:
    found = members(v1)
    doc = json.loads(found[0][1])
    doc["format"] = 2
    data = json.dumps(doc).encode()
    new_manifest = replace_member("manifest.json", data)
    new_signature = replace_member("manifest.sig", keys.private.sign(data))
    bad = repack(v1, tmp_path / "b.tar.gz", lambda found: new_signature(new_manifest(found)))
    with pytest.raises(bundles.MalformedBundle, match="format 2 is not supported"):
        bundles.read(bad, keys.public)


# -- keys ----------------------------------------------------------------------------------------


def test_keygen_modes_and_no_overwrite(tmp_path: Path, keys: Keys) -> None:
    assert stat.S_IMODE(keys.private_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(keys.public_path.stat().st_mode) == 0o644
    before = keys.private_path.read_bytes()
    with pytest.raises(bundles.KeyFileError, match="already exists"):
        bundles.keygen(keys.private_path.parent)
    assert keys.private_path.read_bytes() == before


def test_key_files_of_the_wrong_kind_are_refused(tmp_path: Path, keys: Keys) -> None:
    with pytest.raises(bundles.KeyFileError, match="private key"):
        bundles.load_signing_key(keys.public_path)
    with pytest.raises(bundles.KeyFileError, match="public key"):
        bundles.load_public_key(keys.private_path)
    rsa_pub = tmp_path / "rsa.pub"
    rsa_pub.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(bundles.KeyFileError, match="not an Ed25519"):
        bundles.load_public_key(rsa_pub)
    with pytest.raises(bundles.KeyFileError, match="cannot read"):
        bundles.load_public_key(tmp_path / "missing.pub")


# -- install and rollback ------------------------------------------------------------------------


def _build(tmp_path: Path, keys: Keys, rules: Path, version: int) -> Path:
    out = tmp_path / f"rules-{version}.tar.gz"
    bundles.build(rules, keys.private, version, out)
    return out


def test_install_then_rollback(tmp_path: Path, keys: Keys, rules: Path, v1: Path) -> None:
    root = tmp_path / "root"
    assert bundles.rule_dirs(root) == RuleDirs.packaged()  # nothing installed yet

    change = bundles.install(v1, keys.public, root)
    assert (change.version, change.previous) == (1, None)
    assert os.readlink(root / "current") == "versions/1"
    assert bundles.rule_dirs(root) == RuleDirs.under((root / "versions" / "1").resolve(), 1)
    assert (root / "versions" / "1" / "yara" / "scripts.yar").read_bytes() == (
        rules / "yara" / "scripts.yar"
    ).read_bytes()
    assert (root / "versions" / "1" / "manifest.sig").exists()

    (rules / "yara" / "probe.yar").write_text(PROBE_RULE)
    change = bundles.install(_build(tmp_path, keys, rules, 2), keys.public, root)
    assert (change.version, change.previous, change.removed) == (2, 1, ())
    assert (root / "versions" / "2" / "yara" / "probe.yar").exists()
    assert json.loads((root / "state.json").read_text())["current"] == 2

    change = bundles.install(_build(tmp_path, keys, rules, 5), keys.public, root)
    assert (change.version, change.previous, change.removed) == (5, 2, (1,))
    assert sorted(p.name for p in (root / "versions").iterdir()) == ["2", "5"]
    assert bundles.status(root)["current"] == 5 and bundles.status(root)["previous"] == 2

    change = bundles.rollback(root)
    assert (change.version, change.removed) == (2, (5,))
    assert os.readlink(root / "current") == "versions/2"
    state = json.loads((root / "state.json").read_text())
    assert (state["action"], state["current"]) == ("rollback", 2)
    assert bundles.installed(root) == bundles.Installed(2, (root / "versions" / "2").resolve())

    with pytest.raises(bundles.InstallError, match="no version before 2"):
        bundles.rollback(root)
    # The version rolled back from may come again (it is newer than 2)…
    assert bundles.install(tmp_path / "rules-5.tar.gz", keys.public, root).version == 5
    # …but never one older than the current.
    with pytest.raises(bundles.StaleBundle):
        bundles.install(v1, keys.public, root)


def _refusals(tmp_path: Path, keys: Keys, rules: Path, v1: Path) -> list[Path]:
    other = make_keys(tmp_path / "other")
    foreign = tmp_path / "foreign.tar.gz"
    bundles.build(rules, other.private, 9, foreign)
    bad_rules = signed_bundle(
        tmp_path / "bad-rules.tar.gz",
        keys.private,
        {**rule_files(rules), "yara/zz.yar": b"rule x { condition: nope }"},
        version=9,
    )
    return [
        repack(v1, tmp_path / "unsigned.tar.gz", _without("manifest.sig")),
        foreign,
        repack(v1, tmp_path / "tampered.tar.gz", replace_member("yara/scripts.yar", b"")),
        repack(v1, tmp_path / "unsafe.tar.gz", _with(member("../x", b"x"))),
        v1,  # not newer than the installed version 1
        bad_rules,
    ]


def test_refused_install_changes_nothing(tmp_path: Path, keys: Keys, rules: Path, v1: Path) -> None:
    root = tmp_path / "root"
    bundles.install(v1, keys.public, root)
    before = snapshot(root)
    for bad in _refusals(tmp_path, keys, rules, v1):
        with pytest.raises(bundles.BundleError) as exc:
            bundles.install(bad, keys.public, root)
        assert not isinstance(exc.value, bundles.InstallError), bad.name
        assert snapshot(root) == before, bad.name


def test_refused_first_install_leaves_no_current(tmp_path: Path, keys: Keys, rules: Path) -> None:
    bad = signed_bundle(
        tmp_path / "bad.tar.gz",
        keys.private,
        {**rule_files(rules), "skeptic/zz.toml": b"[[rule]\n"},
    )
    root = tmp_path / "root"
    with pytest.raises(bundles.InvalidRules):
        bundles.install(bad, keys.public, root)
    assert bundles.installed(root) is None
    assert list((root / "versions").iterdir()) == []  # no staging left behind


def test_broken_rules_root_is_reported(tmp_path: Path, keys: Keys, v1: Path) -> None:
    root = tmp_path / "root"
    (root / "current").mkdir(parents=True)  # a directory where the link belongs
    with pytest.raises(bundles.InstallError, match="not a symbolic link"):
        bundles.install(v1, keys.public, root)
    (root / "current").rmdir()
    (root / "current").symlink_to("versions/7")
    with pytest.raises(bundles.InstallError, match="does not lead to an installed bundle"):
        bundles.rule_dirs(root)


def test_rollback_with_nothing_installed(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    with pytest.raises(bundles.InstallError, match="no bundle installed"):
        bundles.rollback(tmp_path / "root")


def test_bundle_repacked_by_another_tar_writer_is_accepted(
    tmp_path: Path, v1: Path, keys: Keys
) -> None:
    # The signature covers the manifest, the manifest the files: not the tar's own bytes.
    same = repack(v1, tmp_path / "same.tar.gz", lambda found: found)
    assert same.read_bytes() != v1.read_bytes()
    assert bundles.verify(same, keys.public).files == bundles.verify(v1, keys.public).files


# -- canary samples --------------------------------------------------------------------------------


def test_canary_samples_are_read_with_their_verdicts(v1: Path, keys: Keys) -> None:
    samples = bundles.canaries(bundles.read(v1, keys.public).files)
    assert [(c.name, c.expect) for c in samples] == [
        ("clean-hello.eml", "clean"),
        ("virus-eicar.eml", "virus"),
    ]


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("maybe-x.eml", b"Subject: x\r\n\r\nbody\r\n", "named <verdict>-<name>.eml"),
        ("virus-x.eml", b"no header line and no body", "not a message"),
        ("clean-big.eml", b"Subject: x\r\n\r\n" + b"x" * (1024 * 1024), "at most 1 MiB"),
    ],
)
def test_a_bundle_with_a_broken_canary_is_not_built(
    rules: Path, keys: Keys, tmp_path: Path, name: str, data: bytes, reason: str
) -> None:
    (rules / "canary" / name).write_bytes(data)
    with pytest.raises(bundles.InvalidRules, match=reason):
        bundles.build(rules, keys.private, 9, tmp_path / "rules-9.tar.gz")
    assert not (tmp_path / "rules-9.tar.gz").exists()
