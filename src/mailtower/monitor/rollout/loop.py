"""The rollout's loop: every ``bundles.poll_interval_s`` pull the GOC's newest bundle into the
mirror, then update the scanners that run another version, window after window."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from mailtower import bundles
from mailtower.monitor.errors import CanaryFailed, HAProxyError
from mailtower.monitor.pool import PoolMember
from mailtower.monitor.rollout import plan
from mailtower.monitor.rollout.canary import Samples
from mailtower.monitor.rollout.plan import RETRY_AFTER_S
from mailtower.monitor.rollout.pull import Puller
from mailtower.monitor.rollout.state import (
    MIRROR_DIR,
    RolloutMonitor,
    RolloutState,
    good_target,
    load_rejected,
    record_rejected,
)
from mailtower.monitor.rollout.window import Windows

log = logging.getLogger("mailtower.monitor.rollout")


class Rollout:
    """The monitor's bundle mirror and the rolling update of its scanners."""

    def __init__(self, monitor: RolloutMonitor, mirror_dir: Path = MIRROR_DIR) -> None:
        settings = monitor.settings
        assert settings.bundles is not None and settings.secrets.canary is not None
        self.monitor = monitor
        self.settings = settings
        self.config = settings.bundles
        self.source = settings.bundle_source
        assert self.source is not None  # with bundles set, there is a source
        self.mirror_dir = mirror_dir
        self.token = settings.secrets.canary
        self.public_key = bundles.public_key_from_pem(self.config.public_key)
        self.state = RolloutState(rejected=load_rejected(mirror_dir))
        self._retry_at: dict[str, float] = {}  # scanner → when to try it again after a failure
        self._samples = Samples(mirror_dir)
        self.state.target = self.good_target()
        # samples looked up on each call: a test may replace them on this object
        self.windows = Windows(monitor, self.state, mirror_dir, lambda v: self.samples(v))
        self.puller = Puller(self.source, mirror_dir, monitor.metrics)

    # -- the loop ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        log.info(
            "event=rollout_start source=%s mirror=%s target=%s batch=%d spare=%d",
            self.source,
            self.mirror_dir,
            self.state.target,
            self.config.batch,
            self.config.spare,
        )
        while not stop.is_set():
            try:
                await self.pull()
                await self.roll()
            except Exception as exc:  # a round that fails is logged; the next one tries again
                self.state.last_error = str(exc)
                log.exception("event=rollout_round_failed error=%r", str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.poll_interval_s)

    async def pull(self) -> bool:
        """Mirror the GOC's latest bundle if it is newer; True when the target moved."""
        version = await self.puller.pull(self.public_key, self.state.rejected)
        if version is None:
            return False
        self.state.target = version
        self.monitor.metrics.rules_target.set(version)
        return True

    # -- rolling -------------------------------------------------------------------------------

    def behind(self) -> list[PoolMember]:
        """Scanners in service that do not run the target version, in pool order."""
        return plan.behind(
            self.monitor.pool.scanners, self.state.target, self._retry_at, time.monotonic()
        )

    def room(self, sessions: int) -> int:
        """How many scanners may leave service now: the rest must carry ``sessions``."""
        return plan.room(
            self.monitor.pool.scanners,
            sessions,
            self.settings.limits.scan_concurrency,
            self.config.batch,
            self.config.spare,
        )

    async def roll(self) -> None:
        """Update the scanners that are behind, one window after another."""
        m = self.monitor.metrics
        await self.unstick()
        while (todo := self.behind()) and self.state.target is not None:
            target = self.state.target
            if target in self.state.rejected:  # never roll a rejected version further
                return
            first = plan.first_of_version(self.monitor.pool.scanners, target)
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
            failed = False
            for s, result in zip(batch, results, strict=True):
                if not isinstance(result, BaseException):
                    m.rules_updates.labels("ok").inc()
                    self._retry_at.pop(s.name, None)
                    continue
                failed = True
                m.rules_updates.labels("failed").inc()
                self.state.last_error = f"{s.name} ({s.address}): {result}"
                log.error(
                    "event=rules_update_failed scanner=%s address=%s version=%d error=%r "
                    "retry_in_s=%.0f",
                    s.name,
                    s.address,
                    target,
                    str(result),
                    RETRY_AFTER_S,
                )
                if first and isinstance(result, CanaryFailed):
                    self.reject(target)
                else:  # this scanner waits; the others go on in the next round
                    self._retry_at[s.name] = time.monotonic() + RETRY_AFTER_S
            if failed:
                return

    async def update(self, s: PoolMember, target: int) -> None:
        """One scanner's window (window.py)."""
        await self.windows.update(s, target)

    async def unstick(self) -> None:
        """Try again with every scanner kept out after a failed update."""
        await self.windows.unstick()

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
