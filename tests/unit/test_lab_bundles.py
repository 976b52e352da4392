"""Publishing at the GOC from the controller (mailtower.controller.lab.bundles), with the GOC's
commands run by a local shell: upload, version choice, build, publish, and the errors it names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from bundle_builders import PROBE_RULE, Keys, make_keys, rules_copy

from mailtower import bundles
from mailtower.controller.errors import PublishError, StepFailed
from mailtower.controller.lab.bundles import GocPaths, next_version, publish_at_goc


def _local_shell(command: str, stdin: bytes) -> str:
    done = subprocess.run(["bash", "-c", command], input=stdin, capture_output=True)
    if done.returncode != 0:
        raise StepFailed(done.returncode, (done.stderr or done.stdout).decode().strip())
    return done.stdout.decode().strip()


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path / "keys")


@pytest.fixture
def paths(tmp_path: Path, keys: Keys) -> GocPaths:
    return GocPaths(
        mailtower=f"{sys.executable} -m mailtower.cli",
        key_dir=str(keys.private_path.parent),
        publish_dir=str(tmp_path / "srv"),
    )


def _publish(rules: Path, paths: GocPaths, version: int | None = None) -> int:
    return publish_at_goc(rules, version, shell=_local_shell, host="goc-test", paths=paths)


def test_publishes_the_next_version(tmp_path: Path, keys: Keys, paths: GocPaths) -> None:
    rules = rules_copy(tmp_path / "rules")
    assert _publish(rules, paths) == 1
    (rules / "yara" / "probe.yar").write_text(PROBE_RULE)
    assert _publish(rules, paths) == 2
    latest = bundles.read_latest(Path(paths.publish_dir))
    assert latest is not None and latest.version == 2
    bundle = bundles.verify(Path(paths.publish_dir) / latest.file, keys.public)
    assert "yara/probe.yar" in bundle.files
    assert _publish(rules, paths, version=10) == 10
    assert list(Path("/tmp").glob("mailtower-publish.*")) == []  # work directories removed


def test_a_version_not_newer_is_refused_before_building(tmp_path: Path, paths: GocPaths) -> None:
    rules = rules_copy(tmp_path / "rules")
    _publish(rules, paths, version=3)
    with pytest.raises(PublishError, match="version 3 is not newer than version 3"):
        _publish(rules, paths, version=3)


def test_failures_name_host_step_and_fix(tmp_path: Path, paths: GocPaths) -> None:
    rules = rules_copy(tmp_path / "rules")
    (rules / "yara" / "broken.yar").write_text("rule broken {\n  condition: nope\n}\n")
    with pytest.raises(PublishError) as exc:
        _publish(rules, paths)
    message = str(exc.value)
    assert message.startswith("GOC goc-test: building bundle version 1 failed (1): ")
    assert "broken.yar" in message and "fix the rules it names" in message
    assert bundles.read_latest(Path(paths.publish_dir)) is None

    no_keys = GocPaths(paths.mailtower, str(tmp_path / "nokeys"), paths.publish_dir)
    with pytest.raises(PublishError, match="deploy the GOC with bundle keys"):
        _publish(rules_copy(tmp_path / "rules2"), no_keys)


def test_a_directory_without_rules_is_refused_on_the_controller(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(PublishError, match="controller: .* holds no rule files"):
        publish_at_goc(tmp_path / "empty", shell=_local_shell)


def test_next_version() -> None:
    latest = bundles.parse_latest(
        b'{"version": 4, "file": "rules-4.tar.gz", "sha256": "%s", "size": 9,'
        b' "published_at": "2025-01-31T12:00:00Z", "key_id": "0123456789abcdef"}' % (b"a" * 64)
    )
    assert next_version(None, None) == 1
    assert next_version(latest, None) == 5
    assert next_version(latest, 7) == 7
    with pytest.raises(PublishError, match="give a version above 4"):
        next_version(latest, 4)
