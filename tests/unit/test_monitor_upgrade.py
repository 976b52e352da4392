"""The rolling upgrade of scand (mailtower.monitor.rollout.stack), its windows' I/O faked:
the first scanner alone, then batches within what the pool can spare; a scanner that fails
its check stops the roll and stays out with its reason; the deploy's view of it."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from monitor_fakes import free_port, tower

from mailtower.monitor import health, upgrade_cli
from mailtower.monitor.errors import HAProxyError, RestartDeferred, UpgradeCheckFailed
from mailtower.monitor.metrics import MonitorMetrics
from mailtower.monitor.pool import Pool, PoolMember
from mailtower.monitor.rollout import canary
from mailtower.monitor.rollout.stack import STUCK, StackRollout, StackSteps, behind
from mailtower.scand import engines
from mailtower.scanning import testdata
from mailtower.settings import Upgrade

OLD, NEW = "a" * 16, "b" * 16
SCANNERS = 23  # a tower's pool
TOKEN = "c" * 16


class FakeSteps:
    """A window's I/O, recorded: who is out of service, the most out at once, the order."""

    def __init__(self, pool: Pool, *, failing: dict[str, str] | None = None) -> None:
        self.pool = pool
        self.sessions_now = 0
        self.failing = dict(failing or {})  # scanner → the check it fails
        self.out: set[str] = set()
        self.most_out = 0
        self.least_in_service = len(pool.scanners)
        self.batches: list[list[str]] = []
        self._batch: list[str] = []
        self.put_back_names: list[str] = []

    async def sessions(self) -> int:
        return self.sessions_now

    async def take_out(self, s: PoolMember) -> None:
        s.held = True
        self.out.add(s.name)
        if not self._batch or len(self.out) == 1:
            self._batch = []
            self.batches.append(self._batch)
        self._batch.append(s.name)
        self.most_out = max(self.most_out, len(self.out))
        in_service = sum(1 for m in self.pool.scanners if m.enabled and not m.held)
        self.least_in_service = min(self.least_in_service, in_service)

    async def drained(self, s: PoolMember) -> None:
        await asyncio.sleep(0.01)  # the others of the batch start meanwhile

    async def restart(self, s: PoolMember) -> None:
        if self.failing.get(s.name) == "health":
            raise UpgradeCheckFailed("health", "scand did not answer healthy within 120s")
        s.stack = s.stack_installed

    async def check(self, s: PoolMember) -> None:
        if self.failing.get(s.name) == "canary":
            raise UpgradeCheckFailed("canary", f"{s.name}: canary eicar came back clean")

    async def put_back(self, s: PoolMember) -> None:
        s.held = False
        self.out.discard(s.name)
        self.put_back_names.append(s.name)


def make(
    tmp_path: Path, *, batch: int = 3, spare: int = 1, failing: dict[str, str] | None = None
) -> tuple[StackRollout, FakeSteps, Pool]:
    base = tower(free_port(), free_port())
    settings = base.model_copy(update={"upgrade": Upgrade(batch=batch, spare=spare)})
    pool = Pool(
        [(f"s{i + 1:02d}", f"10.0.0.{i + 1}") for i in range(SCANNERS)],
        fail_after=2,
        recover_after=2,
    )
    for s in pool.scanners:
        s.enabled, s.healthy, s.stack, s.stack_installed = True, True, OLD, NEW
    monitor = SimpleNamespace(
        settings=settings,
        pool=pool,
        metrics=MonitorMetrics(pool),
        haproxy_lock=asyncio.Lock(),
        windows_lock=asyncio.Lock(),
    )
    steps = FakeSteps(pool, failing=failing)
    return StackRollout(monitor, steps, state_dir=tmp_path / "stack"), steps, pool  # type: ignore[arg-type]


def test_first_scanner_alone_then_batches_of_the_setting(tmp_path) -> None:
    rollout, steps, pool = make(tmp_path, batch=3)
    asyncio.run(rollout.roll())
    assert all(s.stack == NEW and not s.held for s in pool.scanners)
    assert [len(b) for b in steps.batches] == [1] + [3] * 7 + [1]  # 1 + 21 + 1 = 23
    assert steps.most_out == 3
    assert rollout.state.restarted == SCANNERS and behind(pool.scanners) == []
    assert steps.put_back_names[0] == "s01"  # the first went back before any other left


@pytest.mark.parametrize("busy_scanners", [0, 10, 19, 20, 21, 22])
def test_never_more_out_than_the_load_and_the_spare_allow(tmp_path, busy_scanners) -> None:
    rollout, steps, pool = make(tmp_path, batch=5, spare=1)
    per = rollout.monitor.settings.limits.scan_concurrency
    steps.sessions_now = busy_scanners * per  # sessions that need this many scanners
    needed = max(1, math.ceil(steps.sessions_now / per) + 1)
    asyncio.run(rollout.roll())
    assert steps.least_in_service >= needed  # in service while the batch is out
    assert steps.most_out <= min(5, SCANNERS - needed)
    if SCANNERS - needed < 1:  # nothing to spare: nothing restarted, nobody out
        assert steps.batches == [] and all(s.stack == OLD for s in pool.scanners)
    else:
        assert all(s.stack == NEW for s in pool.scanners)


def test_scanners_out_of_service_are_not_counted_as_spare(tmp_path) -> None:
    rollout, steps, pool = make(tmp_path, batch=3, spare=1)
    for s in pool.scanners[:20]:  # down: the health loop put them in maintenance
        s.enabled, s.healthy = False, False
    asyncio.run(rollout.roll())
    # 3 in service with no load, 1 spare: two restarts at a time, the 20 down not touched
    assert steps.most_out == 2 and steps.least_in_service >= 1
    assert [s.stack for s in pool.scanners[:20]] == [OLD] * 20


@pytest.mark.parametrize("check", ["health", "canary"])
def test_a_failed_check_stops_the_roll_and_keeps_the_scanner_out(tmp_path, check) -> None:
    rollout, steps, pool = make(tmp_path, batch=3, failing={"s05": check})
    asyncio.run(rollout.roll())
    s05 = pool["s05"]
    assert s05.held and "s05" not in steps.put_back_names  # out of service, in maintenance
    done = [s.name for s in pool.scanners if s.stack == NEW and not s.held]
    assert done == ["s01", "s02", "s03", "s04", "s06", "s07"][: len(done)]
    assert len(done) <= 6 and pool["s08"].stack == OLD  # the roll stopped with s05's batch
    snap = rollout.snapshot()
    assert set(snap["stuck"]) == {"s05"}  # type: ignore[arg-type]
    reason = snap["stuck"]["s05"]["reason"]  # type: ignore[index]
    assert reason.startswith(f"{check} check failed")
    assert "journalctl -u mailtower-scand" in snap["stuck"]["s05"]["hint"]  # type: ignore[index]
    # the next round goes no further while it is stuck
    asyncio.run(rollout.roll())
    assert pool["s08"].stack == OLD
    # kept out across a monitor restart
    stored = json.loads((tmp_path / "stack" / STUCK).read_text())
    assert stored["s05"]["installed"] == NEW and check in stored["s05"]["reason"]
    pool["s05"].held = False
    again = StackRollout(rollout.monitor, steps, state_dir=tmp_path / "stack")
    assert pool["s05"].held and set(again.state.stuck) == {"s05"}


def test_a_fixed_deploy_retries_the_scanner_kept_out_then_rolls_on(tmp_path) -> None:
    rollout, steps, pool = make(tmp_path, batch=3, failing={"s01": "canary"})
    asyncio.run(rollout.roll())
    assert pool["s01"].held and all(s.stack == OLD for s in pool.scanners[1:])  # first: alone
    fixed = "d" * 16
    steps.failing.clear()
    for s in pool.scanners:
        s.stack_installed = fixed
    asyncio.run(rollout.roll())
    assert all(s.stack == fixed and not s.held for s in pool.scanners)
    assert rollout.snapshot()["stuck"] == {}
    assert rollout.monitor.metrics.upgrade_stuck._value.get() == 0  # type: ignore[attr-defined]


def test_a_scanner_running_what_is_installed_is_left_alone(tmp_path) -> None:
    rollout, steps, pool = make(tmp_path)
    for s in pool.scanners:
        s.stack = NEW
    pool["s09"].stack_installed = None  # an older scand: no digest, nothing to compare
    asyncio.run(rollout.roll())
    assert steps.batches == []


# -- the real steps, scand's API and canary faked at the I/O boundary ------------------------


class FakeScand:
    def __init__(self, *, comes_back: bool = True, eicar_verdict: str = "virus") -> None:
        self.running, self.installed = OLD, NEW
        self.comes_back = comes_back
        self.eicar_verdict = eicar_verdict
        self.restarts = 0

    async def request(self, host, port, method, path, body=b"", headers=None, timeout_s=5.0):
        if path == "/health":
            if self.running is None:
                raise ConnectionRefusedError("scand starting")
            return 200, {
                "status": "ok",
                "in_flight": 0,
                "rules_bundle": None,
                "stack": self.running,
                "stack_installed": self.installed,
            }
        assert (method, path) == ("POST", "/stack/restart")
        assert headers == {"X-Mailtower-Token": TOKEN}
        self.restarts += 1
        answer = {"status": "restarting", "stack": self.running, "stack_installed": self.installed}
        self.running = self.installed if self.comes_back else None
        return 200, answer

    def canary(self, address, port, raw):
        verdict = self.eicar_verdict if testdata.eicar() in raw else "clean"
        return f"250 2.0.0 canary verdict={verdict} rules_bundle=0 findings=-"


class FakeHAProxy:
    def __init__(self) -> None:
        self.state: dict[str, str] = {}

    async def set_state(self, server, state, backend="scanners"):
        self.state[server] = state

    async def server_sessions(self, backend="scanners"):
        return dict.fromkeys(self.state, 0)


def real_steps(monkeypatch, scand: FakeScand, restart_timeout_s: float = 3.0):
    base = tower(free_port(), free_port())
    settings = base.model_copy(
        update={
            "secrets": base.secrets.model_copy(update={"canary": TOKEN}),
            "upgrade": Upgrade(restart_timeout_s=restart_timeout_s, drain_timeout_s=1),
        }
    )
    pool = Pool([("s01", "127.0.0.2")], fail_after=2, recover_after=2)
    s = pool["s01"]
    s.enabled, s.healthy, s.stack, s.stack_installed = True, True, OLD, NEW
    haproxy = FakeHAProxy()
    monitor = SimpleNamespace(
        settings=settings, pool=pool, haproxy=haproxy, haproxy_lock=asyncio.Lock()
    )
    monkeypatch.setattr(health, "request", scand.request)
    monkeypatch.setattr(canary, "send_canary", scand.canary)
    return StackSteps(monitor), s, haproxy  # type: ignore[arg-type]


def test_a_window_drains_restarts_checks_and_puts_back(monkeypatch) -> None:
    scand = FakeScand()
    steps, s, haproxy = real_steps(monkeypatch, scand)

    async def window() -> None:
        await steps.take_out(s)
        assert haproxy.state == {"s01": "maint"} and s.held
        await steps.drained(s)
        await steps.restart(s)
        await steps.check(s)
        await steps.put_back(s)

    asyncio.run(window())
    assert scand.restarts == 1 and s.stack == NEW
    assert haproxy.state == {"s01": "ready"} and not s.held


def test_a_scand_that_does_not_come_back_fails_the_health_check(monkeypatch) -> None:
    steps, s, _ = real_steps(monkeypatch, FakeScand(comes_back=False), restart_timeout_s=2.0)
    with pytest.raises(UpgradeCheckFailed) as failed:
        asyncio.run(steps.restart(s))
    assert failed.value.check == "health" and "upgrade.restart_timeout_s" in str(failed.value)


def test_a_scand_that_lets_eicar_through_fails_the_canary(monkeypatch) -> None:
    steps, s, _ = real_steps(monkeypatch, FakeScand(eicar_verdict="clean"))
    with pytest.raises(UpgradeCheckFailed) as failed:
        asyncio.run(steps.check(s))
    assert failed.value.check == "canary" and "eicar" in str(failed.value)


# -- what the deploy sees (mailtower-monitor upgrade status|wait) ----------------------------


def test_judge_names_behind_down_and_stuck() -> None:
    scanners = [("s01", "10.0.0.1"), ("s02", "10.0.0.2"), ("s03", "10.0.0.3")]
    answers = [
        (True, {"stack": NEW, "stack_installed": NEW}),
        (True, {"stack": OLD, "stack_installed": NEW}),
        (False, {}),
    ]
    stuck = {"s04": {"address": "10.0.0.4", "reason": "canary check failed: x", "hint": "h"}}
    progress = upgrade_cli.judge(scanners, answers, {"upgrade": {"stuck": stuck}})
    assert progress.behind == ["s02 (10.0.0.2)"] and progress.down == ["s03 (10.0.0.3)"]
    assert not progress.done
    text = upgrade_cli.failure_text("tower-a", progress)
    assert "scanner s04 (10.0.0.4): canary check failed: x" in text and "fix: h" in text
    done = upgrade_cli.judge(scanners[:1], answers[:1], {"upgrade": {"stuck": {}}})
    assert done.done
    # a fixed deploy: the scanner kept out has new code installed, the monitor will retry it
    fixed = {"s01": {"address": "10.0.0.1", "reason": "x", "installed": OLD, "hint": "h"}}
    retry = upgrade_cli.judge(scanners[:1], answers[:1], {"upgrade": {"stuck": fixed}})
    assert retry.stuck == {} and retry.behind == ["s01 (10.0.0.1)"]
    fixed["s01"]["installed"] = NEW  # the same code it failed with: still a failure
    assert upgrade_cli.judge(scanners[:1], answers[:1], {"upgrade": {"stuck": fixed}}).stuck
    # the last window's scanner already runs the new code but is not back yet: not done
    last = upgrade_cli.judge(scanners[:1], answers[:1], {"upgrade": {"applying": ["s01"]}})
    assert not last.done


def test_settings_default_is_a_few_at_a_time() -> None:
    u = Upgrade()
    assert 1 <= u.batch <= 5 and u.spare >= 1
    with pytest.raises(ValueError):
        Upgrade(batch=0)


def test_a_scanner_haproxy_would_not_take_out_is_not_kept_out(tmp_path) -> None:
    rollout, steps, pool = make(tmp_path)

    async def refused(s: PoolMember) -> None:
        raise HAProxyError("HAProxy runtime API at 10.0.0.100:9999 unreachable")

    steps.take_out = refused  # type: ignore[method-assign]
    asyncio.run(rollout.roll())
    assert rollout.snapshot()["stuck"] == {} and rollout.snapshot()["applying"] == []
    assert all(s.stack == OLD and not s.held for s in pool.scanners)  # tried next round


def test_a_scanner_counts_as_applying_until_it_is_back(tmp_path) -> None:
    rollout, steps, pool = make(tmp_path)
    seen: list[list[str]] = []
    put_back = steps.put_back

    async def watching(s: PoolMember) -> None:
        seen.append(list(rollout.snapshot()["applying"]))  # type: ignore[call-overload]
        await put_back(s)

    steps.put_back = watching  # type: ignore[method-assign]
    asyncio.run(rollout.roll())
    assert seen[0] == ["s01"] and rollout.snapshot()["applying"] == []


class EngineScanners(FakeSteps):
    """Each scanner's engine files, what its engines last started with, and its systemctl;
    a restart does what scand's unit does (scand.engines.refresh before scand starts)."""

    def __init__(self, pool: Pool, tmp_path: Path) -> None:
        super().__init__(pool)
        self.dirs = {s.name: tmp_path / s.name for s in pool.scanners}
        self.engine_restarts: dict[str, list[bool]] = {s.name: [] for s in pool.scanners}
        for s in pool.scanners:
            self.dirs[s.name].mkdir(parents=True)
            self.conf(s.name).write_text("LocalSocket /run/clamav/clamd.ctl\n")
            self.refresh(s)  # as deployed: engines started, recorded
            s.stack = s.stack_installed = self.installed(s.name)
            self.engine_restarts[s.name].clear()

    def conf(self, name: str) -> Path:
        return self.dirs[name] / "clamd.conf"

    def installed(self, name: str) -> str:
        return engines.digest([self.conf(name)])

    def refresh(self, s: PoolMember) -> None:
        def systemctl(argv):
            if argv[1] == "restart":
                self.engine_restarts[s.name].append(s.held)  # in a window?
            return subprocess.CompletedProcess(argv, 0)

        engines.refresh(
            "/run/clamav/clamd.ctl",
            None,
            files=[self.conf(s.name)],
            applied=self.dirs[s.name] / "applied",
            run=systemctl,
            ready=lambda *_: None,
        )

    async def restart(self, s: PoolMember) -> None:
        self.refresh(s)
        s.stack = self.installed(s.name)


def test_engine_config_rolls_in_the_windows_and_nowhere_else(tmp_path) -> None:
    """A new clamd.conf on every scanner (the deploy): no engine restarts then; the roll
    restarts each scanner's engines once, in its window, in the same batches as new code."""
    rollout, _, pool = make(tmp_path, batch=3)
    steps = EngineScanners(pool, tmp_path / "scanners")
    rollout.steps = steps
    for s in pool.scanners:  # what the deploy writes, and scand's next /health reads
        steps.conf(s.name).write_text("LocalSocket /run/clamav/clamd.ctl\nMaxThreads 8\n")
        s.stack_installed = steps.installed(s.name)
    assert all(r == [] for r in steps.engine_restarts.values())
    assert len(behind(pool.scanners)) == SCANNERS
    asyncio.run(rollout.roll())
    assert steps.engine_restarts == {s.name: [True] for s in pool.scanners}
    assert [len(b) for b in steps.batches] == [1] + [3] * 7 + [1]
    asyncio.run(rollout.roll())  # and again: nothing behind, nothing restarts
    assert steps.engine_restarts == {s.name: [True] for s in pool.scanners}


# -- a monitor stopped mid-window; scand refusing a restart -----------------------------------


class Blocking(FakeSteps):
    """The drain never ends: the monitor is stopped (its task cancelled) meanwhile."""

    def __init__(self, pool: Pool) -> None:
        super().__init__(pool)
        self.draining = asyncio.Event()
        self.order: list[tuple[str, str]] = []

    async def drained(self, s: PoolMember) -> None:
        self.draining.set()
        await asyncio.Event().wait()

    async def restart(self, s: PoolMember) -> None:
        self.order.append(("restart", s.name))
        await super().restart(s)

    async def check(self, s: PoolMember) -> None:
        self.order.append(("check", s.name))

    async def put_back(self, s: PoolMember) -> None:
        self.order.append(("put_back", s.name))
        await super().put_back(s)


@pytest.mark.parametrize("restarted_before_the_stop", [False, True])
def test_a_window_open_when_the_monitor_stops_is_finished_by_the_next(
    tmp_path, restarted_before_the_stop
) -> None:
    rollout, _, pool = make(tmp_path)
    steps = Blocking(pool)
    rollout.steps = steps

    async def stopped_mid_window() -> None:
        task = asyncio.create_task(rollout.roll())
        await steps.draining.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(stopped_mid_window())
    stored = json.loads((tmp_path / "stack" / "applying.json").read_text())
    assert stored == ["s01"] and rollout.snapshot()["stuck"] == {}
    # a new monitor: a fresh pool (nothing probed, nobody held) on the same state directory
    for s in pool.scanners:
        s.held, s.stack = False, None
    again = StackRollout(rollout.monitor, steps, state_dir=tmp_path / "stack")
    assert pool["s01"].held  # before the health loop's first tick could put it back
    assert again.snapshot()["applying"] == ["s01"]
    asyncio.run(again.roll())  # not probed yet: it waits, held, and nothing else moves
    assert pool["s01"].held and steps.order == []
    for s in pool.scanners:  # the health loop's first tick
        s.stack = OLD
    pool["s01"].stack = NEW if restarted_before_the_stop else OLD
    steps.drained = FakeSteps.drained.__get__(steps)  # type: ignore[method-assign]
    asyncio.run(again.roll())
    first = steps.order[: steps.order.index(("put_back", "s01")) + 1]
    expected = [("check", "s01"), ("put_back", "s01")]
    if not restarted_before_the_stop:
        expected.insert(0, ("restart", "s01"))
    assert first == expected  # checked before it went back, restarted only if behind
    assert all(s.stack == NEW and not s.held for s in pool.scanners)
    assert json.loads((tmp_path / "stack" / "applying.json").read_text()) == []


@pytest.mark.parametrize("answer", ["cooldown", "deploying"])
def test_a_restart_scand_refuses_for_now_puts_the_scanner_back_not_out(
    monkeypatch, tmp_path, answer
) -> None:
    scand = FakeScand()
    steps, s, haproxy = real_steps(monkeypatch, scand)

    async def refusing(host, port, method, path, body=b"", headers=None, timeout_s=5.0):
        if path != "/stack/restart":
            return await FakeScand.request(scand, host, port, method, path, body, headers)
        if answer == "cooldown":
            return 409, {"status": "cooldown", "reason": "restarted 3s ago", "stack": OLD}
        return 409, {"status": "current", "reason": "a deploy", "stack_installed": None}

    monkeypatch.setattr(health, "request", refusing)
    rollout, _, _ = make(tmp_path)
    rollout.steps = steps
    with pytest.raises(RestartDeferred):
        asyncio.run(rollout.window(s))
    assert haproxy.state == {"s01": "ready"} and not s.held  # back in service
    assert rollout.snapshot()["stuck"] == {} and rollout.snapshot()["applying"] == []
    assert "s01" in rollout.deferred  # tried again in a later round


def test_a_scand_already_running_what_is_installed_goes_on_to_the_checks(monkeypatch) -> None:
    scand = FakeScand()
    scand.running = NEW  # restarted before (a monitor stopped mid-window)
    steps, s, _ = real_steps(monkeypatch, scand)

    async def current(host, port, method, path, body=b"", headers=None, timeout_s=5.0):
        if path != "/stack/restart":
            return await FakeScand.request(scand, host, port, method, path, body, headers)
        return 409, {
            "status": "current",
            "reason": "it runs it",
            "stack": NEW,
            "stack_installed": NEW,
        }

    monkeypatch.setattr(health, "request", current)
    asyncio.run(steps.restart(s))
    assert s.stack == NEW


def test_the_deploy_waits_for_a_scanner_not_ready_to_roll() -> None:
    doc = {"stack": OLD, "stack_installed": None, "stack_pending": "a deploy is writing"}
    progress = upgrade_cli.judge([("s01", "10.0.0.1")], [(True, doc)], {"upgrade": {}})
    assert progress.behind == ["s01 (10.0.0.1): a deploy is writing"] and not progress.done
