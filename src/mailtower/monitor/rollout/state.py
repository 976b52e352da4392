"""What a rollout works with: the monitor that runs it, what it rolls (a Track: rule bundles or
ClamAV databases), what it knows about versions, and the records it keeps so that a restarted
monitor remembers them."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from mailtower._fsio import write_durable
from mailtower.monitor.haproxy import RuntimeAPI
from mailtower.monitor.metrics import MonitorMetrics
from mailtower.monitor.pool import Pool
from mailtower.settings import Bundles, TowerSettings

log = logging.getLogger("mailtower.monitor.rollout")

MIRROR_DIR = Path("/srv/mailtower/mirror/rules")  # served by nginx as <mirror_url>/rules
REJECTED = "rejected.json"
# Scanners that may run rules no canary has passed (in an apply, or stuck): kept out of
# service by a restarted monitor until it has checked them.
UNVERIFIED = "unverified.json"


class RolloutMonitor(Protocol):
    """What a rollout needs of the monitor that runs it (mailtower.monitor.service.Monitor):
    its settings, pool and metrics, the relay's HAProxy with the lock every change of a
    scanner's state takes, and the lock a rollout holds while it has windows open (the rule
    and the ClamAV rollouts share the pool's capacity: never both at once)."""

    settings: TowerSettings
    pool: Pool
    metrics: MonitorMetrics
    haproxy: RuntimeAPI
    haproxy_lock: asyncio.Lock
    windows_lock: asyncio.Lock


@dataclass(frozen=True)
class Track:
    """What a rollout puts on the scanners: scand's endpoints for it, the field of scand's
    answers (and of PoolMember) that says what a scanner runs, and its name in log events."""

    name: str  # "rules", "clamav": event=<name>_updated …
    field: str  # in /health and the apply/rollback answers; the PoolMember attribute too
    busy: str  # /health: scand is still carrying out an earlier request of this kind
    apply_path: str
    rollback_path: str
    body_key: str  # the apply's JSON body: {body_key: target}
    installed: str | None = None  # /health: what is installed, when it may differ from running
    # The canary's answers must name the target (rules) or the rule version the scanner runs
    # (clamav: new databases, the same rules and the same samples).
    canary_of_target: bool = True
    hint: str = ""  # what to look at on a stuck scanner; {rules_dir} {clamav_db_dir}


RULES = Track(
    "rules",
    "rules_bundle",
    "rules_busy",
    "/rules/apply",
    "/rules/rollback",
    "version",
    installed="rules_installed",
    hint="on the scanner: mailtower bundle status --rules-root {rules_dir}",
)
CLAMAV = Track(
    "clamav",
    "clamav",
    "clamav_busy",
    "/clamav/apply",
    "/clamav/rollback",
    "versions",
    canary_of_target=False,
    hint="on the scanner: ls -l {clamav_db_dir} and journalctl -u mailtower-scand",
)


@dataclass(frozen=True)
class WindowLimits:
    """How many scanners may be in windows at once, and how long a window's steps may take."""

    batch: int
    spare: int
    drain_timeout_s: float
    apply_timeout_s: float


def window_limits(settings: TowerSettings) -> WindowLimits:
    """``bundles``' limits; a tower with ClamAV databases but no bundles gets their defaults."""
    b = settings.bundles
    if b is not None:
        return WindowLimits(b.batch, b.spare, b.drain_timeout_s, b.apply_timeout_s)
    f = Bundles.model_fields
    return WindowLimits(
        f["batch"].default,
        f["spare"].default,
        f["drain_timeout_s"].default,
        f["apply_timeout_s"].default,
    )


@dataclass
class WindowState:
    """Scanners in a rollout's windows, or kept out after one (shown on /pool)."""

    applying: set[str] = field(default_factory=set)  # scanners in an update window
    stuck: set[str] = field(default_factory=set)  # kept out: nothing that passed a canary
    last_error: str | None = None


@dataclass
class RolloutState(WindowState):
    """What the monitor knows about rule versions (also shown on /pool and in metrics)."""

    target: int | None = None  # the mirror's version, unless rejected
    rejected: set[int] = field(default_factory=set)


@dataclass
class ClamavState(WindowState):
    """What the monitor knows about ClamAV database versions (on /pool and in metrics)."""

    target: dict[str, int] | None = None  # the mirror's verified versions, unless rejected
    rejected: list[dict[str, int]] = field(default_factory=list)


def good_target(mirror_dir: Path, rejected: set[int]) -> int | None:
    """The newest version the mirror holds that is not rejected (None: none)."""
    held = []
    for path in mirror_dir.glob("rules-*.tar.gz") if mirror_dir.is_dir() else []:
        number = path.name[len("rules-") : -len(".tar.gz")]
        if number.isdigit() and int(number) not in rejected:
            held.append(int(number))
    return max(held, default=None)


def load_rejected(mirror_dir: Path) -> set[int]:
    try:
        return {int(v) for v in json.loads((mirror_dir / REJECTED).read_text())}
    except (OSError, ValueError, TypeError):
        return set()


def record_rejected(mirror_dir: Path, rejected: set[int] | list[dict[str, int]]) -> None:
    record = sorted(rejected) if isinstance(rejected, set) else rejected
    try:
        mirror_dir.mkdir(parents=True, exist_ok=True)
        write_durable(mirror_dir / REJECTED, (json.dumps(record) + "\n").encode())
    except OSError as exc:  # kept in memory; a restarted monitor would try it once more
        log.error("event=rejected_not_recorded path=%s error=%r", mirror_dir, exc)


def load_rejected_sets(state_dir: Path) -> list[dict[str, int]]:
    """The ClamAV database sets rejected here ({db: version} each)."""
    try:
        found = json.loads((state_dir / REJECTED).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(found, list):
        return []
    return [
        {str(db): int(v) for db, v in item.items()}
        for item in found
        if isinstance(item, dict) and all(isinstance(v, int) for v in item.values())
    ]


def load_unverified(mirror_dir: Path) -> list[str]:
    try:
        names = json.loads((mirror_dir / UNVERIFIED).read_text())
    except (OSError, ValueError):
        return []
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def record_unverified(mirror_dir: Path, unverified: set[str]) -> None:
    try:
        mirror_dir.mkdir(parents=True, exist_ok=True)
        record = json.dumps(sorted(unverified)) + "\n"
        write_durable(mirror_dir / UNVERIFIED, record.encode())
    except OSError as exc:
        log.error("event=unverified_not_recorded path=%s error=%r", mirror_dir, exc)
