"""Rule bundles on the monitor: pull from the GOC, verify, mirror, roll across the pool.

Every ``bundles.poll_interval_s`` the monitor reads the GOC's ``latest.json``. A newer bundle
is downloaded and published into the tower's mirror with ``bundles.publish`` (signature,
hashes, newer than the mirror's, rules compile — or the mirror is left as it was); that
version becomes the pool's target.

A scanner whose health answer names another version is updated in a window of its own:

1. set to maintenance in the relay's HAProxy (no new connections; sessions open finish),
2. wait until it has no message in flight,
3. ``POST /rules/apply`` — the scanner fetches the bundle from the mirror, installs it, has
   clamd and c-icap load its ClamAV databases, and reloads its pipeline,
4. the canary: an EICAR message must come back ``virus``, a clean one ``clean``, and each
   sample the bundle carries (``canary/<verdict>-<name>.eml``) its verdict, all scanned with
   the target version (answered by scand, never delivered),
5. back in service.

The first scanner of a new version goes alone. If its canary fails, it is rolled back
(``POST /rules/rollback``, canary again) and the version is rejected: no other scanner gets
it, and the monitor waits for a newer one. Afterwards up to ``bundles.batch`` scanners are
updated at once, but never so many that fewer than the load needs plus ``bundles.spare``
stay in service; with no room the rollout waits. clamd reloads happen inside these windows,
so the pool never has all its clamds reloading at once.

The official ClamAV databases (``clamav`` settings) roll the same way, in the same windows
(clamav.py): the mirror's verified set of versions is the target, ``POST /clamav/apply`` the
apply, and the canary scans with the rules the scanner runs. The two rollouts share the pool's
capacity: each round holds the monitor's ``windows_lock`` while it has windows open, so they
never drain scanners at the same time.

The modules, each importing only those listed below it::

    clamav.py   ClamavRollout: the GOC's ClamAV mirror pulled (clamavdb.pull), its set rolled
    loop.py     Rounds: the rounds of windows towards a target, rejecting one whose first
                canary fails; Rollout: the rule bundles' loop (pull, then roll)
    window.py   one scanner's window: maintenance, drain, apply, canary, back or roll back
    pull.py     the GOC's newest bundle into the mirror
    plan.py     which scanners are behind, how many may leave service at once
    canary.py   the canary messages and the check of scand's answers
    state.py    the RolloutMonitor it needs, the Tracks (rules, clamav), their states, the
                records kept in the mirror

Usage (what mailtower.monitor.service does)::

    rollout = Rollout(monitor, rules_mirror)   # monitor: anything with the RolloutMonitor protocol
    task = asyncio.create_task(rollout.run(stop))
    rollout.snapshot()                         # for /pool
    clamav = ClamavRollout(monitor, samples=rollout.samples)   # with settings.clamav
    task = asyncio.create_task(clamav.run(stop))
"""

from __future__ import annotations

from mailtower.monitor.errors import CanaryFailed, RolloutError
from mailtower.monitor.rollout.canary import (
    CANARY_TIMEOUT_S,
    builtin_canaries,
    check_canary_answer,
    marked,
    send_canary,
)
from mailtower.monitor.rollout.clamav import CLAMAV_MIRROR_DIR, CLAMAV_STATE_DIR, ClamavRollout
from mailtower.monitor.rollout.loop import Rollout
from mailtower.monitor.rollout.plan import RETRY_AFTER_S
from mailtower.monitor.rollout.pull import FETCH_TIMEOUT_S, fetch
from mailtower.monitor.rollout.state import (
    MIRROR_DIR,
    REJECTED,
    UNVERIFIED,
    RolloutMonitor,
    RolloutState,
)
from mailtower.monitor.rollout.window import SCAND_APPLY_BUDGET_S, TOKEN_HEADER

__all__ = [
    "CANARY_TIMEOUT_S",
    "CLAMAV_MIRROR_DIR",
    "CLAMAV_STATE_DIR",
    "FETCH_TIMEOUT_S",
    "MIRROR_DIR",
    "REJECTED",
    "RETRY_AFTER_S",
    "SCAND_APPLY_BUDGET_S",
    "TOKEN_HEADER",
    "UNVERIFIED",
    "CanaryFailed",
    "ClamavRollout",
    "RolloutMonitor",
    "Rollout",
    "RolloutError",
    "RolloutState",
    "builtin_canaries",
    "check_canary_answer",
    "fetch",
    "marked",
    "send_canary",
]
