"""The controller's prerequisites: every program the project calls is listed with the package
that brings it, that package is in requirements-apt.txt, and the lab checks both before it
starts and after it builds its base image."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from mailtower.controller.lab import lxc, prereqs

ROOT = Path(__file__).resolve().parents[2]
RUNNERS = {"run", "Popen", "check_output", "check_call", "_run"}


def _called_programs() -> dict[str, str]:
    """Programs the code starts with a literal argv (subprocess, the lab's _run) or looks up
    with shutil.which, each with one file that does."""
    found: dict[str, str] = {}
    files = [*ROOT.glob("src/**/*.py"), *ROOT.glob("tests/**/*.py"), ROOT / "tasks.py"]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            first = node.args[0]
            if name in RUNNERS and isinstance(first, ast.List | ast.Tuple) and first.elts:
                first = first.elts[0]
            elif name != "which":
                continue
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                found.setdefault(first.value, str(path.relative_to(ROOT)))
    return found


def test_every_program_the_code_calls_is_listed():
    listed = {p.name for p in prereqs.PROGRAMS} | prereqs.ESSENTIAL
    called = _called_programs()
    assert "lxc-create" in called and "named" in called  # the scan sees real calls
    unlisted = {name: where for name, where in called.items() if name not in listed}
    assert not unlisted, f"add these to mailtower.controller.lab.prereqs.PROGRAMS: {unlisted}"


def test_every_listed_package_is_installed_by_the_bootstrap():
    wanted = set(prereqs.apt_requirements())
    absent = sorted({p.package for p in prereqs.PROGRAMS} - wanted)
    assert not absent, f"requirements-apt.txt lacks {absent}"


def test_requirements_are_read_as_the_bootstrap_reads_them(tmp_path):
    path = tmp_path / "req.txt"
    path.write_text("# a comment\nlxc\n\n  rsync  \n# another\n")
    assert prereqs.apt_requirements(path) == ["lxc", "rsync"]


def test_missing_programs_are_named_with_package_and_fix():
    programs = (
        prereqs.Program("lxc-create", "lxc", "creates the base"),
        prereqs.Program("rsync", "rsync", "copies the cache"),
        prereqs.Program("/nonexistent/*/tool", "toolpkg", "a file by pattern"),
    )
    absent = prereqs.missing(programs=programs, which=lambda n: "/bin/x" if n == "rsync" else None)
    assert [p.name for p in absent] == ["lxc-create", "/nonexistent/*/tool"]
    text = prereqs.explain(absent, listed=["lxc"])
    assert "lxc-create (package lxc): creates the base" in text
    # A package the project never installs is the project's bug, and the message says so.
    assert "add toolpkg to requirements-apt.txt" in text
    assert "make bootstrap" in prereqs.explain(absent[:1], listed=["lxc"])


def test_missing_filters_by_use():
    programs = (
        prereqs.Program("a-lab-tool", "p", "x", ("lab",)),
        prereqs.Program("a-test-tool", "q", "y", ("tests",)),
    )
    absent = prereqs.missing("tests", programs=programs, which=lambda n: None)
    assert [p.name for p in absent] == ["a-test-tool"]


def test_the_lab_refuses_to_start_without_its_programs(monkeypatch):
    gone = prereqs.Program("rsync", "rsync", "the Debian template copies its cached root")
    monkeypatch.setattr(prereqs, "missing", lambda use=None, **kw: [gone])
    with pytest.raises(lxc.LabError) as err:
        lxc.ensure_controller(lambda text: None)
    text = str(err.value)
    assert "check the lab's prerequisites" in text and "rsync (package rsync)" in text
    assert "fix: run `make bootstrap`" in text


def test_base_problems_name_the_missing_package(tmp_path):
    for rel, _package in lxc.BASE_FILES:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    assert lxc.base_problems(tmp_path) == []
    (tmp_path / "usr/bin/python3").unlink()
    assert lxc.base_problems(tmp_path) == ["usr/bin/python3 missing (package python3)"]


def test_a_base_built_without_python_is_destroyed_and_the_cache_flushed(tmp_path, monkeypatch):
    """The Debian template's apt step fails silently: the base lacks python3. The lab must
    say so at once and leave neither the base nor the template's cache behind."""
    lxc_dir, cache = tmp_path / "lxc", tmp_path / "cache"
    (cache / "rootfs-bookworm-amd64").mkdir(parents=True)
    monkeypatch.setattr(lxc, "LXC_DIR", lxc_dir)
    monkeypatch.setattr(lxc, "TEMPLATE_CACHE", cache)
    monkeypatch.setattr(lxc, "flush_template_cache", _flush_into(cache))

    def fake_run(args, host, step, fix, **kwargs):
        assert args[0] == "lxc-create"
        rootfs = lxc_dir / "mt-base" / "rootfs"
        for rel in ("usr/sbin/sshd", "etc/ssl/certs/ca-certificates.crt"):  # no python3
            (rootfs / rel).parent.mkdir(parents=True, exist_ok=True)
            (rootfs / rel).write_text("")
        (lxc_dir / "mt-base" / "config").write_text("")
        return ""

    destroyed = []
    monkeypatch.setattr(lxc, "_run", fake_run)
    monkeypatch.setattr(lxc, "_destroy", lambda name: destroyed.append(name))
    with pytest.raises(lxc.LabError) as err:
        lxc.ensure_base(lambda text: None)
    assert "usr/bin/python3 missing (package python3)" in str(err.value)
    assert "check the new base image" in str(err.value)
    assert destroyed == ["mt-base"]
    assert not cache.exists()


def _flush_into(cache: Path):
    real = lxc.flush_template_cache

    def flush(progress, cache_arg=cache):
        real(progress, cache_arg)

    return flush


def test_flush_template_cache_removes_it(tmp_path):
    cache = tmp_path / "debian"
    (cache / "partial-bookworm-amd64").mkdir(parents=True)
    said: list[str] = []
    lxc.flush_template_cache(said.append, cache)
    assert not cache.exists() and "removed the Debian template's cache" in said[0]
    lxc.flush_template_cache(said.append, cache)  # nothing there: nothing said
    assert len(said) == 1


def test_the_pristine_probe_looks_inside_the_root_only(tmp_path):
    """The probe finds a program only in the pristine root, never on this machine: a pattern
    such as /usr/lib/*/c_icap/… must not be expanded against the host's own files."""
    import subprocess

    from mailtower.controller.lab import pristine

    programs = (
        prereqs.Program("lxc-create", "lxc", "x"),
        prereqs.Program("ls", "coreutils", "on this machine, not in the root"),
        prereqs.Program("/usr/lib/*/c_icap/virus_scan.so", "libc-icap-mod-virus-scan", "y"),
        prereqs.Program("/usr/lib/*/nothing.so", "nothing", "z"),
    )
    tool = tmp_path / "usr/bin/lxc-create"
    tool.parent.mkdir(parents=True)
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    module = tmp_path / "usr/lib/x86_64-linux-gnu/c_icap/virus_scan.so"
    module.parent.mkdir(parents=True)
    module.write_text("")
    out = subprocess.run(
        ["sh", "-c", pristine.probe(tmp_path, programs)], capture_output=True, text=True
    ).stdout
    assert pristine.found_programs(out) == {"lxc-create", "/usr/lib/*/c_icap/virus_scan.so"}


def test_a_bad_base_takes_its_clones_down_first(tmp_path, monkeypatch):
    """The base's root is the lower layer of every clone: removing it under running clones
    breaks them, so the clones go first."""
    lxc_dir = tmp_path / "lxc"
    (lxc_dir / "mt-base" / "rootfs").mkdir(parents=True)
    (lxc_dir / "mt-base" / "config").write_text("")
    (lxc_dir / "mt-a-relay").mkdir()
    monkeypatch.setattr(lxc, "LXC_DIR", lxc_dir)
    order: list[str] = []

    def destroy(name):
        order.append(name)
        shutil.rmtree(lxc_dir / name, ignore_errors=True)

    monkeypatch.setattr(lxc, "_destroy", destroy)

    def stop(*args, **kwargs):
        raise lxc.LabError("mt-base", "lxc-create", "stop here")

    monkeypatch.setattr(lxc, "_run", stop)
    monkeypatch.setattr(lxc, "flush_template_cache", lambda progress: None)
    with pytest.raises(lxc.LabError):
        lxc.ensure_base(lambda text: None)
    assert order[:2] == ["mt-a-relay", "mt-base"]
