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
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import signal
from collections.abc import Sequence
from pathlib import Path

from mailtower.scand import engines

DIST = "mailtower"
# scand's unit: a new one (limits, environment) takes effect on the roll's restart too
UNIT = Path("/etc/systemd/system/mailtower-scand.service")


def digest(
    settings_path: Path | None, unit: Path = UNIT, engine_files: Sequence[Path] | None = None
) -> str | None:
    """The installed wheel (its RECORD: every file with its hash), the settings file,
    scand's systemd unit and what the engines start with (engines.digest), as 16 hex digits;
    None when the wheel's record cannot be read."""
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
    return h.hexdigest()[:16]


def restart_self() -> None:
    """Stop this scand gracefully (SIGTERM: in-flight messages finish); systemd's
    ``Restart=always`` starts it again with what is installed."""
    os.kill(os.getpid(), signal.SIGTERM)
