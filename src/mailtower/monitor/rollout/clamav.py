"""The official ClamAV databases on the monitor: mirror the GOC's, roll them across the pool.

Every ``clamav.poll_interval_s`` ``clamavdb.pull`` copies the GOC's served directory into the
tower's mirror (``/srv/mailtower/mirror/official``, which nginx serves to the scanners), checking
every file again at this hop; the mirror's verified ``{db: version}`` (its ``index.json``) is
the target. A scanner whose health answer names other versions is updated in a window, as
rule bundles are (window.py, with the CLAMAV track): maintenance, drain,
``POST /clamav/apply {"versions": …}`` (freshclam from the mirror, clamd and c-icap reload),
the canary with the rules the scanner runs, back. The first scanner of a new set goes alone;
a set whose canary fails there is rolled back (``POST /clamav/rollback``) and rejected: no
other scanner gets it, and the monitor waits for the mirror to move on. The rejections and
the scanners that may run unchecked databases are kept in ``state_dir``, not in the served
mirror.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from mailtower import bundles, clamavdb
from mailtower.monitor.pool import PoolMember
from mailtower.monitor.rollout.loop import Rounds
from mailtower.monitor.rollout.state import (
    CLAMAV,
    ClamavState,
    RolloutMonitor,
    load_rejected_sets,
    record_rejected,
    window_limits,
)
from mailtower.monitor.rollout.window import Windows, shown_version

log = logging.getLogger("mailtower.monitor.rollout")

CLAMAV_MIRROR_DIR = Path("/srv/mailtower/mirror/official")  # freshclam: <mirror_url>/official
CLAMAV_STATE_DIR = Path("/var/lib/mailtower-monitor/clamav")  # the unit's StateDirectory
BUILT_FORMAT = "%d %b %Y %H:%M %z"  # a CVD header's build time: "22 Jun 2021 21:34 -0400"


def runs(s: PoolMember, versions: dict[str, int]) -> bool:
    """Whether scanner ``s`` last said it runs ``versions`` (each database at that version)."""
    return s.clamav is not None and all(s.clamav.get(db) == v for db, v in versions.items())


def built_at(built: object) -> float | None:
    """A CVD header's build time as Unix time (None: missing or not in ClamAV's format)."""
    try:
        return datetime.strptime(str(built), BUILT_FORMAT).timestamp()
    except ValueError:
        return None


def built_timestamp(text: object) -> float | None:
    """The CVD header's build time ("22 Jun 2021 21:34 -0400") as Unix time (None: unreadable)."""
    if not isinstance(text, str):
        return None
    try:
        return datetime.strptime(text, "%d %b %Y %H:%M %z").timestamp()
    except ValueError:
        return None


class ClamavRollout(Rounds):
    """The monitor's mirror of the GOC's ClamAV databases and their rolling reload."""

    track = CLAMAV
    round_name = "clamav"

    def __init__(
        self,
        monitor: RolloutMonitor,
        mirror_dir: Path = CLAMAV_MIRROR_DIR,
        state_dir: Path = CLAMAV_STATE_DIR,
        samples: Callable[[int | None], list[bundles.Canary]] | None = None,
    ) -> None:
        settings = monitor.settings
        assert settings.clamav is not None and settings.goc is not None
        self.monitor = monitor
        self.config = settings.clamav
        self.limits = window_limits(settings)
        self.poll_interval_s = self.config.poll_interval_s
        self.source = f"http://{settings.goc.address}:{settings.goc.bundle_port}/clamav"
        self.mirror_dir = mirror_dir
        self.state_dir = state_dir
        self.state: ClamavState = ClamavState(rejected=load_rejected_sets(state_dir))
        self._retry_at = {}
        # The canary's samples: those of the rule bundle the scanner runs (none without
        # bundles: the built-in canaries only). Looked up on each call: a test may replace it.
        self.samples = samples or (lambda version: [])
        self.windows = Windows(monitor, self.state, state_dir, lambda v: self.samples(v), CLAMAV)
        self.index: dict[str, Any] = {}  # the mirror's index.json as last read
        self.mirrored: dict[str, int] = {}  # its verified versions of the configured databases
        monitor.metrics.clamav_mirror_age.set_function(self.mirror_age_s)  # at each scrape
        self.refresh()  # a restarted monitor rolls what its mirror already holds

    # -- the loop ----------------------------------------------------------------------------

    def started(self) -> None:
        log.info(
            "event=clamav_rollout_start source=%s mirror=%s databases=%s target=%s",
            self.source,
            self.mirror_dir,
            ",".join(self.config.databases),
            shown_version(self.state.target),
        )

    async def pull(self) -> bool:
        """Mirror the GOC's databases (blocking: in a thread); True when the target moved. A
        failed pull leaves the mirror as it was, and that stays the target."""
        started = time.monotonic()
        try:
            pulled = await asyncio.to_thread(
                clamavdb.pull, self.source, self.mirror_dir, list(self.config.databases)
            )
        except (OSError, clamavdb.DatabaseError) as exc:
            self.monitor.metrics.clamav_pull_failures.inc()
            self.state.last_error = f"pull from {self.source}: {exc}"
            log.warning(
                "event=clamav_pull_failed source=%s mirror=%s error=%r "
                "hint='the GOC serves its mirror on bundle_port; see its mailtower clamavdb "
                "status'",
                self.source,
                self.mirror_dir,
                str(exc),
            )
        else:
            log.debug(
                "event=clamav_pulled versions=%s seconds=%.2f",
                shown_version(pulled),
                time.monotonic() - started,
            )
        return self.refresh()

    def refresh(self) -> bool:
        """Read the mirror's index: the target and the mirror's metrics. True when the target
        moved."""
        try:
            index = clamavdb.read_index(self.mirror_dir)
            versions = clamavdb.mirror_versions(self.mirror_dir) if index else {}
        except (OSError, clamavdb.DatabaseError) as exc:
            log.error("event=clamav_mirror_unreadable mirror=%s error=%r", self.mirror_dir, exc)
            return False
        self.index = index
        # The configured databases, and the GOC's third-party feed set whenever the GOC serves
        # one (the towers need no setting for it: the GOC's clamav.feeds decide).
        self.mirrored = {
            db: v
            for db, v in versions.items()
            if db in self.config.databases or db == clamavdb.FEEDS
        }
        missing = [db for db in self.config.databases if db not in self.mirrored]
        if missing and self.mirrored:
            log.warning("event=clamav_mirror_lacks databases=%s", ",".join(missing))
        target = dict(self.mirrored) or None
        if target is not None and target in self.state.rejected:
            target = None  # the scanners keep theirs until the GOC publishes another set
        moved = target != self.state.target
        self.state.target = target
        if moved and target is not None:
            log.info("event=clamav_target versions=%s", shown_version(target))
        self.export()
        return moved

    async def roll(self) -> None:
        try:
            await super().roll()
        finally:  # the health loop keeps it current too; here it follows the windows at once
            self.monitor.metrics.clamav_behind.set(self.scanners_behind())

    # -- what Rounds asks --------------------------------------------------------------------

    def target(self) -> dict[str, int] | None:
        return self.state.target

    def current(self, target: dict[str, int]) -> Callable[[PoolMember], bool]:
        return lambda s: runs(s, target)

    def rejected(self, target: dict[str, int]) -> bool:
        return target in self.state.rejected

    def updates(self) -> Counter:
        return self.monitor.metrics.clamav_updates

    def reject(self, target: dict[str, int]) -> None:
        if target not in self.state.rejected:
            self.state.rejected.append(dict(target))
        self.state.rejected = self.state.rejected[-20:]  # a record, not a history
        self.state.target = None
        record_rejected(self.state_dir, self.state.rejected)
        self.export()
        log.error(
            "event=clamav_set_rejected versions=%s reason=canary_failed "
            "action='no other scanner gets it; waiting for the GOC to publish another set'",
            shown_version(target),
        )

    # -- what the monitor shows ------------------------------------------------------------------

    def upstream(self) -> dict[str, Any]:
        """The GOC's ``upstream`` section, as its index carried it here."""
        up = self.index.get("upstream")
        return up if isinstance(up, dict) else {}

    def mirror_age_s(self) -> float:
        """Since the GOC's last good check upstream (infinite: never, or not known here)."""
        last_ok = self.upstream().get("last_ok")
        if not isinstance(last_ok, int | float) or last_ok <= 0:
            return math.inf
        return max(0.0, time.time() - last_ok)

    def behind_counts(self) -> dict[str, int]:
        """Per database: scanners serving (enabled and answering) that do not run the
        mirror's version of it."""
        serving = [s for s in self.monitor.pool.scanners if s.enabled and s.healthy]
        return {
            db: sum(1 for s in serving if (s.clamav or {}).get(db) != v)
            for db, v in self.mirrored.items()
        }

    def scanners_behind(self) -> int:
        """Scanners serving that do not run every database at the mirror's version."""
        if not self.mirrored:
            return 0
        serving = [s for s in self.monitor.pool.scanners if s.enabled and s.healthy]
        return sum(1 for s in serving if not runs(s, self.mirrored))

    @property
    def feeds_served(self) -> bool:
        return clamavdb.FEEDS in self.mirrored

    def export(self) -> None:
        """The mirror's figures into the monitor's metrics (the age is read at each scrape)."""
        m = self.monitor.metrics
        for db in [*self.config.databases, *([clamavdb.FEEDS] if self.feeds_served else [])]:
            m.clamav_mirror_version.labels(db).set(self.mirrored.get(db, 0))
            built = built_timestamp((self.index.get("databases") or {}).get(db, {}).get("built"))
            if built is not None:
                m.clamav_database_built.labels(db).set(built)
        up = self.upstream()
        cooldown_until = up.get("cooldown_until") or 0
        cooling = isinstance(cooldown_until, int | float) and cooldown_until > time.time()
        m.clamav_upstream_cooldown.set(1 if cooling else 0)
        refusals = up.get("refusals") or 0
        m.clamav_upstream_refusals.set(refusals if isinstance(refusals, int) else 0)
        m.clamav_rejected.set(1 if self.mirrored and self.mirrored in self.state.rejected else 0)
        m.clamav_behind.set(self.scanners_behind())

    def status(self) -> dict[str, Any] | None:
        """The mirror's state for the GOC (TowerStatus.clamav); None before any mirror."""
        if not self.mirrored:
            return None
        described = self.index.get("databases")
        described = described if isinstance(described, dict) else {}
        behind = self.behind_counts()
        last_ok = self.upstream().get("last_ok")
        return {
            "databases": {
                db: {
                    "version": v,
                    "built_at": built_at((described.get(db) or {}).get("built")),
                    "behind": behind[db],
                }
                for db, v in sorted(self.mirrored.items())
            },
            "upstream_last_ok": last_ok if isinstance(last_ok, int | float) else None,
            "scanners_behind": self.scanners_behind(),
            "rejected": bool(self.mirrored in self.state.rejected),
        }

    def snapshot(self) -> dict[str, object]:
        return {
            "source": self.source,
            "target": self.state.target,
            "mirror": self.mirrored,
            "rejected": self.state.rejected,
            "applying": sorted(self.state.applying),
            "stuck": sorted(self.state.stuck),
            "last_error": self.state.last_error,
        }
