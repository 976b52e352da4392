"""The rolling upgrade of scand: a new mailtower wheel (or new settings) on every scanner,
restarted a few at a time in drained windows.

The deploy installs the new wheel and /etc/mailtower/tower.json on a running scanner and
leaves scand running (roles/scanner.py). scand's /health then names what it runs (``stack``)
and what a restart would run (``stack_installed``, mailtower.scand.stack). Every
``upgrade.poll_interval_s`` the monitor restarts those whose two differ, each in a window:

1. held and set to maintenance in the relay's HAProxy (no new sessions; open ones finish),
2. drained: no HAProxy session open to it and nothing in flight in scand,
3. ``POST /stack/restart``: scand stops gracefully, systemd starts what is installed,
4. checked: /health answers 200 naming the installed digest within
   ``upgrade.restart_timeout_s`` (``health``), then the canary — EICAR ``virus`` and a clean
   message ``clean``, scanned with the rules it runs (``canary``),
5. back in service.

The first scanner of an installed digest goes alone; then up to ``upgrade.batch`` at once,
never so many that fewer than the load needs plus ``upgrade.spare`` stay in service
(plan.room, as the rule rollouts). A scanner that fails a check stays held in maintenance with
its reason (``/pool``'s ``upgrade.stuck``, the metric mailtower_upgrade_scanners_stuck) and the
roll stops until what is installed on it changes (a fixed deploy); then it is tried again.
``mailtower-monitor upgrade wait`` (run by the deploy) reports the result (upgrade_cli.py).

A scanner reporting ``stack_installed`` null (scand.stack.pending: a deploy is writing what
is installed, or systemd has not loaded its new unit files) is not behind: not ready to roll.
scand refuses a restart with 409 when it runs what is installed or restarted a moment ago
(``RestartDeferred``: back in service, tried in a later round). The scanners in a window are
recorded (``APPLYING``) when it opens: a monitor stopped mid-window (a restart, a crash)
holds them again at its start and finishes their windows (restart if still behind, check,
put back) before it rolls on, so none goes back in service unchecked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from mailtower._fsio import write_durable
from mailtower.monitor import health
from mailtower.monitor.errors import (
    HAProxyError,
    RestartDeferred,
    RolloutError,
    UpgradeCheckFailed,
)
from mailtower.monitor.pool import MAINT, READY, PoolMember
from mailtower.monitor.rollout import plan
from mailtower.monitor.rollout.canary import run_canaries
from mailtower.monitor.rollout.state import RolloutMonitor
from mailtower.monitor.rollout.window import TOKEN_HEADER

log = logging.getLogger("mailtower.monitor.rollout")

STATE_DIR = Path("/var/lib/mailtower-monitor/stack")  # the unit's StateDirectory
STUCK = "stuck.json"  # {scanner: {"installed": digest, "reason": text}}
APPLYING = "applying.json"  # [scanner, …]: in a window (out of service) now
HINT = (
    "on the scanner: journalctl -u mailtower-scand; fix the cause and deploy again (a scanner "
    "kept out is tried again when what is installed on it changes)"
)


def behind(scanners: list[PoolMember]) -> list[PoolMember]:
    """Scanners in service whose scand runs something other than what is installed."""
    return [
        s
        for s in scanners
        if s.enabled
        and s.healthy
        and not s.held
        and s.stack_installed is not None
        and s.stack != s.stack_installed
    ]


def first_of(scanners: list[PoolMember], installed: str) -> bool:
    """No scanner runs ``installed`` yet: its first restart goes alone."""
    return not any(s.stack == installed for s in scanners)


@dataclass
class Stuck:
    installed: str | None  # what was installed when its check failed
    reason: str


@dataclass
class UpgradeState:
    """Scanners in a window, kept out after one (with the reason), and the last result."""

    applying: set[str] = field(default_factory=set)
    stuck: dict[str, Stuck] = field(default_factory=dict)
    last_error: str | None = None
    restarted: int = 0


class Steps(Protocol):
    """The I/O of one window (StackSteps on a real tower, a fake in the unit tests)."""

    async def sessions(self) -> int: ...
    async def take_out(self, s: PoolMember) -> None: ...
    async def drained(self, s: PoolMember) -> None: ...
    async def restart(self, s: PoolMember) -> None: ...
    async def check(self, s: PoolMember) -> None: ...
    async def put_back(self, s: PoolMember) -> None: ...


class StackRollout:
    """The rounds of restart windows; ``steps`` does the I/O."""

    def __init__(
        self, monitor: RolloutMonitor, steps: Steps | None = None, state_dir: Path = STATE_DIR
    ) -> None:
        self.monitor = monitor
        self.config = monitor.settings.upgrade
        self.steps: Steps = steps if steps is not None else StackSteps(monitor)
        self.state_dir = state_dir
        self.state = UpgradeState(stuck=_load_stuck(state_dir))
        names = {s.name for s in monitor.pool.scanners}
        for name in list(self.state.stuck):
            if name in names:
                monitor.pool[name].held = True  # before the health loop's first tick
            else:
                del self.state.stuck[name]
        # windows a stopped monitor left open: held, finished before the roll goes on
        self.resume = {n for n in _load_applying(state_dir) if n in names} - set(self.state.stuck)
        for name in self.resume:
            monitor.pool[name].held = True
        self.state.applying = set(self.resume)
        self.deferred: dict[str, float] = {}  # scanner → not before (monotonic): scand's 409

    async def run(self, stop: asyncio.Event) -> None:
        log.info(
            "event=upgrade_start batch=%d spare=%d stuck=%s",
            self.config.batch,
            self.config.spare,
            sorted(self.state.stuck) or "-",
        )
        while not stop.is_set():
            try:
                await self.roll()
            except Exception as exc:  # a round that fails is logged; the next one tries again
                self.state.last_error = str(exc)
                log.exception("event=upgrade_round_failed error=%r", str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.poll_interval_s)

    async def roll(self) -> None:
        """One round, holding the monitor's windows lock (the rule and ClamAV rollouts share
        the pool's capacity)."""
        async with self.monitor.windows_lock:
            await self._roll()

    async def _roll(self) -> None:
        pool = self.monitor.pool
        if not await self._resume():
            return  # a window a stopped monitor left open is not finished yet
        if not await self._retry_stuck():
            return  # the roll stays stopped while a scanner fails its check
        now = time.monotonic()
        while todo := [s for s in behind(pool.scanners) if self.deferred.get(s.name, 0) <= now]:
            try:
                sessions = await self.steps.sessions()
            except HAProxyError as exc:
                log.warning("event=upgrade_waits reason=haproxy error=%r", str(exc))
                return
            room = plan.room(
                pool.scanners,
                sessions,
                self.monitor.settings.limits.scan_concurrency,
                self.config.batch,
                self.config.spare,
            )
            if room < 1:
                log.info("event=upgrade_waits reason=capacity sessions=%d", sessions)
                return
            installed = todo[0].stack_installed
            assert installed is not None  # behind() keeps only those with one
            batch = todo[: 1 if first_of(pool.scanners, installed) else room]
            results = await asyncio.gather(*(self.window(s) for s in batch), return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException) and not isinstance(r, Exception):
                    raise r  # the monitor stops (cancelled): APPLYING has the open windows
            if any(isinstance(r, BaseException) for r in results):
                return

    async def window(self, s: PoolMember, *, held: bool = False, restart: bool = True) -> None:
        """One scanner: out, drained, restarted, checked, back. A failure after it went out
        keeps it out (held, maintenance) with the reason, and raises. Recorded (APPLYING)
        from before it goes out until it is back: a monitor stopped meanwhile (an exception
        that is not an Exception: cancelled) leaves it recorded, and finishes it at its start.
        ``restart=False``: it already runs what is installed (such a window): checked, back."""
        started = time.monotonic()
        self._applying(s.name, True)
        installed = s.stack_installed
        if not held:
            try:
                await self.steps.take_out(s)
            except Exception:  # HAProxy did not take it out: nothing changed, the round ends
                self._applying(s.name, False)
                raise
        try:
            if restart:
                await self.steps.drained(s)
                await self.steps.restart(s)
            await self.steps.check(s)
        except RestartDeferred as exc:  # scand would not restart now: back, tried later
            log.info("event=upgrade_scanner_deferred scanner=%s reason=%r", s.name, str(exc))
            self.deferred[s.name] = time.monotonic() + self.config.poll_interval_s * 6
            await self.steps.put_back(s)
            self._applying(s.name, False)
            raise
        except Exception as exc:
            reason = str(exc) if isinstance(exc, RolloutError) else f"{exc!r}"
            self._keep_out(s, installed, reason)
            self._applying(s.name, False)
            raise
        except BaseException:
            self._applying(s.name, True)  # recorded again (it is): the next monitor finishes it
            log.warning("event=upgrade_window_interrupted scanner=%s", s.name)
            raise
        self.state.stuck.pop(s.name, None)
        self._record_stuck()
        await self.steps.put_back(s)
        self._applying(s.name, False)  # only now: `upgrade wait` sees it back
        self.state.restarted += 1
        self.monitor.metrics.upgrade_restarts.labels("ok").inc()
        log.info(
            "event=upgrade_scanner_done scanner=%s address=%s stack=%s seconds=%.2f",
            s.name,
            s.address,
            s.stack,
            time.monotonic() - started,
        )

    async def _resume(self) -> bool:
        """Finish the windows a stopped monitor left open (held since this one started):
        restarted if still behind, checked, back; True when none is left."""
        for name in sorted(self.resume):
            s = self.monitor.pool[name]
            if s.stack is None:
                continue  # not probed yet (or down): it stays held meanwhile
            behind_now = s.stack_installed is not None and s.stack != s.stack_installed
            log.warning("event=upgrade_window_resumed scanner=%s restart=%s", name, behind_now)
            self.resume.discard(name)
            with contextlib.suppress(Exception):  # kept out (stuck) or deferred, as any window
                await self.window(s, held=True, restart=behind_now)
        return not self.resume

    def _applying(self, name: str, applying: bool) -> None:
        if applying:
            self.state.applying.add(name)
        else:
            self.state.applying.discard(name)
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            record = json.dumps(sorted(self.state.applying)) + "\n"
            write_durable(self.state_dir / APPLYING, record.encode())
        except OSError as exc:  # a monitor stopped mid-window would put it back unchecked
            log.error("event=upgrade_applying_not_recorded path=%s error=%r", self.state_dir, exc)

    async def _retry_stuck(self) -> bool:
        """Try again each scanner kept out whose installed code changed since; True when none
        is kept out any more."""
        for name in sorted(self.state.stuck):
            s = self.monitor.pool[name]
            if s.stack_installed is None or s.stack_installed == self.state.stuck[name].installed:
                continue
            with contextlib.suppress(Exception):  # kept out again, with the new reason
                await self.window(s, held=True)
        return not self.state.stuck

    def _keep_out(self, s: PoolMember, installed: str | None, reason: str) -> None:
        self.state.stuck[s.name] = Stuck(installed, reason)
        self.state.last_error = f"{s.name} ({s.address}): {reason}"
        self._record_stuck()
        self.monitor.metrics.upgrade_restarts.labels("failed").inc()
        log.critical(
            "event=upgrade_scanner_stuck scanner=%s address=%s reason=%r "
            "action='kept out of service; the roll stops' hint=%r",
            s.name,
            s.address,
            reason,
            HINT,
        )

    def _record_stuck(self) -> None:
        self.monitor.metrics.upgrade_stuck.set(len(self.state.stuck))
        record = {
            n: {"installed": v.installed, "reason": v.reason} for n, v in self.state.stuck.items()
        }
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            write_durable(self.state_dir / STUCK, (json.dumps(record) + "\n").encode())
        except OSError as exc:  # kept in memory; a restarted monitor would probe it again
            log.error("event=upgrade_stuck_not_recorded path=%s error=%r", self.state_dir, exc)

    def snapshot(self) -> dict[str, object]:
        """For /pool: what ``mailtower-monitor upgrade wait`` and the operator read."""
        return {
            "batch": self.config.batch,
            "spare": self.config.spare,
            "behind": [s.name for s in behind(self.monitor.pool.scanners)],
            "applying": sorted(self.state.applying),
            "stuck": {
                name: {
                    "address": self.monitor.pool[name].address,
                    "reason": v.reason,
                    "installed": v.installed,  # tried again once this changes
                    "hint": HINT,
                }
                for name, v in sorted(self.state.stuck.items())
            },
            "restarted": self.state.restarted,
            "last_error": self.state.last_error,
        }


def _load_stuck(state_dir: Path) -> dict[str, Stuck]:
    try:
        found = json.loads((state_dir / STUCK).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(found, dict):
        return {}
    return {
        str(n): Stuck(v.get("installed"), str(v.get("reason", "")))
        for n, v in found.items()
        if isinstance(v, dict)
    }


def _load_applying(state_dir: Path) -> list[str]:
    try:
        found = json.loads((state_dir / APPLYING).read_text())
    except (OSError, ValueError):
        return []
    return [str(n) for n in found] if isinstance(found, list) else []


class StackSteps:
    """The windows' I/O on a tower: the relay's HAProxy, scand's HTTP API and its filter port."""

    def __init__(self, monitor: RolloutMonitor) -> None:
        settings = monitor.settings
        assert settings.secrets.canary is not None
        self.monitor = monitor
        self.settings = settings
        self.token = settings.secrets.canary

    async def sessions(self) -> int:
        return await self.monitor.haproxy.sessions()

    async def take_out(self, s: PoolMember) -> None:
        async with self.monitor.haproxy_lock:  # the health loop sees held before it acts
            s.held = True
            try:
                await self.monitor.haproxy.set_state(s.name, MAINT)
            except HAProxyError:
                s.held = False  # still in service: the next round tries again
                raise

    async def drained(self, s: PoolMember) -> None:
        """No HAProxy session open to it and nothing in flight in scand, or
        ``upgrade.drain_timeout_s`` gone: scand's graceful stop then finishes what is left."""
        deadline = time.monotonic() + self.settings.upgrade.drain_timeout_s
        port, timeout = self.settings.ports.scanner_http, self.settings.limits.health_timeout_s
        while True:
            try:
                _, doc = await health.request(s.address, port, "GET", "/health", timeout_s=timeout)
            except (OSError, TimeoutError, ValueError):
                doc = {}
            try:
                sessions = (await self.monitor.haproxy.server_sessions()).get(s.name)
            except HAProxyError:
                sessions = None
            if doc.get("in_flight") == 0 and sessions == 0:
                return
            if time.monotonic() > deadline:
                log.warning(
                    "event=upgrade_drain_timeout scanner=%s in_flight=%s sessions=%s "
                    "action=restart_anyway",
                    s.name,
                    doc.get("in_flight"),
                    sessions,
                )
                return
            await asyncio.sleep(0.2)

    async def restart(self, s: PoolMember) -> None:
        """``POST /stack/restart``; then /health must answer 200 naming what is installed."""
        port, timeout = self.settings.ports.scanner_http, self.settings.limits.health_timeout_s
        try:
            status, doc = await health.request(
                s.address, port, "POST", "/stack/restart", b"", {TOKEN_HEADER: self.token}, timeout
            )
        except (OSError, TimeoutError, ValueError) as exc:
            raise UpgradeCheckFailed(
                "restart", f"no answer to POST /stack/restart: {exc!r}"
            ) from exc
        reason = doc.get("reason", doc)
        if status == 409 and doc.get("status") == "cooldown":
            raise RestartDeferred(f"{s.name} ({s.address}): {reason}")
        if status == 409 and doc.get("status") == "current":
            if doc.get("stack_installed") is None:  # a deploy is writing: not ready yet
                raise RestartDeferred(f"{s.name} ({s.address}): {reason}")
            # it already runs what is installed (restarted otherwise): the checks decide
        elif status != 200:
            raise UpgradeCheckFailed("restart", f"POST /stack/restart answered {status}: {reason}")
        budget = self.settings.upgrade.restart_timeout_s
        deadline = time.monotonic() + budget
        last: object = "no answer"
        await asyncio.sleep(1.0)  # scand answers before it stops
        while time.monotonic() < deadline:
            ok, doc = await health.check(s.address, port, timeout)
            running, installed = doc.get("stack"), doc.get("stack_installed")
            # runs what is installed — or what was when asked, while a new deploy writes
            current = running == installed or (installed is None and doc.get("stack_pending"))
            # Not "== what was installed when asked": the restart itself may change what is
            # installed (the engines' refresh records what they now run), seen in the lab.
            if ok and running is not None and current:
                s.stack, s.stack_installed = running, installed
                s.rules_bundle = doc.get("rules_bundle")
                s.healthy = True  # checked here; the next batch's room counts it at once
                return
            last = doc.get("reason") or doc.get("status") or doc or "no answer"
            await asyncio.sleep(0.5)
        raise UpgradeCheckFailed(
            "health",
            f"scand did not answer healthy with the installed code within {budget:g}s "
            f"(upgrade.restart_timeout_s); last: {last}",
        )

    async def check(self, s: PoolMember) -> None:
        """The built-in canaries (EICAR virus, a clean message clean) with the rules it runs."""
        try:
            await run_canaries(s, self.settings.ports.filter, self.token, s.rules_bundle, [])
        except RolloutError as exc:
            raise UpgradeCheckFailed("canary", str(exc)) from exc

    async def put_back(self, s: PoolMember) -> None:
        """Held no more; ready in HAProxy (reconcile repeats it if HAProxy does not answer)."""
        async with self.monitor.haproxy_lock:
            s.held = False
            if s.enabled:
                with contextlib.suppress(HAProxyError):
                    await self.monitor.haproxy.set_state(s.name, READY)
