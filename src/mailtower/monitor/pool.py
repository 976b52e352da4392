"""The scanner pool's state machine: probe results + a clock value in, transitions out.

No I/O here, so every rule (fail_after, recover_after, flapping) is tested without sleeping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Target = Literal["maint", "ready"]
MAINT: Target = "maint"
READY: Target = "ready"


@dataclass
class PoolMember:
    """What the monitor knows and believes about one scanner."""

    name: str  # HAProxy server name (s01 …)
    address: str
    enabled: bool = True  # believed HAProxy admin state: True = ready, False = maint
    healthy: bool = False  # result of the last probe (False until the first probe)
    probed: bool = False
    streak: int = 0  # consecutive probes with the result in ``healthy``
    streak_start: float = 0.0  # clock value of the first probe of the streak
    since: float = 0.0  # clock value of the last change of ``enabled``
    rules_bundle: int | None = None  # the rule bundle its last health answer named
    # the ClamAV database versions its last health answer named ({db: version}; None: none)
    clamav: dict[str, int] | None = None
    held: bool = False  # out of service for an update (mailtower.monitor.rollout)
    # the digests its last health answer named: what scand runs, what a restart would run
    # (mailtower.scand.stack; None: not known)
    stack: str | None = None
    stack_installed: str | None = None
    # its last probe connected but had no answer in time (health.check_detail): scand is
    # there, busy (a large message in a one-process scand) or stuck; its sessions are kept
    silent: bool = False


@dataclass(frozen=True)
class Transition:
    """The monitor decided to put a scanner in maintenance or set it ready."""

    scanner: str
    address: str
    to: Target
    at: float
    after_s: float  # since the first failed (or good) probe of the streak that caused it


class Pool:
    """All scanners of a tower, in HAProxy order, with the transition rules."""

    def __init__(
        self,
        scanners: list[tuple[str, str]],
        *,
        fail_after: int,
        recover_after: int,
        now: float = 0.0,
    ) -> None:
        if fail_after < 1 or recover_after < 1:
            raise ValueError("fail_after and recover_after must be at least 1")
        self.fail_after = fail_after
        self.recover_after = recover_after
        self.scanners = [PoolMember(name, address, since=now) for name, address in scanners]
        self._by_name = {s.name: s for s in self.scanners}

    def __getitem__(self, name: str) -> PoolMember:
        return self._by_name[name]

    def observe(self, name: str, ok: bool, now: float) -> Transition | None:
        """Record one probe result; return the transition it causes, if any."""
        s = self._by_name[name]
        if not s.probed or ok != s.healthy:
            s.streak = 0
            s.streak_start = now
        s.probed = True
        s.healthy = ok
        s.streak += 1
        if s.held:  # the rollout has it in maintenance and gives it back itself
            return None
        # Level-triggered (>=, not ==): a belief adopted from HAProxy at start, or set by hand,
        # still converges to what the probes say.
        if ok and not s.enabled and s.streak >= self.recover_after:
            return self._move(s, READY, now)
        if not ok and s.enabled and s.streak >= self.fail_after:
            return self._move(s, MAINT, now)
        return None

    def adopt(self, name: str, enabled: bool, now: float) -> None:
        """Take the state HAProxy reports as the belief (used once, at start)."""
        s = self._by_name[name]
        if s.enabled != enabled:
            s.enabled = enabled
            s.since = now

    def _move(self, s: PoolMember, to: Target, now: float) -> Transition:
        s.enabled = to == READY
        s.since = now
        return Transition(s.name, s.address, to, now, now - s.streak_start)
