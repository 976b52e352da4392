"""What scand runs and what is installed: the digest a rolling upgrade compares.

The deploy installs a new mailtower wheel (and a new /etc/mailtower/tower.json) on a running
scanner without restarting scand; scand's /health then names two digests, ``stack`` (what this
process started with) and ``stack_installed`` (what a restart would run). The monitor restarts
each scanner whose two differ in a drained window of its own (mailtower.monitor.rollout.stack),
asking it with ``POST /stack/restart``: scand answers, then stops gracefully, and systemd
starts it again (``Restart=always``) with what is installed.

What the engines (clamd, c-icap) would start with is part of the digest too (scand.engines):
a new engine configuration or new engine packages are applied by the same roll, the engines
restarted as root before scand starts again (scand's unit, ``ExecStartPre=+``).

What is installed is not ready to roll (``stack_installed`` null, ``stack_pending`` saying why,
``pending()``) while a deploy writes it (the scanner role's marker, ``DEPLOYING``: wheel,
settings and units are written one operation at a time) or while systemd has not loaded the unit
files on disk (``NeedDaemonReload``): a restart then would start the old unit while the digest
names the new one, and the scanner would never be behind again. A scand started while systemd
had not loaded its unit names a running digest that differs from every installed one.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mailtower.scand import engines

if TYPE_CHECKING:
    from mailtower.settings import TowerSettings

DIST = "mailtower"
# scand's unit: a new one (limits, environment) takes effect on the roll's restart too
UNIT = Path("/etc/systemd/system/mailtower-scand.service")
# Written by the scanner role while it changes what is installed (roles/scanner.py)
DEPLOYING = Path("/var/lib/mailtower/deploy-in-progress")
# The units whose files are part of the digest (scand's and the engines' drop-ins)
UNITS = ("mailtower-scand.service", "clamav-daemon.service", "c-icap.service")
SYSTEMCTL = "/usr/bin/systemctl"
RELOAD_CACHE_S = 2.0  # /health is asked every few seconds; systemctl show costs a fork
# The last POST /stack/restart scand accepted (its time), in scand's spool directory
RESTARTED = "stack-restart"


def digest(
    settings_path: Path | None,
    unit: Path = UNIT,
    engine_files: Sequence[Path] | None = None,
    *,
    units_loaded: bool = True,
) -> str | None:
    """The installed wheel (its RECORD: every file with its hash), the settings file,
    scand's systemd unit and what the engines start with (engines.digest), as 16 hex digits;
    None when the wheel's record cannot be read. ``units_loaded=False`` (systemd had not loaded
    the unit files on disk) gives a digest no installed stack has."""
    try:
        record = importlib.metadata.distribution(DIST).read_text("RECORD")
    except importlib.metadata.PackageNotFoundError:
        record = None
    if record is None:
        return None
    h = hashlib.sha256(record.encode())
    for path in (settings_path, unit):
        try:
            h.update(b"\0" + (path.read_bytes() if path is not None else b""))
        except OSError:
            h.update(b"\0-")  # absent (a scand outside systemd, a test)
    h.update(b"\0" + engines.digest(engine_files).encode())
    if not units_loaded:
        h.update(b"\0units not loaded by systemd")
    return h.hexdigest()[:16]


def _systemctl_show(units: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SYSTEMCTL, "show", "-p", "NeedDaemonReload", "--value", *units],
        capture_output=True,
        text=True,
        timeout=5,
        check=False,
    )


_reload_seen: tuple[float, bool] | None = None


def need_daemon_reload(
    run: Callable[[Sequence[str]], subprocess.CompletedProcess[str]] = _systemctl_show,
) -> bool:
    """Whether systemd has yet to load a unit file (or drop-in) of UNITS changed on disk;
    asked at most every RELOAD_CACHE_S. False where systemd cannot say (no systemd: a test)."""
    global _reload_seen
    now = time.monotonic()
    if _reload_seen is not None and now - _reload_seen[0] < RELOAD_CACHE_S:
        return _reload_seen[1]
    try:
        done = run(UNITS)
        need = done.returncode == 0 and "yes" in done.stdout.split()
    except (OSError, subprocess.SubprocessError):
        need = False
    _reload_seen = (now, need)
    return need


def pending(deploying: Path | None = None) -> str | None:
    """Why what is installed is not ready to roll, or None when it is."""
    deploying = DEPLOYING if deploying is None else deploying
    if deploying.exists():
        return f"a deploy is writing what is installed ({deploying} exists)"
    if need_daemon_reload():
        return "systemd has not loaded the changed unit files yet (daemon-reload)"
    return None


def running_digest(settings_path: Path | None) -> str | None:
    """What a scand starting now runs: digest(), marked when systemd started it from unit
    files it had not loaded (so that it is behind once they are)."""
    return digest(settings_path, units_loaded=not need_daemon_reload())


def restart_cooldown_s(settings: TowerSettings) -> float:
    """How long after a restart scand refuses another: systemd's RestartSec (the scand unit's
    formula) and the monitor's wait for it to come back (upgrade.restart_timeout_s)."""
    restart_sec = int(settings.limits.fail_after * settings.limits.health_interval_s + 3)
    return float(restart_sec + settings.upgrade.restart_timeout_s)


def restart_self() -> None:
    """Stop this scand gracefully (SIGTERM: in-flight messages finish); systemd's
    ``Restart=always`` starts it again with what is installed."""
    os.kill(os.getpid(), signal.SIGTERM)
