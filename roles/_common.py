"""What every role shares: its typed settings from the inventory, templates, the wheelhouse.

A role reads as three stages: ``install()`` (users, the mailtower wheel, packages beyond its
``PACKAGES``, which the deploy installs for every host at once), ``configure()`` (files,
returning the operations that wrote them) and ``activate()`` (services, each checked and
restarted only when its files changed).
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from gevent.lock import Semaphore
from pydantic import BaseModel
from pyinfra import host, inventory
from pyinfra.api.exceptions import DeployError
from pyinfra.facts.files import File
from pyinfra.operations import files, server, systemd

from mailtower.controller.inventory import TOWER_GROUPS, tower_settings
from mailtower.errors import SettingsError
from mailtower.settings import TowerSettings, validate

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "templates"
VENV = "/opt/mailtower/venv"
WHEELHOUSE_REMOTE = "/opt/mailtower/wheelhouse"
SETTINGS_REMOTE = "/etc/mailtower/tower.json"


def address(h) -> str:
    """A host's address on the tower network: its ``address`` data, else its inventory name."""
    return str(h.data.get("address") or h.name)


def _group(name: str) -> list:
    try:
        return list(inventory.get_group(name))
    except Exception as exc:  # pyinfra raises a bare NoGroupError
        raise DeployError(
            f"inventory has no group {name!r}: a tower inventory defines relay, monitor, "
            f"sql (primary, standby) and scanners (see inventory/example_tower.py)"
        ) from exc


def settings() -> TowerSettings:
    """The tower's settings: inventory topology plus the ``mailtower`` data of the hosts."""
    data = dict(host.data.get("mailtower") or {})
    if not data:
        raise DeployError(f"{host.name}: host data has no 'mailtower' settings (see inventory/)")
    addresses = {g: [address(h) for h in _group(g)] for g in TOWER_GROUPS}
    try:
        return tower_settings(data, addresses)
    except SettingsError as exc:
        raise DeployError(f"{host.name}: {exc}") from exc


M = TypeVar("M", bound=BaseModel)


def host_settings(model: type[M], key: str, example: str) -> M:
    """Host data ``key`` as ``model`` (e.g. GocSettings), validated before the role changes
    anything; DeployError naming the host and each bad field (``example``: an inventory
    that gives it)."""
    data = host.data.get(key)
    if not data:
        raise DeployError(f"{host.name}: host data has no {key!r} settings (see {example})")
    try:
        return validate(model, data, f"{key!r} host data")
    except SettingsError as exc:
        raise DeployError(f"{host.name}: {exc}") from exc


def barrier(phase: str) -> None:
    """Order the deploy across hosts: nothing after this runs anywhere before everything
    before it ran everywhere.

    pyinfra orders operations by merging each host's sequence; an operation every host calls
    from one call site joins those sequences. It is skipped, so it never reports a change.
    Call it unconditionally, from one line, for every host.
    """
    server.shell(name=f"Wait for every host: {phase}", commands=["true"], _if=lambda: False)


def changes(ops) -> Callable[[], bool]:
    """A condition for ``_if``: did any of these operations change something?"""
    return lambda: any(op.did_change() for op in ops)


def activate(
    service: str,
    changed: Callable[[], bool],
    *,
    check: str | None = None,
    reload: bool = False,
    daemon_reload: bool = False,
    oneshot: bool = False,
) -> None:
    """Apply a service's new configuration: check it with the program itself, then restart
    (or reload) only when something changed; keep it enabled and running either way."""
    if check:
        # Refuse to restart on a configuration the program itself finds wrong.
        server.shell(
            name=f"Check the {service} configuration ({check.split()[0]})",
            commands=[check],
            _if=changed,
        )
    systemd.service(
        name=f"{'Reload' if reload else 'Restart'} {service}",
        service=service,
        running=True,
        enabled=True,
        restarted=not reload,
        reloaded=reload,
        daemon_reload=daemon_reload,
        _if=changed,
    )
    # A oneshot unit (nftables) has done its work and exited: enabled is all it can be.
    systemd.service(
        name=f"Ensure {service} is {'enabled' if oneshot else 'running'}",
        service=service,
        enabled=True,
        running=None if oneshot else True,
    )


def activate_nftables(changed: Callable[[], bool]) -> None:
    """Load the host's /etc/nftables.conf when it changed, and at boot."""
    activate("nftables", changed, check="nft -c -f /etc/nftables.conf", oneshot=True)


NODE_EXPORTER = "prometheus-node-exporter"  # every tower host's PACKAGES lists it


def node_exporter_config():
    """The node exporter's flags: this host's metrics on its tower address, for the monitor."""
    return template(f"common/etc/default/{NODE_EXPORTER}", address=address(host))


def activate_node_exporter(changed: Callable[[], bool]) -> None:
    activate(NODE_EXPORTER, changed)


def is_primary() -> bool:
    return address(host) == str(settings().sql_primary)


def template(path: str, dest: str | None = None, **data):
    """Render templates/<path>.j2 to /<path> (templates mirror their destination)."""
    dest = dest or "/" + path.split("/", 1)[1]
    return files.template(
        name=f"Render {dest}",
        src=str(TEMPLATES / f"{path}.j2"),
        dest=dest,
        settings=settings(),
        **data,
    )


def put_text(text: str, dest: str, mode: str = "644", user: str = "root", group: str = "root"):
    """Upload generated text; a change only when the content differs."""
    return files.put(
        name=f"Upload {dest}",
        src=io.BytesIO(text.encode()),
        dest=dest,
        mode=mode,
        user=user,
        group=group,
    )


_wheelhouse_lock = Semaphore()  # pyinfra prepares hosts in greenlets: build once, not per host


@functools.cache
def _build_wheelhouse() -> Path:
    out = ROOT / "build" / "wheelhouse"
    out.mkdir(parents=True, exist_ok=True)
    # Dependencies are fetched only when pyproject.toml changes.
    stamp = out / ".pyproject.sha256"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text() != digest:
        for old in out.glob("*.whl"):
            old.unlink()
        _pip(["wheel", "--quiet", "--wheel-dir", str(out), str(ROOT)])
        stamp.write_text(digest)
    for old in out.glob("mailtower-*.whl"):
        old.unlink()
    # hatchling builds reproducible wheels: unchanged code gives a byte-identical file, so an
    # unchanged tower uploads nothing and restarts nothing.
    _pip(
        [
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(out),
            str(ROOT),
        ]
    )
    return out


def _pip(args: list[str]) -> None:
    env = {**os.environ, "SOURCE_DATE_EPOCH": "315532800"}
    done = subprocess.run(
        [sys.executable, "-m", "pip", *args], capture_output=True, text=True, env=env
    )
    if done.returncode != 0:
        raise DeployError(
            f"controller: building the wheelhouse failed (pip {args[0]}):\n{done.stderr[-2000:]}"
        )


def install_stack():
    """Install mailtower into a venv from the wheelhouse (hosts need no PyPI).

    The wheelhouse travels as one reproducible tar: one upload to compare instead of one per
    wheel, which keeps a no-change deploy of 25 hosts fast.
    """
    tarball = wheelhouse_tar()
    upload = files.put(
        name=f"Upload {WHEELHOUSE_REMOTE}.tar", src=str(tarball), dest=f"{WHEELHOUSE_REMOTE}.tar"
    )
    missing = host.get_fact(File, path=f"{VENV}/bin/mailtower") is None
    return server.shell(
        name=f"Install mailtower into {VENV} from the wheelhouse",
        commands=[
            f"rm -rf {WHEELHOUSE_REMOTE} && mkdir -p {WHEELHOUSE_REMOTE}"
            f" && tar -xf {WHEELHOUSE_REMOTE}.tar -C {WHEELHOUSE_REMOTE}",
            f"test -x {VENV}/bin/python || python3 -m venv {VENV}",
            f"{VENV}/bin/pip install --quiet --no-index --find-links {WHEELHOUSE_REMOTE} "
            f"--force-reinstall --no-deps {WHEELHOUSE_REMOTE}/mailtower-*.whl",
            f"{VENV}/bin/pip install --quiet --no-index --find-links {WHEELHOUSE_REMOTE} mailtower",
        ],
        _if=lambda: missing or upload.did_change(),
    )


def wheelhouse_tar() -> Path:
    """The wheelhouse as a tar with fixed order, owners and times (same wheels, same bytes)."""
    with _wheelhouse_lock:
        return _build_tar(_build_wheelhouse())


def pinned_wheelhouse_tar(name: str, requirements: Path) -> Path:
    """A tool's own wheelhouse as a reproducible tar: exactly the pins of ``requirements``
    (every dependency listed there too), built on the controller like the mailtower one."""
    with _wheelhouse_lock:
        return _build_tar(_build_pinned(name, requirements))


@functools.cache
def _build_pinned(name: str, requirements: Path) -> Path:
    out = ROOT / "build" / f"wheelhouse-{name}"
    out.mkdir(parents=True, exist_ok=True)
    stamp = out / ".requirements.sha256"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text() != digest:
        for old in out.glob("*.whl"):
            old.unlink()
        # --no-deps: a dependency missing from the pins fails at the host's --no-index install
        # instead of arriving unpinned.
        _pip(["wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), "-r", str(requirements)])
        stamp.write_text(digest)
    return out


@functools.cache
def _build_tar(directory: Path) -> Path:
    out = directory.with_suffix(".tar")
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for wheel in sorted(directory.glob("*.whl")):
            info = tar.gettarinfo(str(wheel), arcname=wheel.name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 315532800, 0, 0, "", ""
            info.mode = 0o644
            with open(wheel, "rb") as f:
                tar.addfile(info, f)
    return out


def write_settings(role: str):
    """/etc/mailtower/tower.json: the settings model the daemons load, with only ``role``'s
    share of the secrets (the relay's orderer its SQL password; scand its SQL password and
    the canary secret)."""
    files.directory(name="Ensure /etc/mailtower", path="/etc/mailtower", mode="755")
    return put_text(settings_text(role), SETTINGS_REMOTE, mode="640", group="mailtower")


def settings_text(role: str) -> str:
    """What write_settings(role) writes to SETTINGS_REMOTE."""
    return settings().for_role(role).model_dump_json(indent=2) + "\n"


def service_user():
    server.user(
        name="Ensure user mailtower",
        user="mailtower",
        system=True,
        home="/var/lib/mailtower",
        shell="/usr/sbin/nologin",
        ensure_home=False,
    )
