"""The hosts' wheel: built as the deploy builds it, without the controller's code, and its CLI
still starts (the controller's commands are simply absent)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration  # builds a wheel (hatchling, a few seconds)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(out), str(ROOT)],
        check=True,
    )  # fmt: skip
    (found,) = out.glob("mailtower-*.whl")
    return found


def test_the_wheel_has_every_host_package_and_no_controller_code(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("mailtower/controller/")]
    for package in (
        "scanning",
        "scand",
        "monitor",
        "relay",
        "goc/eye",
        "goc/sync",
        "bundles",
        "clamavdb",
    ):
        assert f"mailtower/{package}/__init__.py" in names, package
    assert "mailtower/scanning/rules/skeptic/" in "".join(names)  # package data travels too


def test_the_hosts_cli_starts_without_the_controller(wheel: Path, tmp_path: Path) -> None:
    zipfile.ZipFile(wheel).extractall(tmp_path)
    probe = (
        "import mailtower, mailtower.cli as c;"
        "assert mailtower.__file__.startswith(%r), mailtower.__file__;"
        "p = c.build_parser();"
        "print(sorted(p._subparsers._group_actions[0].choices))" % str(tmp_path)
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    commands = done.stdout
    assert "'quarantine'" in commands and "'scan'" in commands and "'sync'" in commands
    assert "'clamavdb'" in commands
    assert "'dns'" not in commands  # the controller's command, not on a host
