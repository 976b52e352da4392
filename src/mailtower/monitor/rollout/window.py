"""One scanner's update window: out of service, drained, the update applied, the canary, back.

1. set to maintenance in the relay's HAProxy (no new connections; sessions open finish),
2. wait until it has no message in flight,
3. the track's apply (state.Track): ``POST /rules/apply`` — the scanner fetches the bundle
   from the mirror, installs it, has clamd and c-icap load its ClamAV databases, and reloads
   its pipeline; ``POST /clamav/apply`` — freshclam fetches the official databases from the
   mirror, clamd and c-icap reload them,
4. the canary (canary.py): scanned with the target rules, or with the rules the scanner runs
   (a ClamAV update changes the databases, not the rules),
5. back in service.

A failed canary is rolled back (the track's rollback, canary again). A scanner goes back in
service only with what passed its canary; when that cannot be established it stays out
(``stuck``) until a later round can.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mailtower import bundles
from mailtower.monitor import health
from mailtower.monitor.errors import CanaryFailed, HAProxyError, RolloutError
from mailtower.monitor.pool import MAINT, READY, PoolMember
from mailtower.monitor.rollout.canary import run_canaries
from mailtower.monitor.rollout.state import (
    RULES,
    RolloutMonitor,
    Track,
    WindowState,
    load_unverified,
    record_unverified,
    window_limits,
)

log = logging.getLogger("mailtower.monitor.rollout")

TOKEN_HEADER = "X-Mailtower-Token"
# What scand may spend on an apply besides its reload (bundles.apply_timeout_s): the fetch
# (30 s), the ClamAV check by clamscan (120 s) and the probe wait (300 s: a blocking reload of
# the official databases), and a margin. An apply that outlasts it shows as rules_busy (or
# clamav_busy) in the scanner's health until it ends, and the scanner is kept out until then.
SCAND_APPLY_BUDGET_S = 480.0


class Windows:
    """The update windows of a monitor's scanners for one ``track``. ``samples(version)``: the
    canary samples rule bundle ``version`` carries. ``records_dir`` keeps the scanners that
    may run something no canary passed (UNVERIFIED)."""

    def __init__(
        self,
        monitor: RolloutMonitor,
        state: WindowState,
        records_dir: Path,
        samples: Callable[[int | None], list[bundles.Canary]],
        track: Track = RULES,
    ) -> None:
        settings = monitor.settings
        assert settings.secrets.canary is not None
        self.monitor = monitor
        self.settings = settings
        self.limits = window_limits(settings)
        self.token = settings.secrets.canary
        self.state = state
        self.records_dir = records_dir
        self.samples = samples
        self.track = track
        m = monitor.metrics
        self.stuck_gauge = m.rules_stuck if track is RULES else m.clamav_stuck
        self._unverified: set[str] = set()
        for name in load_unverified(records_dir):
            if name in {sc.name for sc in monitor.pool.scanners}:
                monitor.pool[name].held = True  # before the health loop's first tick
                state.stuck.add(name)
                self._unverified.add(name)

    async def update(self, s: PoolMember, target: Any) -> None:
        """One scanner's window: out of service, apply, canary, back (or roll back).

        A scanner goes back in service only with what passed its canary: what it had (nothing
        applied, or rolled back) or the target. When that cannot be established — a failed
        canary whose rollback fails, an apply that did not answer and a scanner that does not
        say what it runs — it stays out (``stuck``) and every round tries again."""
        started = time.monotonic()
        monitor, track = self.monitor, self.track
        self.state.applying.add(s.name)
        asked = settled = False
        try:
            async with monitor.haproxy_lock:  # the health loop sees held before it acts
                s.held = True
                await monitor.haproxy.set_state(s.name, MAINT)
            await self._drained(s)
            asked = True  # from here the scanner may run rules no canary has passed
            self._mark_unverified(s.name, True)
            try:
                status, doc = await self._post(s, track.apply_path, {track.body_key: target})
            except (OSError, TimeoutError, ValueError) as exc:
                status, doc = 0, {"reason": f"no answer: {exc!r}"}
            if status != 200:
                await self._settle(s)  # refused: nothing changed; no answer: it may have
                settled = True
                raise RolloutError(f"apply answered {status}: {doc.get('reason', doc)}")
            try:
                await self._canary(s, target if track.canary_of_target else s.rules_bundle)
            except CanaryFailed as failed:
                try:
                    await self._roll_back(s)
                except (RolloutError, OSError, TimeoutError, ValueError) as exc:
                    raise CanaryFailed(f"{failed}; and the rollback failed: {exc}") from exc
                settled = True
                raise
            except RolloutError:  # no verdict: the new rules are not checked yet
                await self._settle(s)
                settled = True
                raise
            settled = True
            setattr(s, track.field, dict(target) if isinstance(target, dict) else target)
            log.info(
                "event=%s_updated scanner=%s address=%s version=%s seconds=%.2f",
                track.name,
                s.name,
                s.address,
                shown_version(target),
                time.monotonic() - started,
            )
        finally:
            self.state.applying.discard(s.name)
            if settled or not asked:
                await self._release(s)
            else:
                self.state.stuck.add(s.name)
                self.stuck_gauge.set(len(self.state.stuck))
                log.critical(
                    "event=%s_scanner_stuck scanner=%s address=%s version=%s "
                    "action='kept out of service; retried every round' hint=%r",
                    track.name,
                    s.name,
                    s.address,
                    shown_version(target),
                    track.hint.format(
                        rules_dir=self.settings.rules_dir,
                        clamav_db_dir=self.settings.clamav_db_dir,
                    ),
                )

    async def unstick(self) -> None:
        """Try again with every scanner kept out after a failed update."""
        for name in sorted(self.state.stuck):
            s = self.monitor.pool[name]
            if not s.healthy:
                continue  # down: its health probes say when it is back
            try:
                await self._settle(s)
            except (RolloutError, OSError, TimeoutError, ValueError) as exc:
                log.error(
                    "event=%s_scanner_still_stuck scanner=%s error=%r",
                    self.track.name,
                    name,
                    str(exc),
                )
                continue
            log.warning(
                "event=%s_scanner_unstuck scanner=%s version=%s",
                self.track.name,
                name,
                shown_version(getattr(s, self.track.field)),
            )
            await self._release(s)

    async def _release(self, s: PoolMember) -> None:
        """Back in service if its health probes say it is well; otherwise left in maintenance
        for the health state machine to set ready after ``recover_after`` good probes.
        Reconcile repeats the HAProxy call if HAProxy does not answer now."""
        monitor = self.monitor
        self._mark_unverified(s.name, False)
        async with monitor.haproxy_lock:
            s.held = False
            self.state.stuck.discard(s.name)
            self.stuck_gauge.set(len(self.state.stuck))
            if s.enabled and not s.healthy:
                monitor.pool.adopt(s.name, False, time.time())
                monitor.metrics.scanner_enabled.labels(s.name).set(0)
            if s.enabled:
                with contextlib.suppress(HAProxyError):
                    await monitor.haproxy.set_state(s.name, READY)

    async def _settle(self, s: PoolMember) -> None:
        """Establish that what the scanner runs may serve: the canary of it, and a rollback if
        that fails. Raises when it cannot."""
        track = self.track
        port, timeout = self.settings.ports.scanner_http, self.settings.limits.health_timeout_s
        status, doc = await health.request(s.address, port, "GET", "/health", timeout_s=timeout)
        if status != 200:
            raise RolloutError(f"{s.name}: health answered {status}: {doc.get('reason', doc)}")
        running = doc.get(track.field)
        if doc.get(track.busy):
            raise RolloutError(f"{s.name}: still carrying out a {track.name} request")
        if track.installed and track.installed in doc and doc[track.installed] != running:
            raise RolloutError(
                f"{s.name}: runs {track.name} {shown_version(running)} but has "
                f"{shown_version(doc[track.installed])} installed"
            )
        rules = running if track.canary_of_target else doc.get("rules_bundle", s.rules_bundle)
        try:
            await self._canary(s, rules)
        except CanaryFailed:
            await self._roll_back(s)
        else:
            setattr(s, track.field, running)

    async def _post(self, s: PoolMember, path: str, body: dict | None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else b""
        port = self.settings.ports.scanner_http
        headers = {TOKEN_HEADER: self.token}
        # scand's own budget: fetch, the bundle checks, the ClamAV probe, then the reload
        timeout = self.limits.apply_timeout_s + SCAND_APPLY_BUDGET_S
        return await health.request(s.address, port, "POST", path, data, headers, timeout)

    async def _drained(self, s: PoolMember) -> None:
        """Wait until no message is on its way to the scanner: HAProxy has no session open to
        it (the relay opens one per message; a session opened before ``maint`` may not have
        reached DATA yet) and scand has none in flight. At ``drain_timeout_s`` the apply goes
        ahead anyway: messages then in flight finish with the old pipeline, and one that
        reaches DATA later is scanned with the new rules before their canary (never lost)."""
        deadline = time.monotonic() + self.limits.drain_timeout_s
        port, timeout = self.settings.ports.scanner_http, self.settings.limits.health_timeout_s
        while True:
            _, doc = await health.request(s.address, port, "GET", "/health", timeout_s=timeout)
            in_flight = doc.get("in_flight")  # None: the scanner could not count; not drained
            try:
                sessions: int | None = (await self.monitor.haproxy.server_sessions()).get(s.name)
            except HAProxyError as exc:
                sessions = None
                log.warning("event=drain_unknown scanner=%s error=%r", s.name, str(exc))
            if in_flight == 0 and sessions == 0:
                return
            if time.monotonic() > deadline:
                log.warning(
                    "event=drain_timeout scanner=%s in_flight=%s sessions=%s action=apply_anyway",
                    s.name,
                    in_flight,
                    sessions,
                )
                return
            await asyncio.sleep(0.2)

    async def _canary(self, s: PoolMember, version: int | None) -> None:
        port = self.settings.ports.filter
        await run_canaries(s, port, self.token, version, self.samples(version))

    async def _roll_back(self, s: PoolMember) -> None:
        track = self.track
        status, doc = await self._post(s, track.rollback_path, None)
        if status != 200:
            raise RolloutError(f"{s.name}: rollback answered {status}: {doc.get('reason', doc)}")
        setattr(s, track.field, doc.get(track.field))
        await self._canary(s, s.rules_bundle)  # the old version must pass again
        log.warning(
            "event=%s_rolled_back scanner=%s address=%s version=%s",
            track.name,
            s.name,
            s.address,
            shown_version(getattr(s, track.field)),
        )

    def _mark_unverified(self, name: str, unverified: bool) -> None:
        before = set(self._unverified)
        (self._unverified.add if unverified else self._unverified.discard)(name)
        if self._unverified == before:
            return
        record_unverified(self.records_dir, self._unverified)


def shown_version(version: object) -> str:
    """A version for a log line: 7, or main=62,daily=27500 for a set of databases."""
    if isinstance(version, dict):
        return ",".join(f"{db}={v}" for db, v in sorted(version.items())) or "-"
    return str(version)
