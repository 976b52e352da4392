"""Which scanners a rollout updates next, and how many may leave service at once.

The first scanner of a new version goes alone. Afterwards up to ``bundles.batch`` scanners are
updated at once, but never so many that fewer than the load needs plus ``bundles.spare`` stay
in service; with no room the rollout waits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from mailtower.monitor.pool import PoolMember

# A scanner whose update failed (not the canary of a new version: that rejects the version)
# is left alone this long, so one broken scanner is not drained again every round.
RETRY_AFTER_S = 60.0


def behind(
    scanners: Sequence[PoolMember],
    current: Callable[[PoolMember], bool] | None,
    retry_at: Mapping[str, float],
    now: float,
) -> list[PoolMember]:
    """Scanners in service that are not ``current`` (None: no target, none is behind), in pool
    order, leaving out those waiting until ``retry_at`` after a failed update."""
    if current is None:
        return []
    return [
        s
        for s in scanners
        if s.enabled
        and s.healthy
        and not s.held
        and not current(s)
        and retry_at.get(s.name, 0.0) <= now
    ]


def room(
    scanners: Sequence[PoolMember], sessions: int, per_scanner: int, batch: int, spare: int
) -> int:
    """How many scanners may leave service now: the rest must carry ``sessions``, each
    ``per_scanner`` (``limits.scan_concurrency``) of them, with ``spare`` to spare."""
    in_service = sum(1 for s in scanners if s.enabled and s.healthy and not s.held)
    needed = math.ceil(sessions / max(1, per_scanner)) + spare
    return max(0, min(batch, in_service - max(needed, 1)))


def first_of_version(scanners: Sequence[PoolMember], current: Callable[[PoolMember], bool]) -> bool:
    """Whether no scanner is ``current`` yet: the target's first update goes alone, and a
    failed canary there rejects it."""
    return not any(current(s) for s in scanners)
