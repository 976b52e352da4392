"""The rollout's loop: every ``bundles.poll_interval_s`` pull the GOC's newest bundle into the
mirror, then update the scanners that run another version, window after window.

``Rounds`` is what every rollout does with its target (rule bundles here, ClamAV databases in
clamav.py): the first scanner of a new target alone, then batches within the capacity the load
leaves, a target whose canary fails on its first scanner rejected. A round holds the monitor's
``windows_lock`` while it has windows open, so two rollouts never take capacity at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from mailtower import bundles
from mailtower.monitor.errors import CanaryFailed, HAProxyError
from mailtower.monitor.pool import PoolMember
from mailtower.monitor.rollout import plan
from mailtower.monitor.rollout.canary import Samples
from mailtower.monitor.rollout.plan import RETRY_AFTER_S
from mailtower.monitor.rollout.pull import Puller
from mailtower.monitor.rollout.state import (
    MIRROR_DIR,
    RULES,
    RolloutMonitor,
    RolloutState,
    Track,
    WindowLimits,
    WindowState,
    good_target,
    load_rejected,
    record_rejected,
    window_limits,
)
from mailtower.monitor.rollout.window import Windows, shown_version

log = logging.getLogger("mailtower.monitor.rollout")


class Rounds(ABC):
    """Rounds of update windows towards one target; a subclass says what the target is."""

    monitor: RolloutMonitor
    state: WindowState
    windows: Windows
    track: Track = RULES
    round_name = "rollout"  # event=<round_name>_round_failed
    poll_interval_s: float
    limits: WindowLimits
    _retry_at: dict[str, float]  # scanner → when to try it again after a failed update

    @abstractmethod
    def target(self) -> Any:
        """What every scanner should run now (None: nothing to roll)."""

    @abstractmethod
    def current(self, target: Any) -> Callable[[PoolMember], bool]:
        """Whether a scanner runs ``target``."""

    @abstractmethod
    def rejected(self, target: Any) -> bool:
        """Whether ``target`` failed its canary on a first scanner here."""

    @abstractmethod
    def reject(self, target: Any) -> None:
        """Roll ``target`` no further, and remember that across restarts."""

    @abstractmethod
    def updates(self) -> Counter:
        """The counter of this track's updates by result."""

    @abstractmethod
    async def pull(self) -> bool:
        """Bring the mirror up to the GOC's; True when the target moved."""

    @abstractmethod
    def started(self) -> None:
        """Log what the loop starts with."""

    async def run(self, stop: asyncio.Event) -> None:
        """Every ``poll_interval_s`` a round: pull, then roll."""
        self.started()
        while not stop.is_set():
            try:
                await self.pull()
                await self.roll()
            except Exception as exc:  # a round that fails is logged; the next one tries again
                self.state.last_error = str(exc)
                log.exception("event=%s_round_failed error=%r", self.round_name, str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.poll_interval_s)

    def behind(self) -> list[PoolMember]:
        """Scanners in service that do not run the target, in pool order."""
        target = self.target()
        current = None if target is None else self.current(target)
        return plan.behind(self.monitor.pool.scanners, current, self._retry_at, time.monotonic())

    def room(self, sessions: int) -> int:
        """How many scanners may leave service now: the rest must carry ``sessions``."""
        return plan.room(
            self.monitor.pool.scanners,
            sessions,
            self.monitor.settings.limits.scan_concurrency,
            self.limits.batch,
            self.limits.spare,
        )

    async def roll(self) -> None:
        """Update the scanners that are behind, one window after another, holding the
        monitor's windows lock: no other rollout opens windows meanwhile."""
        async with self.monitor.windows_lock:
            await self._roll()

    async def _roll(self) -> None:
        await self.unstick()
        while (todo := self.behind()) and (target := self.target()) is not None:
            if self.rejected(target):  # never roll a rejected target further
                return
            first = plan.first_of_version(self.monitor.pool.scanners, self.current(target))
            try:
                sessions = await self.monitor.haproxy.sessions()
            except HAProxyError as exc:
                log.warning("event=rollout_waits reason=haproxy error=%r", str(exc))
                return
            room = self.room(sessions)
            if room < 1:
                log.info("event=rollout_waits reason=capacity sessions=%d", sessions)
                return
            batch = todo[: 1 if first else room]
            results = await asyncio.gather(
                *(self.update(s, target) for s in batch), return_exceptions=True
            )
            if self._record(batch, results, target, first):
                return

    def _record(
        self, batch: list[PoolMember], results: list[Any], target: Any, first: bool
    ) -> bool:
        """Count and log a batch's results; True when one failed (the round ends)."""
        failed = False
        for s, result in zip(batch, results, strict=True):
            if not isinstance(result, BaseException):
                self.updates().labels("ok").inc()
                self._retry_at.pop(s.name, None)
                continue
            failed = True
            self.updates().labels("failed").inc()
            self.state.last_error = f"{s.name} ({s.address}): {result}"
            log.error(
                "event=%s_update_failed scanner=%s address=%s version=%s error=%r retry_in_s=%.0f",
                self.track.name,
                s.name,
                s.address,
                shown_version(target),
                str(result),
                RETRY_AFTER_S,
            )
            if first and isinstance(result, CanaryFailed):
                self.reject(target)
            else:  # this scanner waits; the others go on in the next round
                self._retry_at[s.name] = time.monotonic() + RETRY_AFTER_S
        return failed

    async def update(self, s: PoolMember, target: Any) -> None:
        """One scanner's window (window.py)."""
        await self.windows.update(s, target)

    async def unstick(self) -> None:
        """Try again with every scanner kept out after a failed update."""
        await self.windows.unstick()


class Rollout(Rounds):
    """The monitor's bundle mirror and the rolling update of its scanners."""

    def __init__(self, monitor: RolloutMonitor, mirror_dir: Path = MIRROR_DIR) -> None:
        settings = monitor.settings
        assert settings.bundles is not None and settings.secrets.canary is not None
        self.monitor = monitor
        self.settings = settings
        self.config = settings.bundles
        self.limits = window_limits(settings)
        self.poll_interval_s = self.config.poll_interval_s
        self.source = settings.bundle_source
        assert self.source is not None  # with bundles set, there is a source
        self.mirror_dir = mirror_dir
        self.token = settings.secrets.canary
        self.public_key = bundles.public_key_from_pem(self.config.public_key)
        self.state: RolloutState = RolloutState(rejected=load_rejected(mirror_dir))
        self._retry_at = {}
        self._samples = Samples(mirror_dir)
        self.state.target = self.good_target()
        # samples looked up on each call: a test may replace them on this object
        self.windows = Windows(monitor, self.state, mirror_dir, lambda v: self.samples(v))
        self.puller = Puller(self.source, mirror_dir, monitor.metrics)

    # -- the loop ----------------------------------------------------------------------------

    def started(self) -> None:
        log.info(
            "event=rollout_start source=%s mirror=%s target=%s batch=%d spare=%d",
            self.source,
            self.mirror_dir,
            self.state.target,
            self.config.batch,
            self.config.spare,
        )

    async def pull(self) -> bool:
        """Mirror the GOC's latest bundle if it is newer; True when the target moved."""
        version = await self.puller.pull(self.public_key, self.state.rejected)
        if version is None:
            return False
        self.state.target = version
        self.monitor.metrics.rules_target.set(version)
        return True

    # -- what Rounds asks --------------------------------------------------------------------

    def target(self) -> int | None:
        return self.state.target

    def current(self, target: int) -> Callable[[PoolMember], bool]:
        return lambda s: s.rules_bundle == target

    def rejected(self, target: int) -> bool:
        return target in self.state.rejected

    def updates(self) -> Counter:
        return self.monitor.metrics.rules_updates

    def reject(self, version: int) -> None:
        self.state.rejected.add(version)
        self.state.target = self.good_target()
        self.monitor.metrics.rules_rejected.set(version)
        self.monitor.metrics.rules_target.set(self.state.target or 0)
        record_rejected(self.mirror_dir, self.state.rejected)
        log.error(
            "event=rules_bundle_rejected version=%d reason=canary_failed keeping=%s",
            version,
            self.state.target,
        )

    def good_target(self) -> int | None:
        """The newest version the mirror holds that is not rejected (None: none)."""
        return good_target(self.mirror_dir, self.state.rejected)

    def samples(self, version: int | None) -> list[bundles.Canary]:
        """The canary samples bundle ``version`` carries (read from the mirror once)."""
        return self._samples.get(version, self.public_key)

    def snapshot(self) -> dict[str, object]:
        return {
            "source": self.source,
            "target": self.state.target,
            "rejected": sorted(self.state.rejected),
            "applying": sorted(self.state.applying),
            "stuck": sorted(self.state.stuck),
            "last_error": self.state.last_error,
        }
