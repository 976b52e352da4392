"""What a rollout works with: the monitor that runs it, what it knows about rule versions, and
the records it keeps in the mirror so that a restarted monitor remembers them."""

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
from mailtower.settings import TowerSettings

log = logging.getLogger("mailtower.monitor.rollout")

MIRROR_DIR = Path("/srv/mailtower/mirror/rules")  # served by nginx as <mirror_url>/rules
REJECTED = "rejected.json"
# Scanners that may run rules no canary has passed (in an apply, or stuck): kept out of
# service by a restarted monitor until it has checked them.
UNVERIFIED = "unverified.json"


class RolloutMonitor(Protocol):
    """What a rollout needs of the monitor that runs it (mailtower.monitor.service.Monitor):
    its settings, pool and metrics, and the relay's HAProxy with the lock every change of a
    scanner's state takes."""

    settings: TowerSettings
    pool: Pool
    metrics: MonitorMetrics
    haproxy: RuntimeAPI
    haproxy_lock: asyncio.Lock


@dataclass
class RolloutState:
    """What the monitor knows about rule versions (also shown on /pool and in metrics)."""

    target: int | None = None  # the mirror's version, unless rejected
    rejected: set[int] = field(default_factory=set)
    applying: set[str] = field(default_factory=set)  # scanners in an update window
    stuck: set[str] = field(default_factory=set)  # kept out: no rules that passed a canary
    last_error: str | None = None


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


def record_rejected(mirror_dir: Path, rejected: set[int]) -> None:
    try:
        mirror_dir.mkdir(parents=True, exist_ok=True)
        write_durable(mirror_dir / REJECTED, (json.dumps(sorted(rejected)) + "\n").encode())
    except OSError as exc:  # kept in memory; a restarted monitor would try it once more
        log.error("event=rejected_not_recorded path=%s error=%r", mirror_dir, exc)


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
