"""One scanner's update window: out of service, drained, the rules applied, the canary, back.

1. set to maintenance in the relay's HAProxy (no new connections; sessions open finish),
2. wait until it has no message in flight,
3. ``POST /rules/apply`` — the scanner fetches the bundle from the mirror, installs it, has
   clamd and c-icap load its ClamAV databases, and reloads its pipeline,
4. the canary (canary.py), scanned with the target version,
5. back in service.

A failed canary is rolled back (``POST /rules/rollback``, canary again). A scanner goes back in
service only with rules that passed their canary; when that cannot be established it stays
out (``stuck``) until a later round can.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from mailtower import bundles
from mailtower.monitor import health
from mailtower.monitor.errors import CanaryFailed, HAProxyError, RolloutError
from mailtower.monitor.pool import MAINT, READY, PoolMember
from mailtower.monitor.rollout.canary import run_canaries
from mailtower.monitor.rollout.state import (
    RolloutMonitor,
    RolloutState,
    load_unverified,
    record_unverified,
)

log = logging.getLogger("mailtower.monitor.rollout")

TOKEN_HEADER = "X-Mailtower-Token"
# What scand may spend on an apply besides its reload (bundles.apply_timeout_s): the fetch
# (30 s), the ClamAV check by clamscan (120 s) and the probe wait (60 s), and a margin. An
# apply that outlasts it shows as rules_busy in the scanner's health until it ends.
SCAND_APPLY_BUDGET_S = 240.0


class Windows:
    """The update windows of a monitor's scanners. ``samples(version)``: the canary samples
    bundle ``version`` carries."""

    def __init__(
        self,
        monitor: RolloutMonitor,
        state: RolloutState,
        mirror_dir: Path,
        samples: Callable[[int | None], list[bundles.Canary]],
    ) -> None:
        settings = monitor.settings
        assert settings.bundles is not None and settings.secrets.canary is not None
        self.monitor = monitor
        self.settings = settings
        self.config = settings.bundles
        self.token = settings.secrets.canary
        self.state = state
        self.mirror_dir = mirror_dir
        self.samples = samples
        self._unverified: set[str] = set()
        for name in load_unverified(mirror_dir):
            if name in {sc.name for sc in monitor.pool.scanners}:
                monitor.pool[name].held = True  # before the health loop's first tick
                state.stuck.add(name)
                self._unverified.add(name)

    async def update(self, s: PoolMember, target: int) -> None:
        """One scanner's window: out of service, apply, canary, back (or roll back).

        A scanner goes back in service only with rules that passed their canary: its old ones
        (nothing applied, or rolled back) or the target. When that cannot be established — a
        failed canary whose rollback fails, an apply that did not answer and a scanner that
        does not say what it runs — it stays out (``stuck``) and every round tries again."""
        started = time.monotonic()
        monitor = self.monitor
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
                status, doc = await self._post(s, "/rules/apply", {"version": target})
            except (OSError, TimeoutError, ValueError) as exc:
                status, doc = 0, {"reason": f"no answer: {exc!r}"}
            if status != 200:
                await self._settle(s)  # refused: nothing changed; no answer: it may have
                settled = True
                raise RolloutError(f"apply answered {status}: {doc.get('reason', doc)}")
            try:
                await self._canary(s, target)
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
            s.rules_bundle = target
            log.info(
                "event=rules_updated scanner=%s address=%s version=%d seconds=%.2f",
                s.name,
                s.address,
                target,
                time.monotonic() - started,
            )
        finally:
            self.state.applying.discard(s.name)
            if settled or not asked:
                await self._release(s)
            else:
                self.state.stuck.add(s.name)
                self.monitor.metrics.rules_stuck.set(len(self.state.stuck))
                log.critical(
                    "event=rules_scanner_stuck scanner=%s address=%s version=%d "
                    "action='kept out of service; retried every round' "
                    "hint='on the scanner: mailtower bundle status --rules-root %s'",
                    s.name,
                    s.address,
                    target,
                    self.settings.rules_dir,
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
                log.error("event=rules_scanner_still_stuck scanner=%s error=%r", name, str(exc))
                continue
            log.warning("event=rules_scanner_unstuck scanner=%s version=%s", name, s.rules_bundle)
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
            monitor.metrics.rules_stuck.set(len(self.state.stuck))
            if s.enabled and not s.healthy:
                monitor.pool.adopt(s.name, False, time.time())
                monitor.metrics.scanner_enabled.labels(s.name).set(0)
            if s.enabled:
                with contextlib.suppress(HAProxyError):
                    await monitor.haproxy.set_state(s.name, READY)

    async def _settle(self, s: PoolMember) -> None:
        """Establish that the scanner's rules may serve: the canary of the version it runs, and
        a rollback if that fails. Raises when it cannot."""
        port, timeout = self.settings.ports.scanner_http, self.settings.limits.health_timeout_s
        status, doc = await health.request(s.address, port, "GET", "/health", timeout_s=timeout)
        if status != 200:
            raise RolloutError(f"{s.name}: health answered {status}: {doc.get('reason', doc)}")
        running = doc.get("rules_bundle")
        if doc.get("rules_busy"):
            raise RolloutError(f"{s.name}: still carrying out a bundle request")
        if "rules_installed" in doc and doc["rules_installed"] != running:
            raise RolloutError(
                f"{s.name}: runs bundle {running} but has {doc['rules_installed']} installed"
            )
        try:
            await self._canary(s, running)
        except CanaryFailed:
            await self._roll_back(s)
        else:
            s.rules_bundle = running

    async def _post(self, s: PoolMember, path: str, body: dict | None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else b""
        port = self.settings.ports.scanner_http
        headers = {TOKEN_HEADER: self.token}
        # scand's own budget: fetch, the bundle checks, the ClamAV probe, then the reload
        timeout = self.config.apply_timeout_s + SCAND_APPLY_BUDGET_S
        return await health.request(s.address, port, "POST", path, data, headers, timeout)

    async def _drained(self, s: PoolMember) -> None:
        """Wait until no message is on its way to the scanner: HAProxy has no session open to
        it (the relay opens one per message; a session opened before ``maint`` may not have
        reached DATA yet) and scand has none in flight. At ``drain_timeout_s`` the apply goes
        ahead anyway: messages then in flight finish with the old pipeline, and one that
        reaches DATA later is scanned with the new rules before their canary (never lost)."""
        deadline = time.monotonic() + self.config.drain_timeout_s
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
        status, doc = await self._post(s, "/rules/rollback", None)
        if status != 200:
            raise RolloutError(f"{s.name}: rollback answered {status}: {doc.get('reason', doc)}")
        s.rules_bundle = doc.get("rules_bundle")
        await self._canary(s, s.rules_bundle)  # the old version must pass again
        log.warning(
            "event=rules_rolled_back scanner=%s address=%s version=%s",
            s.name,
            s.address,
            s.rules_bundle,
        )

    def _mark_unverified(self, name: str, unverified: bool) -> None:
        before = set(self._unverified)
        (self._unverified.add if unverified else self._unverified.discard)(name)
        if self._unverified == before:
            return
        record_unverified(self.mirror_dir, self._unverified)
