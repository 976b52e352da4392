"""How many full scans a message that fails the same way on every try costs the tower.

A simulated clock, no hosts: Postfix's qmgr moves a deferred message's queue file time stamp
``clamp(age, minimal_backoff_time, maximal_backoff_time)`` into the future (age: now minus the
message's arrival; qmgr_active.c, qmgr_active_done_3_generic), and a deferred queue scan every
``queue_run_delay`` takes what is due. Every try is one full scan that ends in the failure
after ``attempt_s`` (0.1 s: the relay refuses it, scand fails on it; the engine timeout: a scan
that never finishes). The phase of the queue scans is averaged over 200 offsets.

    python scripts/poison_cost.py            # the settings' defaults and the lab's timers

Prints, per timer set and try length: the scans until scand sets the message aside
(``limits.unprocessable_after_s``), and the scans it would have cost without that, until the
relay gives up after ``queue_lifetime``.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mailtower.relay.order import duration_s  # noqa: E402  (after the path is set)
from mailtower.settings import Limits  # noqa: E402


@dataclass(frozen=True)
class Timers:
    name: str
    queue_run_delay_s: float
    minimal_backoff_s: float
    maximal_backoff_s: float
    queue_lifetime_s: float
    engine_timeout_s: float  # a try that ends in an engine timeout takes this long


def scans(timers: Timers, attempt_s: float, give_up_after_s: float, phase: float) -> int:
    """Scans of one message arriving at 0 until a try that ends at an age of at least
    ``give_up_after_s`` (the one that sets it aside, or after which Postfix returns it)."""
    t, count = 0.0, 0
    while True:
        t += attempt_s  # one full scan, then the failure
        count += 1
        if t >= give_up_after_s:
            return count
        due = t + min(max(t, timers.minimal_backoff_s), timers.maximal_backoff_s)
        # the first deferred queue scan at or after ``due``
        run = timers.queue_run_delay_s
        t = phase * run + math.ceil((due - phase * run) / run) * run


def average(timers: Timers, attempt_s: float, give_up_after_s: float) -> float:
    phases = [k / 200 for k in range(200)]
    return sum(scans(timers, attempt_s, give_up_after_s, p) for p in phases) / len(phases)


def main() -> None:
    limits = Limits()
    default = Timers(
        "defaults",
        duration_s(limits.queue_run_delay),
        duration_s(limits.minimal_backoff),
        duration_s(limits.maximal_backoff),
        duration_s(limits.queue_lifetime),
        limits.engine_timeout_s,
    )
    lab = Timers("lab (inventory/_lab.py)", 5, 5, 20, duration_s(limits.queue_lifetime), 10)
    bound = limits.unprocessable_after_s
    print(f"unprocessable_after_s = {bound:.0f}")
    print("| timers | one try ends after | scans until set aside | scans without it (3 d) |")
    print("|---|---|---|---|")
    for timers in (default, lab):
        for attempt_s in (0.1, timers.engine_timeout_s):
            set_aside = average(timers, attempt_s, bound)
            forever = average(timers, attempt_s, timers.queue_lifetime_s)
            print(
                f"| {timers.name}: run {timers.queue_run_delay_s:.0f} s, backoff "
                f"{timers.minimal_backoff_s:.0f}–{timers.maximal_backoff_s:.0f} s "
                f"| {attempt_s:g} s | {set_aside:.1f} | {forever:,.0f} |"
            )


if __name__ == "__main__":
    main()
