"""``mailtower bundle``: the contract other tools depend on (arguments, exit codes, output)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from bundle_builders import PROBE_RULE, make_keys, repack, replace_member, rules_copy

from mailtower.cli import main

Capsys = pytest.CaptureFixture[str]


@pytest.fixture
def keydir(tmp_path: Path, capsys: Capsys) -> Path:
    assert main(["bundle", "keygen", "--out", str(tmp_path / "keys")]) == 0
    capsys.readouterr()
    return tmp_path / "keys"


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    return rules_copy(tmp_path / "rules")


def _build(tmp_path: Path, keydir: Path, rules: Path, version: int) -> Path:
    out = tmp_path / f"rules-{version}.tar.gz"
    argv = ["bundle", "build", str(rules), "--key", str(keydir / "signing.key")]
    assert main([*argv, "--version", str(version), "-o", str(out)]) == 0
    return out


def _verify(bundle: Path, keydir: Path, *extra: str) -> int:
    return main(["bundle", "verify", str(bundle), "--pubkey", str(keydir / "signing.pub"), *extra])


def test_keygen_writes_the_pair(tmp_path: Path, capsys: Capsys) -> None:
    out = tmp_path / "new" / "keys"
    assert main(["bundle", "keygen", "--out", str(out)]) == 0
    assert stat.S_IMODE((out / "signing.key").stat().st_mode) == 0o600
    assert (out / "signing.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert "key id " in capsys.readouterr().out
    assert main(["bundle", "keygen", "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err


def test_build_and_verify(tmp_path: Path, keydir: Path, rules: Path, capsys: Capsys) -> None:
    bundle = _build(tmp_path, keydir, rules, 3)
    captured = capsys.readouterr()
    assert f"{bundle}: bundle version 3" in captured.out
    assert "not bundled: yara/README.md" in captured.err
    assert _verify(bundle, keydir) == 0
    assert "OK: bundle version 3" in capsys.readouterr().out
    assert _verify(bundle, keydir, "--current", "2") == 0
    capsys.readouterr()
    assert _verify(bundle, keydir, "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and doc["version"] == 3
    assert "yara/test_files.yar" in doc["files"]


@pytest.mark.parametrize("current", ["3", "4"])
def test_verify_refuses_a_bundle_not_newer_than_current(
    tmp_path: Path, keydir: Path, rules: Path, capsys: Capsys, current: str
) -> None:
    bundle = _build(tmp_path, keydir, rules, 3)
    capsys.readouterr()
    assert _verify(bundle, keydir, "--current", current) == 1
    err = capsys.readouterr().err
    assert err.startswith("mailtower bundle verify: refused (not-newer): ")
    assert f"not newer than version {current}" in err


def test_verify_refusals_print_the_reason(
    tmp_path: Path, keydir: Path, rules: Path, capsys: Capsys
) -> None:
    bundle = _build(tmp_path, keydir, rules, 1)
    other = make_keys(tmp_path / "other")
    tampered = repack(bundle, tmp_path / "t.tar.gz", replace_member("yara/scripts.yar", b"x"))
    unsigned = repack(
        bundle,
        tmp_path / "u.tar.gz",
        lambda found: [m for m in found if m[0].name != "manifest.sig"],
    )
    capsys.readouterr()
    cases = [
        (tampered, "refused (tampered)", "yara/scripts.yar"),
        (unsigned, "refused (unsigned)", "not signed"),
        (tmp_path / "missing.tar.gz", "refused (malformed)", "cannot read"),
    ]
    for path, what, reason in cases:
        assert _verify(path, keydir) == 1, path
        err = capsys.readouterr().err
        assert what in err and reason in err, err
    argv = ["bundle", "verify", str(bundle), "--pubkey", str(other.public_path), "--json"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert (doc["ok"], doc["refused"]) == (False, "foreign-key")
    assert "not by the key this tower trusts" in doc["reason"]
    assert doc["reason"] in captured.err


def test_build_refuses_rules_that_do_not_compile(
    tmp_path: Path, keydir: Path, rules: Path, capsys: Capsys
) -> None:
    (rules / "yara" / "broken.yar").write_text("rule broken {\n  condition: nope\n}\n")
    out = tmp_path / "b.tar.gz"
    argv = ["bundle", "build", str(rules), "--key", str(keydir / "signing.key")]
    assert main([*argv, "--version", "1", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "refused (invalid-rules): yara: " in err and "yara/broken.yar(2)" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["bundle"],
        ["bundle", "keygen"],
        ["bundle", "build", "rules", "--key", "k", "-o", "f"],  # no --version
        ["bundle", "build", "rules", "--key", "k", "--version", "0", "-o", "f"],
        ["bundle", "build", "rules", "--key", "k", "--version", "two", "-o", "f"],
        ["bundle", "verify", "f.tar.gz"],  # no --pubkey
        ["bundle", "verify", "f.tar.gz", "--pubkey", "p", "--current", "x"],
        ["bundle", "install", "f.tar.gz", "--pubkey", "p"],  # no --rules-root
        ["bundle", "rollback"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: Capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_unreadable_public_key_exits_2(
    tmp_path: Path, keydir: Path, rules: Path, capsys: Capsys
) -> None:
    bundle = _build(tmp_path, keydir, rules, 1)
    capsys.readouterr()
    assert main(["bundle", "verify", str(bundle), "--pubkey", str(tmp_path / "nope.pub")]) == 2
    assert "failed (key-file)" in capsys.readouterr().err


def test_install_status_rollback(tmp_path: Path, keydir: Path, rules: Path, capsys: Capsys) -> None:
    root = tmp_path / "root"
    pub = str(keydir / "signing.pub")
    v1 = _build(tmp_path, keydir, rules, 1)
    (rules / "yara" / "probe.yar").write_text(PROBE_RULE)
    v2 = _build(tmp_path, keydir, rules, 2)
    capsys.readouterr()

    assert main(["bundle", "install", str(v1), "--pubkey", pub, "--rules-root", str(root)]) == 0
    assert main(["bundle", "install", str(v2), "--pubkey", pub, "--rules-root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "bundle version 2 installed (version 1 kept for rollback)" in out
    assert os.readlink(root / "current") == "versions/2"

    assert main(["bundle", "install", str(v1), "--pubkey", pub, "--rules-root", str(root)]) == 1
    assert "refused (not-newer)" in capsys.readouterr().err
    assert os.readlink(root / "current") == "versions/2"

    assert main(["bundle", "status", "--rules-root", str(root), "--json"]) == 0
    state = json.loads(capsys.readouterr().out)
    assert (state["current"], state["previous"]) == (2, 1)

    assert main(["bundle", "rollback", "--rules-root", str(root)]) == 0
    assert "back to bundle version 1 (removed: 2)" in capsys.readouterr().out
    assert os.readlink(root / "current") == "versions/1"
    assert main(["bundle", "rollback", "--rules-root", str(root)]) == 1
    assert "failed (install)" in capsys.readouterr().err
    assert main(["bundle", "status", "--rules-root", str(root)]) == 0
    assert "current 1, kept for rollback none" in capsys.readouterr().out
