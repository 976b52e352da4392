"""The scanner pool's state machine, driven by probe results and a fake clock."""

from __future__ import annotations

import pytest

from mailtower.monitor.pool import MAINT, READY, Pool, Transition


def make_pool(fail_after: int = 2, recover_after: int = 2) -> Pool:
    return Pool(
        [("s01", "10.0.0.1"), ("s02", "10.0.0.2")],
        fail_after=fail_after,
        recover_after=recover_after,
        now=100.0,
    )


def feed(pool: Pool, name: str, results: str, start: float, step: float = 1.0) -> list:
    """Feed probe results ('+' good, '-' failed) one per ``step``; return the transitions."""
    out = []
    for i, r in enumerate(results):
        out.append(pool.observe(name, r == "+", start + i * step))
    return out


def test_starts_enabled_and_good_probes_change_nothing():
    pool = make_pool()
    assert feed(pool, "s01", "+++++", 101.0) == [None] * 5
    s = pool["s01"]
    assert s.enabled and s.healthy and s.since == 100.0


def test_maint_after_fail_after_consecutive_failures():
    pool = make_pool(fail_after=2)
    got = feed(pool, "s01", "+--", 101.0)
    assert got[:2] == [None, None]
    assert got[2] == Transition("s01", "10.0.0.1", MAINT, 103.0, 1.0)
    assert not pool["s01"].enabled
    assert pool["s01"].since == 103.0
    assert pool["s02"].enabled  # the other scanner is untouched


def test_fail_after_one_acts_on_the_first_failure():
    pool = make_pool(fail_after=1)
    (t,) = feed(pool, "s01", "-", 101.0)
    assert t is not None and t.to == MAINT and t.after_s == 0.0


def test_no_repeated_transition_while_still_failing():
    pool = make_pool()
    got = feed(pool, "s01", "------", 101.0)
    assert [t.to for t in got if t] == [MAINT]


def test_ready_after_recover_after_good_probes_with_time_since_first_good():
    pool = make_pool(fail_after=2, recover_after=3)
    feed(pool, "s01", "--", 101.0)
    got = feed(pool, "s01", "+++", 110.0, step=0.5)
    assert got[:2] == [None, None]
    assert got[2] == Transition("s01", "10.0.0.1", READY, 111.0, 1.0)
    assert pool["s01"].enabled and pool["s01"].since == 111.0


def test_flapping_never_reaches_either_threshold():
    pool = make_pool(fail_after=2, recover_after=2)
    assert feed(pool, "s01", "-+-+-+-+", 101.0) == [None] * 8
    assert pool["s01"].enabled


def test_flapping_while_in_maintenance_keeps_it_out():
    pool = make_pool(fail_after=2, recover_after=2)
    feed(pool, "s01", "--", 101.0)
    assert feed(pool, "s01", "+-+-+-", 103.0) == [None] * 6
    assert not pool["s01"].enabled
    got = feed(pool, "s01", "++", 109.0)
    assert got[1] is not None and got[1].to == READY


def test_a_good_probe_resets_the_failure_streak():
    pool = make_pool(fail_after=3)
    assert feed(pool, "s01", "--+--+", 101.0) == [None] * 6
    got = feed(pool, "s01", "---", 107.0)
    assert got[2] is not None and got[2].after_s == 2.0


def test_adopted_maintenance_recovers_on_good_probes():
    pool = make_pool(recover_after=2)
    pool.adopt("s01", False, 100.5)
    assert pool["s01"].since == 100.5
    got = feed(pool, "s01", "++", 101.0)
    assert got == [None, Transition("s01", "10.0.0.1", READY, 102.0, 1.0)]


def test_adopted_maintenance_is_kept_while_failing():
    pool = make_pool()
    pool.adopt("s01", False, 100.5)
    assert feed(pool, "s01", "----", 101.0) == [None] * 4


def test_thresholds_must_be_positive():
    with pytest.raises(ValueError):
        make_pool(fail_after=0)
